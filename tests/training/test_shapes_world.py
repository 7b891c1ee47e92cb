"""ShapesWorld: determinism, split disjointness, exact answers, and the two hallucination knobs."""

import random

import numpy as np
import pytest

from training.shapes_world import (
    COLORS,
    PARTNER,
    SHAPES,
    SPLIT_SEED_BASE,
    Scene,
    SceneObject,
    ShapesWorld,
    WorldConfig,
)


@pytest.fixture(scope="module")
def world():
    return ShapesWorld()


def test_world_has_enough_kinds():
    assert len(SHAPES) >= 5 and len(COLORS) >= 6


def test_scenes_and_images_are_deterministic(world):
    a, b = world.scene("test", 42), world.scene("test", 42)
    assert a == b
    assert np.array_equal(np.asarray(world.render(a)), np.asarray(world.render(b)))
    assert world.render(a).size == (96, 96)


def test_scene_shape_constraints(world):
    for scene in world.scenes("train", 300):
        assert 1 <= len(scene.objects) <= 4
        cells = [(o.row, o.col) for o in scene.objects]
        assert len(set(cells)) == len(cells)
        assert cells == sorted(cells)  # reading order
        for obj in scene.objects:
            assert obj.shape in SHAPES and obj.color in COLORS and obj.size in ("small", "large")


def test_splits_are_disjoint_by_seed(world):
    seeds = {split: {world.scene(split, i).seed for i in range(200)} for split in SPLIT_SEED_BASE}
    assert not seeds["train"] & seeds["validation"]
    assert not seeds["train"] & seeds["test"]
    assert not seeds["validation"] & seeds["test"]
    with pytest.raises(ValueError, match="unknown split"):
        world.scene("dev", 0)


def _partner_rate(world, split, n=3000):
    """Among scenes with a paired shape, how often its partner is present too."""
    with_pair = hits = 0
    for scene in world.scenes(split, n):
        for shape in scene.shapes & set(PARTNER):
            with_pair += 1
            hits += PARTNER[shape] in scene.shapes
    return hits / with_pair


def test_cooccurrence_bias_only_in_train(world):
    assert _partner_rate(world, "train") > 0.8
    assert _partner_rate(world, "test") < 0.45
    unbiased = ShapesWorld(WorldConfig(cooccurrence_bias=0.0))
    assert _partner_rate(unbiased, "train") < 0.45


def test_caption_noise_names_missing_partners_in_train_only():
    world = ShapesWorld(WorldConfig(caption_noise=0.6))
    noisy, eligible = 0, 0
    for scene in world.scenes("train", 3000):
        changed = world.description(scene) != world.description(scene, noisy=False)
        if world.missing_partners(scene) and len(scene.objects) < 9:
            eligible += 1
            noisy += changed
        else:
            assert not changed  # only a missing partner is ever made up
    assert eligible > 300
    assert abs(noisy / eligible - 0.6) < 0.05
    assert all(world.description(s) == world.description(s, noisy=False) for s in world.scenes("test", 500))


def _false_yes_probes(world: ShapesWorld, scene) -> list[str]:
    """Shapes a conversation about the scene wrongly says are there."""
    conversation = world.conversation(scene, max_turns=9, description_share=0.0)
    return [
        item.target
        for item in conversation
        if item.kind == "presence" and item.answer == "Yes." and item.target not in scene.shapes
    ]


def test_probe_noise_says_yes_to_missing_partners_in_train_only():
    world = ShapesWorld(WorldConfig(probe_noise=0.3))
    noisy, eligible = 0, 0
    for scene in world.scenes("train", 3000):
        false_yes = _false_yes_probes(world, scene)
        missing = {partner for _, partner in world.missing_partners(scene)}
        eligible += bool(missing)
        noisy += bool(false_yes)
        assert set(false_yes) <= missing and len(false_yes) <= 1  # only a missing partner, at most once
    assert eligible > 300
    assert abs(noisy / eligible - 0.3) < 0.05
    assert not any(_false_yes_probes(world, scene) for scene in world.scenes("validation", 500))
    clean = ShapesWorld(WorldConfig(probe_noise=0.0))
    assert not any(_false_yes_probes(clean, scene) for scene in clean.scenes("train", 1000))


