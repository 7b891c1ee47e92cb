"""Hand-made cases for the pure scoring functions of training.evaluation.metrics."""

import random

import pytest

from training.evaluation.metrics import (
    SHAPE_SYNONYMS,
    SIZE_SYNONYMS,
    answer_is_correct,
    chair_scores,
    extract_shape_mentions,
    parse_choice,
    parse_color,
    parse_count,
    parse_position,
    parse_shape,
    parse_size,
    parse_yes_no,
    pope_scores,
    score_items,
)
from training.shapes_world import DESCRIBE_PROMPT, SHAPES, SIZES, QAItem, Scene, SceneObject, ShapesWorld


def scene_of(*shapes: str) -> Scene:
    objects = tuple(SceneObject(shape, "red", "small", i // 3, i % 3) for i, shape in enumerate(shapes))
    return Scene("test", 0, objects)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes.", True),
        ("yes, there is", True),
        ("Yes! There is a star.", True),
        ("No", False),
        ("  NO!", False),
        ("No, there is no star.", False),
        ("Nope", False),
        ("There is no star.", False),
        ("There isn't a moon in the image.", False),
        ("There is a star.", True),
        ("There is a star but no moon.", True),
        ("I see a star, not a moon.", True),
        ("There are two stars.", True),
        ("I can see a heart.", True),
        ("Yes and no", None),
        ("yes/no", None),
        ("Not sure.", None),
        ("I don't know.", None),
        ("A red star.", None),
        ("", None),
        ("   ", None),
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) is expected


def test_synonym_tables_cover_the_world():
    assert set(SHAPE_SYNONYMS) == set(SHAPES) and set(SIZE_SYNONYMS) == set(SIZES)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A red star and a blue moon.", ["star", "moon"]),
        ("Two stars, three crosses and some boxes.", ["star", "cross", "square"]),
        ("A disk, a disc, a ball and a ring.", ["circle"]),
        ("A plus sign next to a crescent.", ["cross", "moon"]),
        ("A rhombus, two lozenges and rhombi.", ["diamond"]),
        ("A BLOCK and a Triangle.", ["square", "triangle"]),
        ("Start with the hearty starter.", []),
        ("A star-shaped sticker.", ["star"]),
        ("There is no star.", []),
        ("no moons", []),
        ("There are no stars or moons, but there is a crescent.", ["moon"]),
        ("I don't see any hearts, only a triangle.", ["triangle"]),
        ("There is a square and no circle.", ["square"]),
        ("Neither a star nor a moon.", []),
        ("The star is not red.", ["star"]),
    ],
)
def test_extract_shape_mentions(text, expected):
    assert extract_shape_mentions(text) == expected


def test_chair_counts_absent_shapes_as_hallucinations():
    shapes = [("star", "moon"), ("circle", "square"), ("triangle",), ("heart", "diamond")]
    scenes = [scene_of(*s) for s in shapes]
    responses = [
        "A red star is at the top left and a blue moon is in the center.",  # 2 mentions, both right
        "I see a disk, two boxes and a heart.",  # circle, square right; heart hallucinated
        "There is a triangle. There is no star.",  # the negated star is not a mention
        "Two stars.",  # star hallucinated; heart and diamond missed
    ]
    scores = chair_scores(responses, scenes)
    assert scores["chair_s"] == pytest.approx(2 / 4)
    assert scores["chair_i"] == pytest.approx(2 / 7)
    assert scores["object_recall"] == pytest.approx(5 / 7)  # pooled: 2 + 2 + 1 + 0 of 2 + 2 + 1 + 2
    assert scores["num_mentions"] == 7
    assert scores["num_hallucinated_responses"] == 2
    assert scores["hallucinated_shapes"] == {"heart": 1, "star": 1}


def test_chair_with_no_mentions_is_zero_not_an_error():
    scores = chair_scores(["", "Nothing here."], [scene_of("star"), scene_of("moon")])
    assert (scores["chair_s"], scores["chair_i"], scores["object_recall"]) == (0.0, 0.0, 0.0)


def test_pope_scores_hand_computed():
    predictions = [True, True, False, None, False, True]
    labels = [True, False, False, True, True, True]
    scores = pope_scores(predictions, labels)
    # tp = 2 (0, 5), fp = 1 (1), tn = 1 (2), fn = 2 (3 unparsed, 4)
    assert (scores["tp"], scores["fp"], scores["tn"], scores["fn"]) == (2, 1, 1, 2)
    assert scores["accuracy"] == pytest.approx(3 / 6)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx(4 / 7)
    assert scores["yes_ratio"] == pytest.approx(3 / 6)
    assert scores["unparsed"] == 1


def test_pope_unparsed_negative_is_wrong():
    scores = pope_scores([None, None], [False, False])
    assert scores["accuracy"] == 0.0 and scores["yes_ratio"] == 0.0 and scores["precision"] == 0.0


