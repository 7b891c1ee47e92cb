"""The paired gate by hand: per-scene tallies of real benchmark items, ratios, bootstrap intervals, decisions."""

import pytest

from training.evaluation.paired import GATE_METRICS, decide, paired_difference, ratio, scene_tallies
from training.shapes_world import QAItem


def tallies(chair, recall=None, pope=None) -> dict:
    """Tallies for len(chair) scenes: chair[i] = 1 if scene i's description hallucinates; recall/pope as [n, d]."""
    n = len(chair)
    return {
        "scenes": list(range(n)),
        "chair_s": [[c, 1] for c in chair],
        "object_recall": recall or [[2, 2]] * n,
        "pope_adversarial_accuracy": pope or [[1, 1]] * n,
    }


def test_scene_tallies_of_real_items():
    items = [
        QAItem("description", "Describe.", "There are two objects. There is a red star. There is a blue moon."),
        QAItem("presence", "Is there a heart?", "No.", target="heart", pope="adversarial"),
        QAItem("presence", "Is there a star?", "Yes.", target="star", pope="random"),  # not adversarial: not tallied
        QAItem("description", "Describe.", "There is one object. There is a green square."),
        QAItem("presence", "Is there a triangle?", "No.", target="triangle", pope="adversarial"),
    ]
    responses = ["A red star and a heart.", "Yes.", "Yes.", "A green square.", "No."]
    result = scene_tallies(items, responses, [7, 7, 7, 9, 9])
    assert result == {
        "scenes": [7, 9],
        "chair_s": [[1, 1], [0, 1]],  # scene 7 names a heart that is not there
        "object_recall": [[1, 2], [1, 1]],  # the star of (star, moon); the square
        "pope_adversarial_accuracy": [[0, 1], [1, 1]],
    }
    assert ratio(result["object_recall"]) == 2 / 3 and ratio([]) == 0.0


def test_identical_answers_differ_by_exactly_zero():
    same = tallies([0, 1, 0, 0, 1, 0])
    difference = paired_difference(same, same, "chair_s")
    assert (difference.difference, difference.low, difference.high) == (0.0, 0.0, 0.0)
    assert decide(same, same).passed


def test_a_candidate_worse_on_every_scene_is_rejected_with_its_interval():
    baseline, candidate = tallies([0] * 20), tallies([1] * 20)
    difference = paired_difference(candidate, baseline, "chair_s")
    assert (difference.candidate, difference.baseline, difference.low, difference.high) == (1.0, 0.0, 1.0, 1.0)
    decision = decide(candidate, baseline)
    assert not decision.passed
    assert decision.reasons == ["CHAIR_s rose 0.000 -> 1.000 (95% interval of the difference [+1.000, +1.000])"]
    assert decision.as_dict()["differences"]["chair_s"]["difference"] == 1.0


def test_noise_alone_does_not_reject_but_a_clear_recall_drop_does():
    # One scene of 40 loses an object: recall 80/80 -> 79/80, within what resampling moves.
    baseline = tallies([0] * 40)
    one_miss = tallies([0] * 40, recall=[[2, 2]] * 39 + [[1, 2]])
    small = paired_difference(one_miss, baseline, "object_recall")
    assert small.difference == pytest.approx(-1 / 80) and small.low < 0 and small.high == 0.0
    assert decide(one_miss, baseline).passed
    # Every description drops one of its two objects: 40/80 against 80/80.
    halved = tallies([0] * 40, recall=[[1, 2]] * 40)
    decision = decide(halved, baseline)
    assert not decision.passed and decision.reasons[0].startswith("object recall fell 1.000 -> 0.500")


def test_the_interval_contains_the_point_difference_and_narrows_with_more_scenes():
    pattern = [1, 0, 0, 1, 0, 0, 0, 1, 0, 0]
    better = [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    small = paired_difference(tallies(better), tallies(pattern), "chair_s")
    large = paired_difference(tallies(better * 10), tallies(pattern * 10), "chair_s")
    assert small.difference == pytest.approx(-0.2) and small.low <= small.difference <= small.high
    assert large.difference == pytest.approx(-0.2)
    assert (large.high - large.low) < (small.high - small.low)
    assert large.high < 0  # with 100 scenes the improvement is certain


def test_a_margin_lets_a_small_certain_loss_pass():
    baseline, candidate = tallies([0] * 20), tallies([0] * 20, recall=[[19, 20]] * 20)  # recall 0.95, everywhere
    strict = decide(candidate, baseline)
    lenient_metrics = [m if m.name != "object_recall" else type(m)(m.name, m.label, True, 0.06) for m in GATE_METRICS]
    assert not strict.passed and decide(candidate, baseline, lenient_metrics).passed


def test_scenes_must_match():
    with pytest.raises(ValueError, match="same scenes"):
        paired_difference(tallies([0, 1]), tallies([0, 1, 0]), "chair_s")