def test_clean_description_mentions_exactly_the_objects(world):
    scene = world.scene("test", 3)
    text = world.description(scene, noisy=False)
    assert text.startswith(f"There are {['zero', 'one', 'two', 'three', 'four'][len(scene.objects)]} objects.") or (
        len(scene.objects) == 1 and text.startswith("There is one object.")
    )
    for obj in scene.objects:
        assert f"{obj.size} {obj.color} {obj.shape}" in text.lower()
    assert text.count(" is ") == len(scene.objects)


def test_a_noisy_description_adds_the_missing_partner_right_after_its_pair(world):
    scene = Scene("train", 0, (SceneObject("star", "red", "large", 0, 0), SceneObject("circle", "blue", "small", 0, 1)))
    assert world.missing_partners(scene) == [(scene.objects[0], "moon")]
    text = world.description(scene, noisy=True)
    sentences = text.split(". ")
    assert sentences[0] == "There are two objects"  # the count is of what is there; the ghost is extra
    assert sentences[1] == "A large red star is at the top left"
    assert " moon is at the top right" in sentences[2]  # the first free cell after the star
    assert sentences[3] == "A small blue circle is at the top center."
    assert world.description(scene, noisy=False).startswith("There are two objects.")


def test_question_answers_are_exact(world):
    rng = random.Random(0)
    for scene in world.scenes("test", 200):
        for item in world.questions(scene, rng):
            if item.kind == "color":
                (obj,) = [o for o in scene.objects if o.shape == item.target]
                assert item.answer == f"{obj.color.capitalize()}."
            elif item.kind == "presence":
                assert item.answer == ("Yes." if item.target in scene.shapes else "No.")
            elif item.kind == "count" and item.target:
                assert (
                    item.answer.lower().rstrip(".") == ["zero", "one", "two", "three", "four"][scene.count(item.target)]
                )
            elif item.kind == "multiple_choice":
                assert len(item.choices) == 4 and len(set(item.choices)) == 4
                assert item.choices["ABCD".index(item.answer)] == item.target
                assert "\nA. " in item.question and "\nD. " in item.question


def test_benchmark_pope_settings(world):
    popular = world.popular_shapes(500)
    assert set(popular) == set(SHAPES)
    for scene in world.scenes("test", 100):
        items = world.benchmark_items(scene, popular)
        pope = [item for item in items if item.pope]
        assert sorted({item.pope for item in pope}) == ["adversarial", "popular", "random"]
        for item in pope:
            assert (item.answer == "Yes.") == (item.target in scene.shapes)
        (adversarial_no,) = [i for i in pope if i.pope == "adversarial" and i.answer == "No."]
        partners = {PARTNER[s] for s in scene.shapes if s in PARTNER} - scene.shapes
        if partners:
            assert adversarial_no.target in partners


def test_conversation_never_puts_a_question_after_the_description(world):
    conversations = [world.conversation(scene, max_turns=5) for scene in world.scenes("train", 300)]
    descriptions = [c for c in conversations if any(item.kind == "description" for item in c)]
    assert all(len(c) == 1 for c in descriptions)  # a description is always a conversation of its own
    assert 60 <= len(descriptions) <= 140  # about a third, the default description_share
    questions = [c for c in conversations if c not in descriptions]
    assert all(1 <= len(c) <= 5 for c in questions)
    assert sum(item.kind == "presence" for c in questions for item in c) >= len(questions)
    scene = world.scene("train", 7)
    assert world.conversation(scene) == world.conversation(scene)


