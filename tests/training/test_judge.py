"""The rule judge on hand-made scenes and answers: what it calls wrong, and the minimal corrections it writes."""

from __future__ import annotations

import pytest

from training.evaluation.judge import Judgement, ShapesRuleJudge, correct_description
from training.shapes_world import QAItem, Scene, SceneObject


@pytest.fixture
def scene() -> Scene:
    # row, col: (1, 0) is the middle left, (1, 1) the center, (2, 0) the bottom left.
    objects = (
        SceneObject("moon", "red", "small", 1, 0),
        SceneObject("moon", "orange", "small", 1, 1),
        SceneObject("cross", "green", "large", 2, 0),
    )
    return Scene("test", 0, objects)


TRUE_DESCRIPTION = (
    "There are three objects. A small red moon is at the middle left. A small orange moon is in the center. "
    "A large green cross is at the bottom left."
)


def test_a_true_description_is_correct_and_needs_no_correction(scene):
    judgement = ShapesRuleJudge().judge(scene, QAItem("description", "Describe.", ""), TRUE_DESCRIPTION)
    assert judgement.correct and judgement.hallucinated == () and judgement.correction is None


def test_a_hallucinated_object_is_deleted_and_the_count_fixed(scene):
    response = (
        "There are four objects. A small red moon is at the middle left. A small yellow star is at the top left. "
        "A small orange moon is in the center. A large green cross is at the bottom left."
    )
    judgement = ShapesRuleJudge().judge(scene, QAItem("description", "Describe.", ""), response)
    assert not judgement.correct
    assert judgement.hallucinated == ("star",)
    assert judgement.correction == TRUE_DESCRIPTION


def test_a_hallucinated_object_is_replaced_by_the_object_the_answer_left_out(scene):
    response = (
        "There are three objects. A small red moon is at the middle left. A small yellow star is at the top left. "
        "A large green cross is at the bottom left."
    )
    judgement = ShapesRuleJudge().judge(scene, QAItem("description", "Describe.", ""), response)
    assert judgement.hallucinated == ("star",)
    assert judgement.correction == TRUE_DESCRIPTION  # the star's sentence now names the orange moon, in its place


def test_a_correction_describes_as_many_objects_as_its_count_says(scene):
    # The answer counts right but names two objects; deleting the star would leave a promise of three and two listed.
    response = (
        "There are three objects. A small red moon is at the middle left. A small yellow star is at the top left."
    )
    corrected, hallucinated = correct_description(scene, response)
    assert hallucinated == ("star",)
    assert corrected == (
        "There are three objects. A small red moon is at the middle left. A small orange moon is in the center. "
        "A large green cross is at the bottom left."
    )


def test_a_wrong_attribute_is_rewritten_and_true_sentences_are_kept_verbatim(scene):
    response = (
        "There are three objects. A small red moon is at the middle left. A small blue cross is at the top right."
    )
    corrected, hallucinated = correct_description(scene, response)
    assert hallucinated == ()
    assert corrected == (
        "There are three objects. A small red moon is at the middle left. A large green cross is at the bottom left. "
        "A small orange moon is in the center."
    )


def test_two_objects_that_look_alike_are_both_kept():
    twins = Scene("test", 0, (SceneObject("moon", "red", "small", 0, 0), SceneObject("moon", "red", "small", 2, 2)))
    response = "There are two objects. A small red moon is at the top left. A small red moon is at the bottom right."
    assert correct_description(twins, response) == (response, ())
    tripled = response + " A small red moon is at the top left."
    assert correct_description(twins, tripled) == (response, ())  # a third sentence about them repeats one: deleted


def test_two_moons_are_told_apart_by_color(scene):
    corrected, _ = correct_description(scene, "A small orange moon is at the top left.")
    assert corrected == "A small orange moon is in the center."


def test_an_answer_with_nothing_true_left_becomes_the_clean_description(scene):
    corrected, hallucinated = correct_description(scene, "There is one object. A large blue heart is at the top left.")
    assert hallucinated == ("heart",)
    assert corrected == TRUE_DESCRIPTION


@pytest.mark.parametrize(
    ("item", "response", "correct"),
    [
        (QAItem("presence", "Is there a star in the image?", "No.", "star"), "Yes, there is a star.", False),
        (QAItem("presence", "Is there a star in the image?", "No.", "star"), "No.", True),
        (QAItem("color", "What color is the cross?", "Green.", "cross"), "It is green.", True),
        (QAItem("count", "How many objects are there?", "Three.", None), "Four.", False),
    ],
)
def test_short_answers_are_judged_by_the_truth_and_corrected_to_it(scene, item, response, correct):
    judgement = ShapesRuleJudge().judge(scene, item, response)
    assert judgement.correct is correct
    assert judgement.correction == (None if correct else item.answer)


def test_the_score_ranks_fewer_hallucinations_higher(scene):
    judge, item = ShapesRuleJudge(), QAItem("description", "Describe.", "")
    one = "There are four objects. A small red moon is at the middle left. A small yellow star is at the top left."
    two = one + " A large blue heart is at the top right."
    assert judge.score(scene, item, TRUE_DESCRIPTION) == 1.0
    assert judge.score(scene, item, one) == -1.0
    assert judge.score(scene, item, two) == -2.0


def test_an_object_left_out_is_not_an_error_but_a_correction_describes_it(scene):
    judge, item = ShapesRuleJudge(), QAItem("description", "Describe.", "")
    omits = (
        "There are three objects. A small red moon is at the middle left. A large green cross is at the bottom left."
    )
    assert judge.judge(scene, item, omits) == Judgement(True, (), None)
    wrong = omits.replace("large green cross", "large blue cross")
    assert judge.judge(scene, item, wrong).correction == omits + " A small orange moon is in the center."


def test_deleting_corrections_drop_the_hallucinated_sentence_and_add_nothing(scene):
    response = (
        "There are three objects. A small red moon is at the middle left. A small yellow star is at the top left."
    )
    deleted = "There are three objects. A small red moon is at the middle left."
    assert correct_description(scene, response, complete=False) == (deleted, ("star",))
    judgement = ShapesRuleJudge(complete_corrections=False).judge(
        scene, QAItem("description", "Describe.", ""), response
    )
    assert (judgement.correct, judgement.correction) == (False, deleted)
