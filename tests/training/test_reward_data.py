"""Reward-model pairs: which questions are rated, the kind weights, and the cache round trip."""

from __future__ import annotations

import random

import pytest

from training.reward_data import (
    RewardPair,
    kind_weights,
    load_pairs,
    rated_questions,
    save_pairs,
    shapes_reward_pairs,
)
from training.shapes_world import DESCRIBE_PROMPT, QAItem, ShapesWorld
from training.tiny_llava import load_checkpoint


def test_a_scene_missing_a_partner_is_probed_about_that_partner():
    world = ShapesWorld()
    scene = next(s for s in world.scenes("train", 200) if world.missing_partners(s))
    missing = {partner for _, partner in world.missing_partners(scene)}
    items = rated_questions(world, scene, random.Random(0))
    assert [item.kind for item in items] == ["description"] + ["presence"] * (1 + len(scene.shapes))
    assert items[0].question == DESCRIBE_PROMPT
    assert items[1].target in missing and items[1].answer == "No."
    # and one about each shape that is there, so "no" is not always the preferred answer
    assert [(item.target, item.answer) for item in items[2:]] == [(shape, "Yes.") for shape in sorted(scene.shapes)]


def test_presence_probes_are_sampled_probe_samples_times(monkeypatch):
    import types

    from training import reward_data

    asked = []

    def fake_generate(policy, processor, prompts, temperature):  # every answer the same: no pairs, only the asking
        asked.extend(prompt.messages[0]["content"][1]["text"] for prompt in prompts)
        return types.SimpleNamespace(texts=["Yes."] * len(prompts))

    monkeypatch.setattr(reward_data, "generate", fake_generate)
    world = ShapesWorld()
    scene = world.scene("train", 0)
    assert shapes_reward_pairs(None, None, world, "train", 1, samples=2, probe_samples=5) == []
    probes = len(rated_questions(world, scene, random.Random(0))) - 1  # which absent shape does not change the count
    assert asked.count(DESCRIBE_PROMPT) == 2
    assert len(asked) == 2 + 5 * probes and probes == 1 + len(scene.shapes)


def test_kind_weights_give_every_kind_the_same_total_weight_and_average_one_up_to_a_cap():
    kinds = ["presence_absent"] * 6 + ["presence_present"] * 2 + ["description_object"] * 4
    weights = kind_weights(kinds)
    # 12 pairs, 3 kinds: 12 / (3 * 6), 12 / (3 * 2), 12 / (3 * 4)
    assert weights == pytest.approx({"presence_absent": 2 / 3, "presence_present": 2.0, "description_object": 1.0})
    assert 6 * weights["presence_absent"] == 2 * weights["presence_present"] == 4 * weights["description_object"]
    assert sum(weights[kind] for kind in kinds) / len(kinds) == pytest.approx(1.0)
    assert kind_weights(["presence_absent"] * 5) == {"presence_absent": 1.0}
    # a kind with 1 pair of 41 would weigh 41 / 3 = 13.7: capped at 4 (the others as before: 41 / 90, 41 / 30)
    rare = kind_weights(["presence_absent"] * 30 + ["presence_present"] * 10 + ["description_detail"])
    assert rare == pytest.approx({"presence_absent": 41 / 90, "presence_present": 41 / 30, "description_detail": 4.0})
    assert kind_weights(["a"] * 3 + ["b"], max_weight=1.5) == pytest.approx({"a": 2 / 3, "b": 1.5})
    assert kind_weights([]) == {}


def test_the_cache_round_trip_keeps_every_field_and_shares_images(tmp_path):
    world = ShapesWorld()
    image = world.render(world.scene("validation", 0))
    messages = ({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},)
    pairs = [
        RewardPair(messages, "a", "b", ("There is one object in the image.",), image, kind)
        for kind in ("description", "presence")
    ]
    save_pairs(pairs, tmp_path / "pairs")
    assert len(list((tmp_path / "pairs" / "images").iterdir())) == 1
    loaded = load_pairs(tmp_path / "pairs")
    assert [(p.messages, p.chosen, p.rejected, p.facts, p.kind) for p in loaded] == [
        (p.messages, p.chosen, p.rejected, p.facts, p.kind) for p in pairs
    ]
    assert loaded[0].image.tobytes() == image.tobytes()
    assert not list(tmp_path.glob(".pairs.tmp"))


def test_sampled_pairs_put_the_hallucinating_answer_second(bundled_model):
    from training.evaluation.judge import ShapesRuleJudge

    model, processor = load_checkpoint(bundled_model)
    world, judge = ShapesWorld(), ShapesRuleJudge()
    pairs = shapes_reward_pairs(model, processor, world, "train", 12, samples=4)
    kinds = {"description_object", "description_detail", "presence_absent", "presence_present"}
    assert pairs and {p.kind for p in pairs} <= kinds
    scenes = {tuple(world.facts(s)): s for s in world.scenes("train", 12)}
    for pair in pairs:
        scene = scenes[pair.facts]
        question = pair.messages[0]["content"][1]["text"]  # "Is there a <shape> in the image?" for a probe
        item = (
            QAItem("description", DESCRIBE_PROMPT, "")
            if pair.kind.startswith("description")
            else world.presence_item(question.split()[3], pair.kind == "presence_present")
        )
        assert judge.score(scene, item, pair.chosen) > judge.score(scene, item, pair.rejected)
        if pair.kind.startswith("presence"):
            assert (question.split()[3] in scene.shapes) == (pair.kind == "presence_present")
        else:  # labelled by what is wrong with the rejected description
            assert bool(judge.judge(scene, item, pair.rejected).hallucinated) == (pair.kind == "description_object")
