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
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"sha256:{sha}"}},
                    {"type": "text", "text": f"Describe the image. ({index})"},
                ],
            }
        ]
        store.add_generation(
            GenerationRecord(
                id=f"gen-{index}",
                alias="llava-rlhf",
                messages=messages,
                response="There is one blue star and a moon.",
                user_id="u-1",
            )
        )
        store.add_feedback(
            FeedbackEvent(generation_id=f"gen-{index}", correction="There is one blue star.", user_id="u-1")
        )


def settings_for(base_model, tmp_path, **overrides) -> TrainerSettings:
    return TrainerSettings(
        model=str(base_model),
        adapter_dir=tmp_path / "adapters",
        round_min_pairs=2,
        epochs=1,
        batch_pairs=2,
        eval_images=1,
        **overrides,
    )


def test_the_gate_by_hand():
    settings = TrainerSettings()
    assert gate(GOOD, GOOD, settings).passed
    worse = gate({**GOOD, "chair_s": 0.13, "object_recall": 0.87}, GOOD, settings)
    assert not worse.passed and len(worse.reasons) == 2 and "CHAIR_s rose 0.100 -> 0.130" in worse.reasons[0]
    assert gate({**GOOD, "chair_s": 0.115, "object_recall": 0.885}, GOOD, settings).passed  # within tolerances


def test_a_round_publishes_acks_gates_and_promotes(base_model, store, tmp_path):
    add_corrections(store, 3)
    scored = []
    trainer = OnlineTrainer(
        settings_for(base_model, tmp_path), store, scorer=lambda name: scored.append(name) or dict(GOOD)
    )
    pairs = trainer.poll()
    assert len(pairs) == 3 and trainer.round_due(pairs)
    result = trainer.run_round(pairs)
    assert result.promoted and result.version == 1 and result.events == 3 and result.pair_sources == {"correction": 3}
    assert scored == ["base", "llava-rlhf@v1"]  # the baseline, then the candidate
    adapter = store.get_adapter(1)
    assert adapter.status == "promoted" and adapter.metrics == GOOD and adapter.algorithm == "dense-dpo"
    assert adapter.num_feedback_events == 3 and (tmp_path / "adapters" / "policy-v1" / "adapter_config.json").is_file()
    assert store.promoted_version("llava-rlhf") == 1 and store.pending_count("trainer") == 0
    assert trainer.poll() == []  # nothing is trained on twice

    # The next round starts from v1; a candidate that hallucinates more is rejected and the alias stays.
    add_corrections(store, 2, start=10)
    worse = OnlineTrainer(settings_for(base_model, tmp_path), store, scorer=lambda name: {**GOOD, "chair_s": 0.3})
    second = worse.run_round(worse.poll())
    assert not second.promoted and store.get_adapter(2).status == "rejected"
    notes = store.get_adapter(2).notes
    assert store.get_adapter(2).parent_version == 1 and notes.startswith("2 pairs (0 online, 0 bdhs); loss=")
    assert "; rejected: CHAIR_s rose 0.100 -> 0.300" in notes  # the training notes are kept, the reason appended
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


def test_mixed_dpo_trains_on_judged_online_pairs_from_logged_prompts(bundled_model, store, tmp_path):
    from online_rl.schema import FactsRecord
    from training.shapes_world import DESCRIBE_PROMPT, ShapesWorld

    world = ShapesWorld()
    for index in range(6):  # logged description prompts whose images have facts, each with a correction
        scene = world.scene("validation", 200 + index)
        buffer = io.BytesIO()
        world.render(scene).save(buffer, format="PNG")
        sha = store.put_image(buffer.getvalue())
        store.add_facts(FactsRecord(image_sha256=sha, facts=world.facts(scene), source="user"))
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"sha256:{sha}"}},
                    {"type": "text", "text": DESCRIBE_PROMPT},
                ],
            }
        ]
        store.add_generation(
            GenerationRecord(
                id=f"gen-{index}",
                alias="llava-rlhf",
                messages=messages,
                response=world.description(scene, noisy=True),
                user_id="u-1",
            )
        )
        store.add_feedback(
            FeedbackEvent(generation_id=f"gen-{index}", correction=world.description(scene, noisy=False), user_id="u-1")
        )
    trainer = OnlineTrainer(
        settings_for(bundled_model, tmp_path, online_share=1.0, online_samples=4), store, scorer=lambda name: dict(GOOD)
    )
    result = trainer.run_round(trainer.poll())
    notes = store.get_adapter(result.version).notes
    online = int(notes.split("(")[1].split(" online")[0])
    assert notes.startswith("6 pairs (") and 1 <= online <= 6, notes  # slots whose samples tied keep their correction


def add_thumbs_up(store, world, count: int) -> None:
    """Up-rated true descriptions of validation scenes: good answers with no rejected partner."""
    for index in range(count):
        scene = world.scene("validation", 300 + index)
        buffer = io.BytesIO()
        world.render(scene).save(buffer, format="PNG")
        sha = store.put_image(buffer.getvalue())
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"sha256:{sha}"}},
                    {"type": "text", "text": "Describe the image in detail."},
                ],
            }
        ]
        store.add_generation(
            GenerationRecord(
                id=f"good-{index}",
                alias="llava-rlhf",
                messages=messages,
                response=world.description(scene, noisy=False),
                user_id="u-1",
            )
        )
        store.add_feedback(FeedbackEvent(generation_id=f"good-{index}", rating=1, user_id="u-1"))