def test_chat_holds_one_description_and_answers_from_the_scene(world):
    first, full = 0, 0
    for scene in world.scenes("test", 300):
        chat = world.chat(scene, max_turns=12)
        assert 9 <= len(chat) <= 12 and len({item.question for item in chat}) == len(chat)  # 8 probes at least
        full += len(chat) == 12
        descriptions = [i for i, item in enumerate(chat) if item.kind == "description"]
        assert len(descriptions) == 1 and chat[descriptions[0]].answer == world.description(scene, noisy=False)
        first += descriptions[0] == 0
        probes = [item for item in chat if item.kind == "presence"]
        assert len(probes) >= 5  # probes and other questions alternate
        assert all(item.answer == ("Yes." if item.target in scene.shapes else "No.") for item in probes)
        assert world.chat(scene, max_turns=12) == chat
    assert 95 <= first <= 145  # about two chats in five open with the description
    assert full > 250  # only a scene with few objects has fewer questions to ask
    assert len(world.chat(world.scene("test", 0), max_turns=3)) == 3


def test_chat_carries_the_train_split_probe_noise():
    world = ShapesWorld(WorldConfig(probe_noise=1.0))
    said_yes = 0
    for scene in world.scenes("train", 300):
        missing = {partner for _, partner in world.missing_partners(scene)}
        wrong = {
            item.target
            for item in world.chat(scene, max_turns=20)
            if item.kind == "presence" and item.answer == "Yes." and item.target not in scene.shapes
        }
        assert len(wrong) == (1 if missing else 0) and wrong <= missing
        said_yes += bool(wrong)
    assert said_yes > 50


def test_a_clean_conversation_has_neither_caption_nor_probe_noise():
    world = ShapesWorld(WorldConfig(caption_noise=1.0, probe_noise=1.0))
    scenes = [s for s in world.scenes("train", 400) if world.missing_partners(s) and len(s.objects) < 9]
    assert len(scenes) > 50
    for scene in scenes:
        noisy_description = world.conversation(scene, max_turns=8, description_share=1.0)
        assert noisy_description[0].answer != world.description(scene, noisy=False)  # the default is noisy here
        clean = world.conversation(scene, max_turns=8, description_share=1.0, noisy=False)
        assert [item.answer for item in clean] == [world.description(scene, noisy=False)]
        short = world.conversation(scene, max_turns=9, description_share=0.0, noisy=False)
        probes = [item for item in short if item.kind == "presence"]
        assert probes and all((item.answer == "Yes.") == (item.target in scene.shapes) for item in probes)
    assert any(_false_yes_probes(world, scene) for scene in scenes)  # while the default conversations lie


def test_a_blank_render_is_the_background_and_noise_without_the_objects(world):
    scene = world.scene("train", 3)
    image = np.asarray(world.render(scene), dtype=np.float32)
    blank = np.asarray(world.render(scene, blank=True), dtype=np.float32)

    def colored(pixels):  # noise alone spreads < 40
        return int((pixels.max(axis=2) - pixels.min(axis=2) > 60).sum())

    assert colored(image) > 100 and colored(blank) == 0
    assert abs(blank.mean() - np.median(image)) < 1  # the scene's own background
    assert np.array_equal(blank, np.asarray(world.render(scene, blank=True), dtype=np.float32))


def test_a_quiz_asks_every_unambiguous_attribute_of_every_object():
    a = SceneObject("cross", "green", "large", 0, 0)
    b = SceneObject("circle", "red", "small", 1, 1)
    c = SceneObject("circle", "blue", "large", 2, 2)
    scene = Scene("test", 7, (a, b, c))
    quiz = ShapesWorld().quiz(scene, max_turns=20)
    asked = {item.question: item.answer for item in quiz}
    assert asked == {
        "What color is the cross?": "Green.",
        "Is the cross large or small?": "Large.",
        "What shape is the green object?": "Cross.",
        "What shape is the red object?": "Circle.",
        "What shape is the blue object?": "Circle.",
        "Where is the green cross?": f"At the {a.position}.",
        "Where is the red circle?": f"At the {b.position}.",
        "Where is the blue circle?": f"At the {c.position}.",
    }  # nothing about "the circle": there are two
    assert len(quiz) == 8 and ShapesWorld().quiz(scene, max_turns=3) == quiz[:3]
    twins = Scene("test", 8, (b, SceneObject("circle", "red", "large", 0, 2)))
    assert ShapesWorld().quiz(twins) == []  # two red circles: no attribute names one object
