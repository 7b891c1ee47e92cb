"""The online trainer's round on the tiny model with a fake scorer: it trains on the pairs, publishes and registers
a version, acknowledges exactly the events it read, gates, and promotes or rejects; after a restart it gets only
the events it never acknowledged."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from online_rl.schema import FeedbackEvent, GenerationRecord
from online_rl.store import open_store
from online_rl.trainer import OnlineTrainer, TrainerSettings
from training.evaluation.paired import ratio
from training.tiny_llava import TinyLlavaSpec, build_untrained


def report(hallucinating: int = 2, recall_misses: int = 2, pope_misses: int = 4, scenes: int = 20) -> dict:
    """A scorer's report: `scenes` scenes, the first `hallucinating` descriptions naming an absent object, the first
    `recall_misses` naming one of their two objects, the first `pope_misses` adversarial probes answered wrong."""
    per_scene = {
        "scenes": list(range(scenes)),
        "chair_s": [[int(i < hallucinating), 1] for i in range(scenes)],
        "object_recall": [[2 - int(i < recall_misses), 2] for i in range(scenes)],
        "pope_adversarial_accuracy": [[int(i >= pope_misses), 1] for i in range(scenes)],
    }
    return {**{metric: ratio(per_scene[metric]) for metric in per_scene if metric != "scenes"}, "per_scene": per_scene}


GOOD = report()  # CHAIR_s 0.10, object recall 0.95, POPE-adversarial 0.80


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


def test_a_round_publishes_acks_gates_and_promotes(base_model, store, tmp_path):
    add_corrections(store, 3)
    scored = []
    trainer = OnlineTrainer(settings_for(base_model, tmp_path), store, scorer=lambda name: scored.append(name) or GOOD)
    pairs = trainer.poll()
    assert len(pairs) == 3 and trainer.round_due(pairs)
    result = trainer.run_round(pairs)
    assert result.promoted and result.version == 1 and result.events == 3 and result.pair_sources == {"correction": 3}
    assert scored == ["base", "llava-rlhf@v1"]  # the baseline, then the candidate
    adapter = store.get_adapter(1)
    assert (
        adapter.status == "promoted" and adapter.algorithm == "dense-dpo" and adapter.pair_sources == {"correction": 3}
    )
    assert (adapter.metrics["chair_s"], adapter.metrics["object_recall"]) == (0.1, 0.95)
    assert adapter.gate["passed"] and adapter.gate["baseline"] == "base" and adapter.gate["confidence"] == 0.95
    assert adapter.gate["differences"]["chair_s"] == {
        "metric": "chair_s",
        "candidate": 0.1,
        "baseline": 0.1,
        "difference": 0.0,
        "low": 0.0,
        "high": 0.0,
    }
    assert adapter.num_feedback_events == 3 and (tmp_path / "adapters" / "policy-v1" / "adapter_config.json").is_file()
    assert store.promoted_version("llava-rlhf") == 1 and store.pending_count("trainer") == 0
    assert "gate passed: chair_s 0.100->0.100" in store.alias_history("llava-rlhf")[-1].reason
    assert trainer.poll() == []  # nothing is trained on twice
    sample = trainer.metrics.registry.get_sample_value
    assert sample("alignloop_trainer_rounds_total", {"outcome": "promoted"}) == 1
    assert sample("alignloop_trainer_pairs_total", {"source": "correction"}) == 3
    assert sample("alignloop_trainer_feedback_to_served_seconds_count") == 3  # one per event trained on
    assert sample("alignloop_trainer_gate_metric", {"version": "policy-v1", "metric": "chair_s"}) == 0.1
    trainer.update_gauges()
    assert sample("alignloop_trainer_feedback_backlog") == 0 and sample("alignloop_trainer_ungated_versions") == 0

    # The next round starts from v1, whose scores are cached; a candidate that hallucinates more is rejected.
    add_corrections(store, 2, start=10)
    asked = []
    worse = OnlineTrainer(
        settings_for(base_model, tmp_path), store, scorer=lambda name: asked.append(name) or report(hallucinating=12)
    )
    second = worse.run_round(worse.poll())
    assert asked == ["llava-rlhf@v2"]  # the baseline v1 was scored once, when it was the candidate
    assert not second.promoted and store.get_adapter(2).status == "rejected"
    notes = store.get_adapter(2).notes
    assert store.get_adapter(2).parent_version == 1 and notes.startswith("2 pairs; loss=")
    assert "; rejected: CHAIR_s rose 0.100 -> 0.600 (95% interval of the difference [+" in notes
    assert store.get_adapter(2).gate["baseline"] == "policy-v1" and store.promoted_version("llava-rlhf") == 1


def test_a_restarted_trainer_gets_back_only_what_it_never_acknowledged(base_model, store, tmp_path):
    add_corrections(store, 2)
    crashed = OnlineTrainer(settings_for(base_model, tmp_path), store, scorer=lambda name: GOOD)
    assert len(crashed.poll()) == 2  # read, then "killed" before publishing
    add_corrections(store, 1, start=5)
    restarted = OnlineTrainer(settings_for(base_model, tmp_path), store, scorer=lambda name: GOOD)
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
        settings_for(bundled_model, tmp_path, online_share=1.0, online_samples=4), store, scorer=lambda name: GOOD
    )
    result = trainer.run_round(trainer.poll())
    sources = store.get_adapter(result.version).pair_sources
    online = sources.get("online", 0)
    assert sum(sources.values()) == 6 and 1 <= online <= 6, sources  # slots whose samples tied keep their correction
    assert sources.get("correction", 0) == 6 - online


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
    trainer = OnlineTrainer(settings_for(bundled_model, tmp_path, bdhs_per_round=2), store, scorer=lambda name: GOOD)
    pairs = trainer.poll()
    assert pairs == [] and len(trainer.bdhs_candidates) == 2 and trainer.round_due(pairs)  # 2 BDHS pairs due
    result = trainer.run_round(pairs)
    adapter = store.get_adapter(result.version)
    assert adapter.pair_sources == {"bdhs": 2} and adapter.notes.startswith("2 pairs; loss="), adapter.notes
    assert adapter.num_feedback_events == 3 and store.pending_count("trainer") == 0


def test_events_that_support_no_pair_at_all_are_acknowledged_without_a_version(bundled_model, store, tmp_path):
    from training.shapes_world import ShapesWorld

    class NoBDHS(OnlineTrainer):
        def bdhs_pairs(self, policy, processor):
            return []

    add_thumbs_up(store, ShapesWorld(), 2)
    trainer = NoBDHS(settings_for(bundled_model, tmp_path), store, scorer=lambda name: GOOD)
    assert trainer.run_round(trainer.poll()) is None
    assert store.list_adapters() == [] and store.pending_count("trainer") == 0 and trainer.poll() == []


def test_pair_sources_pick_what_a_round_trains_on(base_model, store, tmp_path):
    add_corrections(store, 3)
    trainer = OnlineTrainer(
        settings_for(base_model, tmp_path, pair_sources=frozenset({"thumbs"})), store, scorer=lambda name: GOOD
    )
    assert trainer.poll() == []  # corrections only, and this trainer takes thumbs only
    assert (
        len(
            OnlineTrainer(
                settings_for(base_model, tmp_path, pair_sources=frozenset({"correction"})),
                store,
                scorer=lambda name: GOOD,
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
    trainer = OnlineTrainer(settings, store, scorer=lambda name: scored.append(name) or GOOD)
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
    trainer = OnlineTrainer(settings, store, scorer=lambda name: GOOD)
    assert trainer.run_ppo_round() is None and store.list_adapters() == []


def test_a_gate_that_fails_marks_the_version_and_it_is_gated_again_later(base_model, store, tmp_path):
    import httpx
    import openai

    add_corrections(store, 2)
    down = {"calls": 0}

    def flaky(name: str) -> dict:
        down["calls"] += 1
        if down["calls"] == 1:  # what the scorer raises once the client's retries are spent
            request = httpx.Request("POST", "http://127.0.0.1:8000/v1/chat/completions")
            raise openai.APIConnectionError(message="Server disconnected without sending a response.", request=request)
        return GOOD

    trainer = OnlineTrainer(settings_for(base_model, tmp_path, gate_retry_interval_s=3600), store, scorer=flaky)
    result = trainer.run_round(trainer.poll())
    adapter = store.get_adapter(result.version)
    assert (result.outcome, adapter.status) == ("gate_failed", "gate_failed")
    assert adapter.gate["error"] == "APIConnectionError: Server disconnected without sending a response."
    assert store.pending_count("trainer") == 0  # the events are trained on: published and acknowledged
    assert trainer.gate_pending() == []  # not before gate_retry_interval_s
    trainer.settings = settings_for(base_model, tmp_path, gate_retry_interval_s=0.01)
    time.sleep(0.05)
    assert trainer.gate_pending() == [(1, "promoted")]
    assert store.get_adapter(1).status == "promoted" and store.promoted_version("llava-rlhf") == 1


def test_a_version_a_crash_left_ungated_is_gated_on_start_and_a_superseded_one_rejected(base_model, store, tmp_path):
    from online_rl.adapters import publish_adapter
    from training.lora import language_model_lora
    from training.tiny_llava import load_checkpoint

    model, _ = load_checkpoint(base_model)
    from peft import get_peft_model

    policy = get_peft_model(model, language_model_lora(rank=2))
    adapters = tmp_path / "adapters"
    first = publish_adapter(store, policy, adapters, str(base_model), "dense-dpo")  # published, then "killed"
    stale = publish_adapter(store, policy, adapters, str(base_model), "dense-dpo", parent_version=7)
    trainer = OnlineTrainer(settings_for(base_model, tmp_path), store, scorer=lambda name: GOOD)
    assert trainer.gate_pending() == [(first.version, "promoted"), (stale.version, "rejected")]
    assert [a.status for a in store.list_adapters()] == ["promoted", "rejected"]
    assert store.get_adapter(stale.version).gate["reasons"] == [
        "superseded: trained from policy-v7, the alias serves policy-v1 now"
    ]
    assert not [a for a in store.list_adapters() if a.status in ("candidate", "gate_failed")]


def test_evaluation_records_are_never_training_prompts(store):
    from online_rl.logged_prompts import traffic_prompts
    from training.shapes_world import ShapesWorld

    log_traffic(store, ShapesWorld(), 2)
    record = store.get_generation("traffic-1").model_dump(exclude={"prompt_hash"})
    record["messages"][0]["content"][1]["text"] = "Is there a star in the image?"  # a prompt no user asked
    store.add_generation(GenerationRecord.model_validate({**record, "id": "gate-0", "client": "eval"}))
    assert store.get_generation("gate-0").client == "eval"
    questions = sorted(p.prompt.messages[0]["content"][1]["text"] for p in traffic_prompts(store))
    assert questions == ["Describe the image in detail.", "Is there a moon in the image?"]


def test_a_version_not_served_as_trained_is_rejected_before_its_gate(base_model, store, tmp_path):
    add_corrections(store, 2)
    scored = []
    trainer = OnlineTrainer(
        settings_for(base_model, tmp_path),
        store,
        scorer=lambda name: scored.append(name) or GOOD,
        served_checker=lambda adapter: [f"probe 0: served 'Yes.', expected 'No.' ({adapter.name})"],
    )
    result = trainer.run_round(trainer.poll())
    assert result.outcome == "rejected" and scored == []  # never scored: what users would get is not what was trained
    assert result.reasons == ["not served as trained: probe 0: served 'Yes.', expected 'No.' (policy-v1)"]
    assert store.get_adapter(1).gate["served_check"] == ["probe 0: served 'Yes.', expected 'No.' (policy-v1)"]


def test_gate_suites_pope_and_feedback_holdout_gate_a_version_that_never_trained_on_held_out_pairs(
    base_model, store, tmp_path
):
    import argparse

    from alignloop.cli import settings_flags
    from online_rl.holdout import all_pairs, is_held_out
    from tests.real_data import QUESTIONS, answerer, write_pope

    files, image_dir = write_pope(tmp_path, QUESTIONS)
    add_corrections(store, 12)
    held = [pair for pair in all_pairs(store) if is_held_out(pair, 0.25)]
    assert 0 < len(held) < 12
    parser = argparse.ArgumentParser()
    load = settings_flags(parser, TrainerSettings)
    flags = ["--model", str(base_model), "--adapter-dir", str(tmp_path / "adapters"), "--round-min-pairs", "2"]
    flags += ["--epochs", "1", "--batch-pairs", "2", "--gate-suites", "pope,feedback-holdout"]
    flags += ["--gate-pope-files", ",".join(map(str, files)), "--gate-pope-image-dir", str(image_dir)]
    flags += ["--gate-holdout-share", "0.25"]
    settings = load(parser.parse_args(flags))
    assert settings.gate_suites == ("pope", "feedback-holdout")
    trainer = OnlineTrainer(settings, store, scorer=lambda name: GOOD, answerer=answerer)
    pairs = trainer.poll()
    assert len(pairs) == 12 - len(held) and not [p for p in pairs if is_held_out(p, 0.25)]
    result = trainer.run_round(pairs)
    adapter = store.get_adapter(result.version)
    assert result.promoted, result.reasons
    assert adapter.pair_sources == {"correction": 12 - len(held)} and store.pending_count("trainer") == 0
    differences = adapter.gate["differences"]
    assert set(differences) == {
        "pope/random_accuracy",
        "pope/adversarial_accuracy",
        "pope/f1",
        "feedback-holdout/reward_accuracy",
    }
    assert (differences["pope/random_accuracy"]["baseline"], differences["pope/random_accuracy"]["candidate"]) == (
        0.5,
        0.75,
    )
    holdout = differences["feedback-holdout/reward_accuracy"]
    assert holdout["baseline"] == 0.5  # the base model ties itself on every pair
    assert holdout["low"] <= holdout["difference"] <= holdout["high"]
    suites = adapter.gate["suites"]
    assert suites["feedback-holdout"]["metrics"]["num_pairs"] == len(held) and suites["pope"]["passed"]
    assert adapter.metrics["pope/f1"] == pytest.approx(2 / 3) and "chair_s" not in adapter.metrics
    sample = trainer.metrics.registry.get_sample_value
    assert sample("alignloop_trainer_gate_metric", {"version": adapter.name, "metric": "pope/f1"}) == pytest.approx(
        2 / 3
    )


def test_without_a_judge_prompts_on_real_images_make_no_online_pairs_and_the_trainer_says_so_once(
    base_model, store, tmp_path, caplog
):
    import logging

    add_corrections(store, 2)  # a plain image with no ShapesWorld facts
    trainer = OnlineTrainer(settings_for(base_model, tmp_path, online_share=1.0), store, scorer=lambda name: GOOD)
    with caplog.at_level(logging.INFO, logger="online_rl.trainer"):
        first = trainer.run_round(trainer.poll())
        add_corrections(store, 2, start=10)
        second = trainer.run_round(trainer.poll())
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("phase=online")]
    assert len(notes) == 1 and "judge=none prompts_without_shapes_facts=2" in notes[0]
    assert store.get_adapter(first.version).pair_sources == {"correction": 2}
    assert store.get_adapter(second.version).pair_sources == {"correction": 2}


def test_with_a_judge_mixed_dpo_trains_on_judged_pairs_of_real_images(base_model, store, tmp_path):
    from tests.fake_judge import FakeJudge, response_a

    def shorter_wins(prompt: str, body: dict) -> str:
        first = response_a(prompt)
        second = prompt.split("### Response B\n", 1)[1].split("\n\nFirst give", 1)[0]
        return "Verdict: tie" if len(first) == len(second) else f"Verdict: {'A' if len(first) < len(second) else 'B'}"

    judge = FakeJudge(shorter_wins)
    add_corrections(store, 4)
    settings = settings_for(
        base_model, tmp_path, online_share=1.0, judge_url="http://judge.test/v1", judge_model="judge-model"
    )
    trainer = OnlineTrainer(settings, store, scorer=lambda name: GOOD, judge_http_client=judge.client())
    result = trainer.run_round(trainer.poll())
    sources = store.get_adapter(result.version).pair_sources
    assert sources.get("online", 0) >= 1 and sum(sources.values()) == 4, sources
    assert judge.requests and all(body["model"] == "judge-model" for body in judge.requests)
    assert judge.requests[0]["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png")
