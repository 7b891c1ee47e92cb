"""POPE on real-format files: the official answer parsing and metrics on a hand-made answer list, question files with
rendered images scored by a fake model, per-image tallies, and one clear line for each kind of bad file."""

import pytest

from tests.real_data import ANSWERS, QUESTIONS, write_pope
from training.evaluation.models import ChatRequest
from training.evaluation.pope import (
    evaluate_pope,
    first_images,
    format_table,
    load_pope,
    parse_pope_answer,
    pope_metrics,
    pope_report,
)

# (answer, label): what the official rule reads, and why
HAND_MADE = [
    ("Yes, there is a dog in the image.", True),  # yes: TP
    ("No.", False),  # no: TN
    ("There is no cat.", True),  # "no" is a word: FN
    ("Yes", False),  # FP
    ("Not really, but. No", False),  # the first sentence is "Not really but": "Not" is not "not", so yes: FP
    ("I do not see one. Yes.", False),  # "not" in the first sentence: TN
    ("Yes. No.", True),  # only the first sentence counts: TP
    ("No, there isn't.", False),  # commas dropped, "No": TN
]


def test_the_official_parsing_and_formulas_on_a_hand_made_list():
    predictions = [parse_pope_answer(answer) for answer, _ in HAND_MADE]
    assert predictions == [True, False, False, True, True, False, True, False]
    metrics = pope_metrics(predictions, [label for _, label in HAND_MADE])
    assert (metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"]) == (2, 2, 3, 1)
    # POPE's evaluate.py: acc = (TP+TN)/all, precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = 2PR/(P+R),
    # yes_ratio = share of "yes" predictions
    assert metrics["accuracy"] == 5 / 8
    assert metrics["precision"] == 2 / 4
    assert metrics["recall"] == 2 / 3
    assert metrics["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)) == pytest.approx(4 / 7)
    assert metrics["yes_ratio"] == 4 / 8
    assert pope_metrics([False, False], [False, False])["precision"] == 0.0  # the official code divides by zero


class ByObject:
    def __init__(self, answers: dict[str, str]):
        self.answers, self.requests = answers, []

    def answer(self, requests: list[ChatRequest]) -> list[str]:
        self.requests += requests
        return [self.answers[r.question.split("Is there a ")[1].split(" in")[0]] for r in requests]


def test_question_files_with_images_are_scored_per_setting_and_tallied_per_image(tmp_path):
    files, image_dir = write_pope(tmp_path, QUESTIONS)
    items = load_pope(files, image_dir)
    assert [i.setting for i in items] == ["random"] * 4 + ["adversarial"] * 3 and items[0].label is True
    model = ByObject(ANSWERS)
    report = evaluate_pope(model, items, question_suffix=" Answer yes or no.", chunk_size=3, progress=False)
    assert model.requests[0].question == "Is there a dog in the image? Answer yes or no."
    assert model.requests[0].image.size == (32, 24) and model.requests[0].max_tokens == 32
    # random: TP dog, TN zebra, FN car, TN kite -> acc 3/4, precision 1/1, recall 1/2, F1 2/3, yes-ratio 1/4
    assert (report["random_accuracy"], report["random_precision"], report["random_recall"]) == (0.75, 1.0, 0.5)
    assert report["random_f1"] == pytest.approx(2 / 3) and report["random_yes_ratio"] == 0.25
    # adversarial: FP cat, TN truck, TP bench -> acc 2/3, precision 1/2, recall 1, F1 2/3, yes-ratio 2/3
    assert report["adversarial_accuracy"] == pytest.approx(2 / 3) and report["adversarial_precision"] == 0.5
    assert report["adversarial_recall"] == 1.0 and report["adversarial_yes_ratio"] == pytest.approx(2 / 3)
    # F1 over both: TP 2, FP 1, FN 1 -> 4/6
    assert report["f1"] == pytest.approx(2 / 3) and report["counts"]["random"] == {
        "n": 4,
        "tp": 1,
        "fp": 0,
        "tn": 2,
        "fn": 1,
    }
    assert report["per_scene"] == {
        "scenes": ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg", "COCO_val2014_000000000003.jpg"],
        "random_accuracy": [[2, 2], [1, 2], [0, 0]],
        "adversarial_accuracy": [[0, 1], [1, 1], [1, 1]],
        "f1": [[2, 3], [0, 1], [2, 2]],  # [2 TP, 2 TP + FP + FN] per image
    }
    assert "random" in format_table(report) and len(first_images(items, 1)) == 3  # image 1's questions


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("{not json", "line 1 is not valid JSON"),
        ('{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?"}', "line 1 lacks the key(s) label"),
        (
            '{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "maybe"}',
            "label must be yes or no",
        ),
        (
            '{"question_id": 1, "image": "COCO_val2014_000000000009.jpg", "text": "Is there a dog?", "label": "yes"}',
            "line 1: image COCO_val2014_000000000009.jpg is not in",
        ),
    ],
)
def test_a_bad_question_file_is_one_clear_line(tmp_path, line, fragment):
    path = tmp_path / "coco_pope_popular.json"
    path.write_text(line + "\n")
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"coco_pope_popular\.json") as error:
        load_pope([path], tmp_path)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_two_files_of_one_setting_are_refused(tmp_path):
    files, image_dir = write_pope(tmp_path, {"a_random.json": QUESTIONS["coco_pope_random.json"]})
    files.append(tmp_path / "b_random.json")
    files[1].write_text(files[0].read_text())
    with pytest.raises(ValueError, match="are both POPE random files"):
        load_pope(files, image_dir)


def test_the_report_of_no_answers_per_setting_is_zero_not_an_error():
    assert pope_report([], [])["per_scene"] == {"scenes": [], "f1": []}