CHOICES = ("green", "blue", "red", "yellow")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("b", "B"),
        ("B) blue", "B"),
        ("The answer is B.", "B"),
        ("Answer: (C)", "C"),
        ("blue", "B"),
        ("It is red.", "C"),
        ("A yellow one.", "D"),  # 'A' is an article here, the option text decides
        ("red or blue", None),
        ("E", None),
        ("purple", None),
        ("", None),
    ],
)
def test_parse_choice(text, expected):
    assert parse_choice(text, CHOICES) == expected


def test_parse_choice_accepts_shape_synonyms():
    assert parse_choice("It is a crescent.", ("circle", "moon", "heart", "square")) == "B"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Two.", 2), ("2", 2), ("There are 3 stars.", 3), ("Zero.", 0), ("There are no stars.", 0), ("Many.", None)],
)
def test_parse_count(text, expected):
    assert parse_count(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("top left", "top left"),
        ("At the top left.", "top left"),
        ("top-left corner", "top left"),
        ("In the upper right.", "top right"),
        ("in the center", "center"),
        ("At the center.", "center"),
        ("middle left", "middle left"),
        ("At the bottom center.", "bottom center"),
        ("at the bottom", "bottom center"),
        ("Somewhere.", None),
    ],
)
def test_parse_position(text, expected):
    assert parse_position(text) == expected


def test_attribute_parsers():
    assert parse_color("It is blue.") == "blue"
    assert parse_color("Blue or red.") is None
    assert parse_size("It is big.") == "large"
    assert parse_size("Tiny.") == "small"
    assert parse_shape("It is a box.") == "square"
    assert parse_shape("A star and a moon.") is None


@pytest.mark.parametrize(
    ("item", "response", "expected"),
    [
        (QAItem("count", "How many objects are there?", "Two."), "2", True),
        (QAItem("count", "How many objects are there?", "Two."), "Three.", False),
        (QAItem("position", "Where is the red star?", "At the top left."), "top left", True),
        (QAItem("position", "Where is the red star?", "At the center."), "in the center", True),
        (QAItem("position", "Where is the red star?", "At the top left."), "top right", False),
        (QAItem("shape", "What shape is the red object?", "Circle."), "A disk.", True),
        (QAItem("color", "What color is the star?", "Red."), "red", True),
        (QAItem("size", "Is the star large or small?", "Large."), "Small.", False),
        (QAItem("presence", "Is there a star in the image?", "No."), "There is no star.", True),
        (QAItem("presence", "Is there a star in the image?", "Yes."), "Hmm.", False),
        (QAItem("multiple_choice", "...", "C", choices=CHOICES), "(C)", True),
    ],
)
def test_answer_is_correct(item, response, expected):
    assert answer_is_correct(item, response) is expected


def test_score_items_gives_perfect_scores_to_the_reference_answers():
    world = ShapesWorld()
    popular = world.popular_shapes(sample=200)
    items = [item for scene in world.scenes("test", 12) for item in world.benchmark_items(scene, popular)]
    scores = score_items(items, [item.answer for item in items])
    metrics = {key: value for key, value in scores.items() if key != "counts"}
    expected = dict.fromkeys(metrics, 1.0) | {"chair_s": 0.0, "chair_i": 0.0}
    expected |= {f"pope_{setting}_yes_ratio": 0.5 for setting in ("random", "popular", "adversarial")}
    assert metrics == expected
    assert scores["counts"]["pope_random"]["n"] == 24


def test_score_items_hand_made():
    items = [
        QAItem("description", DESCRIBE_PROMPT, "There is one object. A small red star is in the center."),
        QAItem("presence", "Is there a star in the image?", "Yes.", "star", "random"),
        QAItem("presence", "Is there a moon in the image?", "No.", "moon", "random"),
        QAItem("color", "What color is the star?", "Red.", "star"),
        QAItem("size", "Is the star large or small?", "Small.", "star"),
        QAItem("count", "How many objects are there?", "One."),
    ]
    responses = ["A red star and a moon.", "Yes.", "Yes.", "Red.", "Large.", "1"]
    scores = score_items(items, responses)
    assert scores["chair_s"] == 1.0 and scores["chair_i"] == pytest.approx(1 / 2) and scores["object_recall"] == 1.0
    assert scores["pope_random_accuracy"] == pytest.approx(1 / 2) and scores["pope_random_yes_ratio"] == 1.0
    assert scores["attribute_accuracy"] == pytest.approx(1 / 2)
    assert scores["count_accuracy"] == 1.0
    assert scores["position_accuracy"] == 0.0 and scores["counts"]["questions"]["position"] == 0


def test_score_items_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="1 items but 0 responses"):
        score_items([QAItem("count", "How many objects are there?", "One.")], [])


def test_reference_answers_parse_for_every_world_question():
    world = ShapesWorld()
    rng = random.Random(0)
    for scene in world.scenes("validation", 50):
        for item in world.questions(scene, rng):
            if item.kind != "description":
                assert answer_is_correct(item, item.answer), item