def test_lone_thumbs_up_become_bdhs_pairs_and_trigger_a_round(bundled_model, store, tmp_path):
    from training.shapes_world import ShapesWorld

    add_thumbs_up(store, ShapesWorld(), 3)
    trainer = OnlineTrainer(
        settings_for(bundled_model, tmp_path, bdhs_per_round=2), store, scorer=lambda name: dict(GOOD)
    )
    pairs = trainer.poll()
    assert pairs == [] and len(trainer.bdhs_candidates) == 2 and trainer.round_due(pairs)  # 2 BDHS pairs due
    result = trainer.run_round(pairs)
    adapter = store.get_adapter(result.version)
    assert adapter.notes.startswith("2 pairs (0 online, 2 bdhs)"), adapter.notes
    assert adapter.num_feedback_events == 3 and store.pending_count("trainer") == 0


def test_events_that_support_no_pair_at_all_are_acknowledged_without_a_version(bundled_model, store, tmp_path):
    from training.shapes_world import ShapesWorld

    class NoBDHS(OnlineTrainer):
        def bdhs_pairs(self, policy, processor):
            return []

    add_thumbs_up(store, ShapesWorld(), 2)
    trainer = NoBDHS(settings_for(bundled_model, tmp_path), store, scorer=lambda name: dict(GOOD))
    assert trainer.run_round(trainer.poll()) is None
    assert store.list_adapters() == [] and store.pending_count("trainer") == 0 and trainer.poll() == []


def test_pair_sources_pick_what_a_round_trains_on(base_model, store, tmp_path):
    add_corrections(store, 3)
    trainer = OnlineTrainer(
        settings_for(base_model, tmp_path, pair_sources=frozenset({"thumbs"})), store, scorer=lambda name: dict(GOOD)
    )
    assert trainer.poll() == []  # corrections only, and this trainer takes thumbs only
    assert (
        len(
            OnlineTrainer(
                settings_for(base_model, tmp_path, pair_sources=frozenset({"correction"})),
                store,
                scorer=lambda name: dict(GOOD),
            ).poll()
        )
        == 3
    )
    with pytest.raises(ValueError, match="pair_sources"):
        TrainerSettings(pair_sources=frozenset({"stars"}))


def log_traffic(store, world, count: int, with_facts: bool = True) -> None:
    """Logged prompts from users: descriptions and presence probes about validation scenes, facts registered."""
    from online_rl.schema import FactsRecord
    from training.shapes_world import DESCRIBE_PROMPT

    for index in range(count):
        scene = world.scene("validation", 400 + index)
        buffer = io.BytesIO()
        world.render(scene).save(buffer, format="PNG")
        sha = store.put_image(buffer.getvalue())
        if with_facts:
            store.add_facts(FactsRecord(image_sha256=sha, facts=world.facts(scene), source="user"))
        question = DESCRIBE_PROMPT if index % 2 == 0 else "Is there a moon in the image?"
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"sha256:{sha}"}},
                    {"type": "text", "text": question},
                ],
            }
        ]
        store.add_generation(
            GenerationRecord(id=f"traffic-{index}", alias="llava-rlhf", messages=messages, response="x", user_id="u-1")
        )


@pytest.fixture
def reward_model_dir(bundled_model, tmp_path):
    from training.reward_model import new_reward_model, save_reward_model

    model, _ = new_reward_model(bundled_model, lora_rank=4, seed=0)
    return save_reward_model(model, tmp_path / "reward", {"with_facts": True, "base_model": str(bundled_model)})


def test_a_ppo_round_trains_on_recent_traffic_then_publishes_and_gates(
    bundled_model, store, tmp_path, reward_model_dir
):
    from online_rl.logged_prompts import traffic_prompts
    from training.evaluation.shapes_bench import DESCRIPTION_MAX_TOKENS, SHORT_ANSWER_MAX_TOKENS
    from training.shapes_world import ShapesWorld

    world = ShapesWorld()
    log_traffic(store, world, 6)
    prompts = traffic_prompts(store)
    assert len(prompts) == 6 and {p.kind for p in prompts} == {"description", "presence"}
    assert all(p.facts and p.scene is not None for p in prompts)
    assert {p.prompt.max_new_tokens for p in prompts} == {DESCRIPTION_MAX_TOKENS, SHORT_ANSWER_MAX_TOKENS}
    settings = settings_for(
        bundled_model,
        tmp_path,
        algorithm="ppo",
        reward_model=reward_model_dir,
        ppo_steps=2,
        ppo_rollout_batch=4,
        ppo_min_prompts=6,
    )
    scored = []
    trainer = OnlineTrainer(settings, store, scorer=lambda name: scored.append(name) or dict(GOOD))
    result = trainer.run_ppo_round()
    adapter = store.get_adapter(result.version)
    assert adapter.algorithm == "ppo" and adapter.notes.startswith("ppo: 2 steps x 4 of 6 recent prompts")
    assert (tmp_path / "adapters" / adapter.name / "adapter_model.safetensors").is_file()
    assert scored == ["base", f"llava-rlhf@v{result.version}"] and result.promoted
    assert store.promoted_version("llava-rlhf") == result.version
    assert result.train_metrics.keys() >= {"rm_score", "rm_score_first", "kl_to_reference"}


def test_a_ppo_round_waits_for_enough_distinct_prompts(bundled_model, store, tmp_path, reward_model_dir):
    from online_rl.logged_prompts import traffic_prompts
    from training.shapes_world import ShapesWorld

    log_traffic(store, ShapesWorld(), 3, with_facts=False)
    prompts = traffic_prompts(store)  # without facts: nothing to judge them by, but still prompts to roll out
    assert [p.kind for p in prompts] == ["other"] * 3 and all(p.facts == () and p.scene is None for p in prompts)
    settings = settings_for(bundled_model, tmp_path, algorithm="ppo", reward_model=reward_model_dir, ppo_min_prompts=4)
    trainer = OnlineTrainer(settings, store, scorer=lambda name: dict(GOOD))
    assert trainer.run_ppo_round() is None and store.list_adapters() == []
