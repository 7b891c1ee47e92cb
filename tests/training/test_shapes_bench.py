"""The ShapesWorld benchmark with fake chat models: an oracle scores perfectly, always-yes gets 0.5 on POPE."""

import json
import re

import pytest

from training.evaluation.shapes_bench import evaluate_shapes, format_table, write_chart, write_json
from training.shapes_world import DESCRIBE_PROMPT, NUMBER_WORDS, PLURALS, Scene, ShapesWorld

NUM_IMAGES = 24
SYNONYM = {"circle": "disk", "square": "box", "cross": "plus sign", "moon": "crescent"}


class OracleModel:
    """Answers from the scene graph: finds the scene by its rendered image, then reads the question."""

    def __init__(self, world: ShapesWorld, split: str, count: int):
        self.scenes = {world.render(scene).tobytes(): scene for scene in world.scenes(split, count)}

    def answer(self, requests):
        return [self._answer(self.scenes[r.image.tobytes()], r.question) for r in requests]

    def _answer(self, scene: Scene, question: str) -> str:
        question, *options = question.split("\n")
        if options:  # multiple choice: "A. red" lines, then the instruction
            value = self._answer(scene, question).rstrip(".").split()[-1]
            letter = next(line[0] for line in options[:-1] if line[3:] == value)
            return f"({letter})"
        if question == DESCRIBE_PROMPT:
            return " ".join(f"I see a {o.color} {SYNONYM.get(o.shape, o.shape)}." for o in scene.objects)
        if m := re.fullmatch(r"Is there a (\w+) in the image\?", question):
            return "Yes, there is." if m[1] in scene.shapes else f"No, there is no {m[1]}."
        if m := re.fullmatch(r"What color is the (\w+)\?", question):
            return f"It is {next(o.color for o in scene.objects if o.shape == m[1])}."
        if m := re.fullmatch(r"Is the (\w+) large or small\?", question):
            return "Big." if next(o.size for o in scene.objects if o.shape == m[1]) == "large" else "Tiny."
        if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
            shape = next(o.shape for o in scene.objects if o.color == m[1])
            return f"A {SYNONYM.get(shape, shape)}."
        if m := re.fullmatch(r"What shape is at the (.+)\?", question):
            return next(o.shape for o in scene.objects if o.position == m[1])
        if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
            position = next(o.position for o in scene.objects if (o.color, o.shape) == (m[1], m[2]))
            return "In the center." if position == "center" else position
        if question == "How many objects are there?":
            return str(len(scene.objects))
        if m := re.fullmatch(r"How many (\w+) are there\?", question):
            shape = next(s for s, plural in PLURALS.items() if plural == m[1])
            return f"{NUMBER_WORDS[scene.count(shape)].capitalize()}."
        raise AssertionError(f"unexpected question {question!r}")


class AlwaysYesModel:
    def answer(self, requests):
        return ["Yes." for _ in requests]


@pytest.fixture(scope="module")
def world():
    return ShapesWorld()


@pytest.fixture(scope="module")
def oracle_report(world):
    oracle = OracleModel(world, "test", NUM_IMAGES)
    return evaluate_shapes(oracle, world, "test", NUM_IMAGES, progress=False, scenes_per_call=5)


def test_oracle_scores_perfectly(oracle_report):
    report = oracle_report
    for setting in ("random", "popular", "adversarial"):
        assert report[f"pope_{setting}_accuracy"] == 1.0
        assert report[f"pope_{setting}_f1"] == 1.0
        assert report[f"pope_{setting}_yes_ratio"] == 0.5
    assert report["chair_s"] == 0.0 and report["chair_i"] == 0.0 and report["object_recall"] == 1.0
    for kind in ("attribute", "color", "shape", "size", "count", "position", "multiple_choice"):
        assert report[f"{kind}_accuracy"] == 1.0, kind
    questions = report["counts"]["questions"]
    assert all(questions[kind] > 0 for kind in ("color", "shape", "size", "count", "position", "multiple_choice"))
    assert report["num_images"] == NUM_IMAGES and report["split"] == "test"
    assert report["counts"]["pope_adversarial"]["n"] == 2 * NUM_IMAGES


def test_samples_are_kept_apart_from_the_metrics(oracle_report):
    samples = oracle_report["samples"]
    assert {s["kind"] for s in samples} >= {"description", "presence", "count"}
    assert all(set(s) == {"scene", "kind", "question", "answer", "response"} for s in samples)
    assert sum(1 for s in samples if s["kind"] == "presence") == 2


def test_always_yes_gets_half_on_pope(world):
    report = evaluate_shapes(AlwaysYesModel(), world, "validation", 10, progress=False)
    for setting in ("random", "popular", "adversarial"):
        assert report[f"pope_{setting}_accuracy"] == 0.5
        assert report[f"pope_{setting}_yes_ratio"] == 1.0
        assert report[f"pope_{setting}_recall"] == 1.0
        assert report[f"pope_{setting}_precision"] == 0.5
    assert report["chair_s"] == 0.0 and report["object_recall"] == 0.0


def test_wrong_number_of_answers_is_an_error(world):
    class Silent:
        def answer(self, requests):
            return []

    with pytest.raises(RuntimeError, match="returned 0 answers"):
        evaluate_shapes(Silent(), world, "test", 1, progress=False)


def test_table_json_and_chart(oracle_report, tmp_path):
    table = format_table(oracle_report)
    assert "adversarial" in table and "chair_s" in table and "multiple_choice" in table
    write_json(oracle_report, tmp_path / "out" / "report.json")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["chair_s"] == 0.0
    write_chart(oracle_report, tmp_path / "out" / "chart.png")
    assert (tmp_path / "out" / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
