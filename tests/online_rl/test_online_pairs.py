"""Judged online pairs and Mixed-DPO: which logged prompts can be judged, how a pair is picked from samples, how
slots are mixed, and sampling from the bundled model end to end on a SQLite store."""

from __future__ import annotations

import io
import random

import pytest

from online_rl.logged_prompts import JudgeablePrompt, judgeable_prompts
from online_rl.online_pairs import judged_pair, mixed_pairs, online_pairs
from online_rl.pairs import PreferencePair
from online_rl.schema import FactsRecord, GenerationRecord
from online_rl.store import open_store
from tests.online_rl.store_helpers import image_message
from training.evaluation.judge import ShapesRuleJudge
from training.shapes_world import DESCRIBE_PROMPT, ShapesWorld


@pytest.fixture
def sqlite_store(tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        yield store


def log_prompt(store, world: ShapesWorld, index: int, question: str, with_facts: bool = True, gid: str | None = None):
    """Stores scene `index`'s image, a generation asking `question` about it and (optionally) the scene's facts."""
    scene = world.scene("validation", index)
    buffer = io.BytesIO()
    world.render(scene).save(buffer, format="PNG")
    sha = store.put_image(buffer.getvalue())
    record = GenerationRecord(
        id=gid or f"gen-{index}-{len(question)}",
        alias="llava-rlhf",
        messages=image_message(sha, question),
        response="x",
        user_id="u-sim",
    )
    store.add_generation(record)
    if with_facts:
        store.add_facts(FactsRecord(image_sha256=sha, facts=world.facts(scene), source="user"))
    return scene, record


def test_only_prompts_with_facts_and_a_judgeable_question_are_kept(sqlite_store):
    world = ShapesWorld()
    scene, _ = log_prompt(sqlite_store, world, 1, DESCRIBE_PROMPT)
    _, probed = log_prompt(sqlite_store, world, 2, "Is there a moon in the image?")
    log_prompt(sqlite_store, world, 3, "Describe the image in detail.", with_facts=False)
    log_prompt(sqlite_store, world, 4, "What color is the star?")  # graded by no rule here
    log_prompt(sqlite_store, world, 1, DESCRIBE_PROMPT, gid="gen-repeat")  # the same prompt again
    prompts = {p.record.id: p for p in judgeable_prompts(sqlite_store, world)}
    assert len(prompts) == 2 and probed.id in prompts
    (first,) = [p for p in prompts.values() if p.item.kind == "description"]
    assert first.scene.objects == scene.objects
    probe_scene = world.scene("validation", 2)
    assert prompts[probed.id].item.answer == ("Yes." if "moon" in probe_scene.shapes else "No.")


def test_a_judged_pair_is_the_best_against_the_worst_sample(sqlite_store):
    world = ShapesWorld()
    scene, record = log_prompt(sqlite_store, world, 5, DESCRIBE_PROMPT)
    (prompt,) = judgeable_prompts(sqlite_store, world)
    truth = world.description(scene, noisy=False)
    one_ghost = world.description(scene, noisy=True)
    pair = judged_pair(prompt, [one_ghost, truth, one_ghost], ShapesRuleJudge(), adapter_version=3)
    assert (pair.chosen, pair.rejected, pair.source, pair.adapter_version) == (truth, one_ghost, "online", 3)
    assert pair.messages == tuple(record.messages)
    assert judged_pair(prompt, [truth, truth], ShapesRuleJudge()) is None
    assert judged_pair(prompt, [one_ghost, one_ghost + " "], ShapesRuleJudge()) is None


def _pair(name: str) -> PreferencePair:
    return PreferencePair((), name, "r", "correction", None, None, ())


def test_mixed_dpo_replaces_each_slot_by_an_online_pair_with_the_given_probability():
    offline = [_pair(f"offline-{i}") for i in range(200)]
    made = []

    def make_online(n: int) -> list[PreferencePair]:
        made.append(n)
        return [_pair(f"online-{i}") for i in range(n)]

    mixed = mixed_pairs(offline, make_online, random.Random(0), online_share=0.5)
    online = [p for p in mixed if p.chosen.startswith("online")]
    assert len(mixed) == 200 and made == [len(online)] and 80 <= len(online) <= 120
    assert [p for p in mixed if p.chosen.startswith("offline")] == [p for p in offline if p in mixed]
    assert mixed_pairs(offline, make_online, random.Random(0), online_share=0.0) == offline
    short = mixed_pairs(offline[:10], lambda n: [_pair("online-only")], random.Random(1), online_share=1.0)
    assert [p.chosen for p in short] == ["online-only"] + [f"offline-{i}" for i in range(1, 10)]


def test_the_bundled_model_samples_answers_that_the_judge_ranks(sqlite_store, bundled_model):
    import torch

    from training.tiny_llava import load_checkpoint

    world = ShapesWorld()
    for index in range(6):
        log_prompt(sqlite_store, world, 100 + index, DESCRIBE_PROMPT)
    model, processor = load_checkpoint(bundled_model)
    torch.manual_seed(0)
    pairs = online_pairs(model, processor, sqlite_store, count=3, rng=random.Random(0), samples=4)
    assert pairs, "four samples of six descriptions were all judged alike"
    judge, prompts = ShapesRuleJudge(), {p.record.prompt_hash: p for p in judgeable_prompts(sqlite_store, world)}
    for pair in pairs:
        prompt: JudgeablePrompt = prompts[
            GenerationRecord(id="x", alias="a", messages=list(pair.messages), user_id="u").prompt_hash
        ]
        assert judge.score(prompt.scene, prompt.item, pair.chosen) > judge.score(
            prompt.scene, prompt.item, pair.rejected
        )


def log_real_prompt(store, question: str = "Describe the image in detail.") -> GenerationRecord:
    """A photo-like image with a user's facts (no ShapesWorld scene) and a correction of an answer about it."""
    from online_rl.schema import FeedbackEvent
    from tests.online_rl.store_helpers import png_bytes

    sha = store.put_image(png_bytes((120, 60, 30), size=24))
    store.add_facts(FactsRecord(image_sha256=sha, facts=["A brown dog lies on a red sofa."], source="user"))
    record = GenerationRecord(
        id="real-0", alias="llava-rlhf", messages=image_message(sha, question), response="A cat.", user_id="u-1"
    )
    store.add_generation(record)
    store.add_feedback(FeedbackEvent(generation_id="real-0", correction="A dog on a sofa.", user_id="u-1"))
    return record


def test_an_llm_judge_ranks_samples_on_images_without_shapesworld_facts(sqlite_store, monkeypatch, caplog):
    import logging

    from online_rl.logged_prompts import open_prompts
    from tests.fake_judge import FakeJudge, response_a
    from training.evaluation.pair_judge import LLMPairJudge

    record = log_real_prompt(sqlite_store)
    (prompt,) = open_prompts(sqlite_store, ShapesWorld())
    assert prompt.facts == ("A brown dog lies on a red sofa.",) and prompt.corrections == ("A dog on a sofa.",)
    assert judgeable_prompts(sqlite_store, ShapesWorld()) == []  # the rule judge cannot grade it
    truth, ghost = "A dog sleeps on a red sofa.", "A dog and a cat on a red sofa."
    monkeypatch.setattr(
        "online_rl.online_pairs.sample_answers", lambda policy, processor, messages, image, n, budget: [ghost, truth]
    )
    server = FakeJudge(lambda text, _: f"Verdict: {'B' if 'cat' in response_a(text) else 'A'}")
    judge = LLMPairJudge.connect("http://judge.test/v1", "judge-model", http_client=server.client())
    (pair,) = online_pairs(None, None, sqlite_store, count=3, rng=random.Random(0), judge=judge, adapter_version=2)
    assert (pair.chosen, pair.rejected, pair.source, pair.adapter_version) == (truth, ghost, "online", 2)
    assert pair.messages == tuple(record.messages) and len(server.requests) == 2
    asked = server.requests[0]["messages"][0]["content"][1]["text"]
    assert "- A brown dog lies on a red sofa." in asked and "- A dog on a sofa." in asked
    # no judge: no pair, and nobody is asked
    assert online_pairs(None, None, sqlite_store, count=3, rng=random.Random(0)) == []
    # a judge that is down: no pair, one line
    down = LLMPairJudge.connect("http://127.0.0.1:9/v1", "judge-model")
    with caplog.at_level(logging.WARNING, logger="online_rl.online_pairs"):
        assert online_pairs(None, None, sqlite_store, count=3, rng=random.Random(0), judge=down) == []
    (line,) = [r.getMessage() for r in caplog.records if r.name == "online_rl.online_pairs"]
    assert line.startswith("online pairs judge=unreachable prompts=1 error='the pair judge is not reachable")
