"""The rule judge: grades an answer about a ShapesWorld image against the scene's ground truth, and corrects it.

It is what a careful human rater would do with perfect eyesight, so it serves two roles:
- the feedback simulator's honest rater (thumbs from `Judgement.correct`, RLHF-V-style corrections from
  `Judgement.correction`);
- the judge of online pairs for images whose facts are known.

A description is correct when every sentence is true of the scene. Its correction is a minimal edit in the spirit of
RLHF-V's fine-grained corrections: a sentence about an object that is not there is replaced by one about an object the
answer left out (deleted when it left none out), a sentence about a present object is rewritten to that object's true
attributes and place, and the count sentence states the true count, with the objects it counts all described;
sentences that were already right are left as they are, so the token diff marks only the hallucinated segments.
A short answer is correct when it parses to the truth (`answer_is_correct`); its correction is the exact answer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from training.evaluation.metrics import answer_is_correct, extract_shape_mentions, parse_color, parse_size
from training.shapes_world import (
    CELL_NAMES,
    COLORS,
    DESCRIBE_PROMPT,
    NUMBER_WORDS,
    SHAPES,
    SIZES,
    QAItem,
    Scene,
    SceneObject,
    ShapesWorld,
    object_sentence,
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
COUNT_SENTENCE = re.compile(r"^\s*there (?:is|are)\s+(\w+)\s+objects?\b", re.IGNORECASE)
_OBJECT_FACT = re.compile(r"^There is an? (\w+) (\w+) (\w+) at the ([a-z ]+)\.$")
_CELLS = {name: (row, col) for row, names in enumerate(CELL_NAMES) for col, name in enumerate(names)}


@dataclasses.dataclass(frozen=True)
class Judgement:
    correct: bool
    hallucinated: tuple[str, ...]  # shapes the answer names that the scene does not hold (descriptions)
    correction: str | None  # the minimally corrected answer; None when the answer is already correct


def split_sentences(text: str) -> list[str]:
    """The sentences of an answer, in order."""
    return [sentence for sentence in _SENTENCE_END.split(text.strip()) if sentence]


def count_sentence(scene: Scene) -> str:
    n = len(scene.objects)
    return f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} object{'s' if n != 1 else ''}."


def _matching_object(scene: Scene, sentence: str, shape: str, used: set[int]) -> SceneObject | None:
    """The scene's object of `shape`, not yet described, that the sentence most likely means (by its color, then
    size); None when every object of that shape is described already."""
    candidates = [obj for i, obj in enumerate(scene.objects) if obj.shape == shape and i not in used]
    color, size = parse_color(sentence), parse_size(sentence)
    for key, value in (("color", color), ("size", size)):
        narrowed = [obj for obj in candidates if getattr(obj, key) == value]
        if narrowed:
            candidates = narrowed
    return candidates[0] if candidates else None


def correct_description(scene: Scene, response: str, complete: bool = True) -> tuple[str, tuple[str, ...]]:
    """(corrected text, hallucinated shapes) for a description of the scene.

    Each sentence is read in order: the count sentence gets the true count; a sentence about a present object keeps
    its words when they are true and becomes the object's true sentence otherwise; a sentence about an object that
    is not there (or about an object already described) is replaced by the true sentence of an object the answer
    leaves out, in the scene's order, and deleted when the answer names every object already. When the answer has a
    count sentence, the objects still left out are added at the end: the correction describes as many objects as
    its count says, so a corrected answer never teaches stopping short. With `complete=False` such sentences are
    only deleted and nothing is added (a correction can then count more objects than it describes)."""
    verdicts: list[tuple[str, str | None]] = []  # ("count" | "absent" | "repeat" | "kept", the sentence to keep)
    hallucinated: list[str] = []
    used: set[int] = set()
    for sentence in split_sentences(response):
        shapes = extract_shape_mentions(sentence)
        absent = [shape for shape in shapes if shape not in scene.shapes]
        if COUNT_SENTENCE.match(sentence):
            verdicts.append(("count", None))
        elif absent:
            hallucinated += absent
            verdicts.append(("absent", None))
        elif len(shapes) != 1:
            verdicts.append(("kept", sentence))  # nothing checkable (or several objects): left as the user wrote it
        else:
            obj = _matching_object(scene, sentence, shapes[0], used)
            if obj is None:
                verdicts.append(("repeat", None))
            else:
                used.add(scene.objects.index(obj))
                truth = object_sentence(obj)
                verdicts.append(("kept", sentence if sentence.strip().lower() == truth.lower() else truth))
    left_out = [obj for i, obj in enumerate(scene.objects) if i not in used]
    corrected = []
    for verdict, kept in verdicts:
        if verdict == "count":
            corrected.append(count_sentence(scene))
        elif verdict == "kept":
            corrected.append(kept)
        elif complete and left_out:  # a sentence about an absent object, or a repeat: another object takes its place
            corrected.append(object_sentence(left_out.pop(0)))
    if complete and any(verdict == "count" for verdict, _ in verdicts):  # the count promises every object
        corrected += [object_sentence(obj) for obj in left_out]
    if not any(extract_shape_mentions(s) for s in corrected):  # nothing true was left: the clean description
        corrected = [count_sentence(scene)] + [object_sentence(obj) for obj in scene.objects]
    return " ".join(corrected), tuple(dict.fromkeys(hallucinated))


def scene_from_facts(facts: Sequence[str]) -> Scene | None:
    """The scene graph behind ShapesWorld's fact sentences ("There is a small red star at the top left."), as the
    simulator registers them for each image; None when no sentence describes an object."""
    objects = []
    for fact in facts:
        match = _OBJECT_FACT.match(fact.strip())
        if match is None:
            continue
        size, color, shape, where = match.groups()
        if size in SIZES and color in COLORS and shape in SHAPES and where in _CELLS:
            objects.append(SceneObject(shape, color, size, *_CELLS[where]))
    return Scene("facts", 0, tuple(objects)) if objects else None


def item_for_question(world: ShapesWorld, scene: Scene, question: str) -> QAItem | None:
    """The judgeable question a user asked, with its true answer for the scene: a detailed description, or a
    presence probe about one shape; None for anything else."""
    question = question.strip()
    if question == DESCRIBE_PROMPT:
        return QAItem(
            "description",
            DESCRIBE_PROMPT,
            " ".join([count_sentence(scene)] + [object_sentence(o) for o in scene.objects]),
        )
    for shape in SHAPES:
        item = world.presence_item(shape, shape in scene.shapes)
        if item.question == question:
            return item
    return None


class ShapesRuleJudge:
    """Judges answers to ShapesWorld questions by the scene's ground truth. A description is correct when no sentence
    needs an edit (an object left out is not an error); its correction is `correct_description`'s, `complete` or
    deleting only."""

    def __init__(self, complete_corrections: bool = True):
        self.complete_corrections = complete_corrections

    def judge(self, scene: Scene, item: QAItem, response: str) -> Judgement:
        if item.kind == "description":
            edited, hallucinated = correct_description(scene, response, complete=False)
            if " ".join(edited.split()) == " ".join(response.split()):
                return Judgement(True, hallucinated, None)
            if self.complete_corrections:
                edited, _ = correct_description(scene, response, complete=True)
            return Judgement(False, hallucinated, edited)
        if answer_is_correct(item, response):
            return Judgement(True, (), None)
        return Judgement(False, (), item.answer)

    def score(self, scene: Scene, item: QAItem, response: str) -> float:
        """A reward for ranking answers: 1 for a correct one; for a wrong description, less per hallucination."""
        judgement = self.judge(scene, item, response)
        if judgement.correct:
            return 1.0
        return -float(len(judgement.hallucinated)) if item.kind == "description" else 0.0


def best_and_worst(scores: Sequence[float], answers: Sequence[str]) -> tuple[int, int] | None:
    """Indices of the best- and worst-scored answers; None when they tie or say the same thing."""
    best, worst = scores.index(max(scores)), scores.index(min(scores))
    if scores[best] == scores[worst] or answers[best].strip() == answers[worst].strip():
        return None
    return best, worst
