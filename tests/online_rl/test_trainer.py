"""The online trainer's round on the tiny model with a fake scorer: it trains on the pairs, publishes and registers
a version, acknowledges exactly the events it read, gates, and promotes or rejects; after a restart it gets only
the events it never acknowledged."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from online_rl.schema import FeedbackEvent, GenerationRecord
from online_rl.store import open_store
from online_rl.trainer import OnlineTrainer, TrainerSettings, gate
from training.tiny_llava import TinyLlavaSpec, build_untrained

GOOD = {"chair_s": 0.10, "pope_adversarial_accuracy": 0.80, "object_recall": 0.90}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return build_untrained(tmp_path_factory.mktemp("base"), TinyLlavaSpec())


@pytest.fixture
def store(tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as opened:
        yield opened


def add_corrections(store, count: int, start: int = 0) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), (30, 30, 200)).save(buffer, format="PNG")
    sha = store.put_image(buffer.getvalue())
    for index in range(start, start + count):
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"sha256:{sha}"}},
                                                 {"type": "text", "text": f"Describe the image. ({index})"}]}]  # fmt: skip
        store.add_generation(GenerationRecord(id=f"gen-{index}", alias="llava-rlhf", messages=messages,
                                              response="There is one blue star and a moon.", user_id="u-1"))  # fmt: skip
        store.add_feedback(FeedbackEvent(generation_id=f"gen-{index}", correction="There is one blue star.",
                                         user_id="u-1"))  # fmt: skip


def settings_for(base_model, tmp_path, **overrides) -> TrainerSettings:
    return TrainerSettings(model=str(base_model), adapter_dir=tmp_path / "adapters", round_min_pairs=2, epochs=1,
                           batch_pairs=2, eval_images=1, **overrides)  # fmt: skip


def test_the_gate_by_hand():
    settings = TrainerSettings()
    assert gate(GOOD, GOOD, settings).passed
    worse = gate({**GOOD, "chair_s": 0.13, "object_recall": 0.87}, GOOD, settings)
    assert not worse.passed and len(worse.reasons) == 2 and "CHAIR_s rose 0.100 -> 0.130" in worse.reasons[0]
    assert gate({**GOOD, "chair_s": 0.115, "object_recall": 0.885}, GOOD, settings).passed  # within tolerances


def test_a_round_publishes_acks_gates_and_promotes(base_model, store, tmp_path):
    add_corrections(store, 3)
    scored = []
    trainer = OnlineTrainer(settings_for(base_model, tmp_path), store,
                            scorer=lambda name: scored.append(name) or dict(GOOD))  # fmt: skip
    pairs = trainer.poll()
    assert len(pairs) == 3 and trainer.round_due(pairs)
    result = trainer.run_round(pairs)
    assert result.promoted and result.version == 1 and result.events == 3
    assert scored == ["base", "llava-rlhf@v1"]  # the baseline, then the candidate
    adapter = store.get_adapter(1)
    assert adapter.status == "promoted" and adapter.metrics == GOOD and adapter.algorithm == "dense-dpo"
    assert adapter.num_feedback_events == 3 and (tmp_path / "adapters" / "policy-v1" / "adapter_config.json").is_file()
    assert store.promoted_version("llava-rlhf") == 1 and store.pending_count("trainer") == 0
    assert trainer.poll() == []  # nothing is trained on twice

    # The next round starts from v1; a candidate that hallucinates more is rejected and the alias stays.
    add_corrections(store, 2, start=10)
    worse = OnlineTrainer(settings_for(base_model, tmp_path), store,
                          scorer=lambda name: {**GOOD, "chair_s": 0.3})  # fmt: skip
    second = worse.run_round(worse.poll())
    assert not second.promoted and store.get_adapter(2).status == "rejected"
    assert store.get_adapter(2).parent_version == 1 and "CHAIR_s rose" in store.get_adapter(2).notes
    assert store.promoted_version("llava-rlhf") == 1


def test_a_restarted_trainer_gets_back_only_what_it_never_acknowledged(base_model, store, tmp_path):
    add_corrections(store, 2)
    crashed = OnlineTrainer(settings_for(base_model, tmp_path), store, scorer=lambda name: dict(GOOD))
    assert len(crashed.poll()) == 2  # read, then "killed" before publishing
    add_corrections(store, 1, start=5)
    restarted = OnlineTrainer(settings_for(base_model, tmp_path), store, scorer=lambda name: dict(GOOD))
    pairs = restarted.poll()
    assert sorted(p.rejected_generation_id for p in pairs) == ["gen-0", "gen-1", "gen-5"]
    restarted.run_round(pairs)
    assert store.pending_count("trainer") == 0 and restarted.poll() == []
