"""Pure scoring functions for ShapesWorld answers: answer parsers, POPE, CHAIR and per-kind accuracy.

Nothing here runs a model. Parsers read free-form model text and return a canonical value (or None when the text
does not give one); scorers compare those values with the ground truth of `training.shapes_world`.

Rules worth knowing:
- Yes/no: the first word decides ("Yes, there is" -> True, "No." -> False); "yes and no" is ambiguous (None).
  Without a leading yes/no, uncertainty ("not sure", "I don't know", "can't tell") is None; otherwise the first
  clause decides: negated ("There is no star.") is False, "There is/are ..." or "I (can) see ..." is True.
- Shape mentions: synonyms and plurals map to the canonical shape ("boxes" -> square). A mention is negated, and
  ignored, when a negation word (no, not, none, nothing, without, neither, nor, never, cannot, any "n't" word)
  comes before it in the same clause. Clauses end at punctuation and at the words but, and, while, whereas,
  although, though, however, yet, except, besides, apart, other, only. So in "no stars or moons" both are negated,
  in "no star, but a moon" the moon counts. Each shape counts once per response.
- CHAIR (RLHF-V's Object HalBench style): chair_s = responses with at least one hallucinated shape / all
  responses; chair_i = hallucinated shape mentions / all shape mentions, pooled over responses; object_recall =
  present shapes mentioned / present shapes, pooled over responses (so scenes with more shapes weigh more).
- POPE: an unparseable answer counts as wrong and as not "yes" (a false negative when the truth is yes).
- A ratio with an empty denominator is 0.0; the counts returned next to it tell that case apart.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from training.shapes_world import CELL_NAMES, COLORS, NUMBER_WORDS, SHAPES, QAItem, Scene

POPE_SETTINGS: tuple[str, ...] = ("random", "popular", "adversarial")
ATTRIBUTE_KINDS: tuple[str, ...] = ("color", "shape", "size")
ANSWER_KINDS: tuple[str, ...] = ("color", "shape", "size", "count", "position", "multiple_choice")

SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disk", "disc", "ball", "ring"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "star": ("star",),
    "heart": ("heart",),
    "cross": ("cross", "plus"),
    "diamond": ("diamond", "rhombus", "lozenge"),
    "moon": ("moon", "crescent"),
}
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}

_YES_WORDS = frozenset({"yes", "yeah", "yep", "true", "correct"})
_NO_WORDS = frozenset({"no", "nope", "false", "incorrect"})
_UNSURE = re.compile(r"\b(?:not sure|unsure|don't know|do not know|cannot tell|can't tell|unclear|uncertain)\b")
_NEGATORS = frozenset({"no", "not", "none", "nothing", "without", "neither", "nor", "never", "cannot"})
_CLAUSE_BREAK = re.compile(
    r"[.,;:!?()\n]|\b(?:but|and|while|whereas|although|though|however|yet|except|besides|apart|other|only)\b"
)
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|\d+")
_NUMBERS: dict[str, int] = {word: value for value, word in enumerate(NUMBER_WORDS)} | {
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
}


def _plurals(word: str) -> tuple[str, ...]:
    if word == "rhombus":
        return ("rhombuses", "rhombi")
    if word == "plus":
        return ("pluses", "plusses")
    return (word + "es",) if word.endswith(("s", "x", "ch", "sh")) else (word + "s",)


_SHAPE_WORDS: dict[str, str] = {
    form: shape for shape, words in SHAPE_SYNONYMS.items() for word in words for form in (word, *_plurals(word))
}
_SIZE_WORDS: dict[str, str] = {word: size for size, words in SIZE_SYNONYMS.items() for word in words}


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower().replace("\u2019", "'"))


def _is_negator(token: str) -> bool:
    return token in _NEGATORS or token.endswith("n't")


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


# ---- parsers ------------------------------------------------------------------------------------------------
def parse_yes_no(text: str) -> bool | None:
    """True for a yes, False for a no, None when the text gives neither or both."""
    tokens = _tokens(text)
    if not tokens:
        return None
    if tokens[0] in _YES_WORDS | _NO_WORDS:
        answer = tokens[0] in _YES_WORDS
        opposite = _NO_WORDS if answer else _YES_WORDS
        rest = tokens[1:3]
        if rest[:1] and (rest[0] in opposite or (rest[0] in ("and", "or") and rest[1:] and rest[1] in opposite)):
            return None
        return answer
    if _UNSURE.search(" ".join(tokens)):
        return None
    first_clause = next(c for c in _CLAUSE_BREAK.split(text.lower().replace("\u2019", "'")) if _TOKEN.search(c))
    head = _TOKEN.findall(first_clause)
    if any(_is_negator(token) for token in head):
        return False
    if head[:2] in (["there", "is"], ["there", "are"]) or head[0] == "there's":
        return True
    if head[:2] == ["i", "see"] or head[:3] == ["i", "can", "see"]:
        return True
    return None


_BARE_YES_NO = re.compile(r"^\s*(yes|no)\s*[.!]?\s*$", re.IGNORECASE)


def opposite_answer(response: str) -> str | None:
    """ "No." for a bare "Yes." (and the reverse), keeping its case and punctuation; None for any other answer."""
    match = _BARE_YES_NO.match(response)
    if match is None:
        return None
    word = match.group(1)
    flipped = {"yes": "no", "no": "yes"}[word.lower()]
    flipped = flipped.capitalize() if word[0].isupper() else flipped
    return response.strip().replace(word, flipped, 1)


def extract_shape_mentions(text: str) -> list[str]:
    """Canonical shapes the text says are there, in order of first mention, each once; negated mentions dropped."""
    found: list[str] = []
    for clause in _CLAUSE_BREAK.split(text.lower().replace("\u2019", "'")):
        negated = False
        for token in _TOKEN.findall(clause):
            if _is_negator(token):
                negated = True
            elif token in _SHAPE_WORDS and not negated and _SHAPE_WORDS[token] not in found:
                found.append(_SHAPE_WORDS[token])
    return found


def _single(values: list[str]) -> str | None:
    distinct = set(values)
    return values[0] if len(distinct) == 1 else None


def parse_color(text: str) -> str | None:
    """The one color the text names; None when it names none or several."""
    return _single([token for token in _tokens(text) if token in COLORS])


def parse_size(text: str) -> str | None:
    """'small' or 'large' (synonyms: little, tiny / big, huge); None when neither or both."""
    return _single([_SIZE_WORDS[token] for token in _tokens(text) if token in _SIZE_WORDS])


def parse_shape(text: str) -> str | None:
    """The one shape the text names (synonyms and plurals allowed); None when it names none or several."""
    mentions = extract_shape_mentions(text)
    return mentions[0] if len(mentions) == 1 else None


def parse_count(text: str) -> int | None:
    """The first number in the text, as digits or a word ("Two." -> 2); "no"/"none" alone mean 0."""
    tokens = _tokens(text)
    for token in tokens:
        if token.isdigit():
            return int(token)
        if token in _NUMBERS:
            return _NUMBERS[token]
    if "no" in tokens or "none" in tokens:
        return 0
    return None


def parse_position(text: str) -> str | None:
    """The grid cell the text names, as a CELL_NAMES entry ("At the top left." -> "top left").

    A row word alone means the middle column ("at the top" -> "top center"), a column word alone the middle row
    ("left" -> "middle left"), and center/centre/middle/central alone the center cell.
    """
    tokens = set(_tokens(text))
    row = 0 if tokens & {"top", "upper"} else 2 if tokens & {"bottom", "lower"} else None
    col = 0 if "left" in tokens else 2 if "right" in tokens else None
    if row is None and col is None:
        return CELL_NAMES[1][1] if tokens & {"center", "centre", "middle", "central"} else None
    return CELL_NAMES[1 if row is None else row][1 if col is None else col]


def parse_choice(text: str, choices: Sequence[str]) -> str | None:
    """The option letter a multiple-choice answer picks ("B", "B.", "(B)", "The answer is B", or an option's text)."""
    letters = "ABCDEFGHIJ"[: len(choices)]
    stripped = text.strip()
    patterns = (
        r"\(?([A-Za-z])\)?[.):]?",  # the whole answer is a letter
        r"(?i:answer|option|choice)(?:\s+is)?\W{0,3}\(?([A-Z])\b",
        r"\(?([A-Z])[.):]",  # a leading "B." / "(B)" / "B)"
    )
    for pattern, match in zip(patterns, (re.fullmatch, re.search, re.match), strict=True):
        found = match(pattern, stripped)
        if found and found.group(1).upper() in letters:
            return found.group(1).upper()
    shapes_said = extract_shape_mentions(stripped)
    words = set(_tokens(stripped))
    named = [
        letter
        for letter, choice in zip(letters, choices, strict=True)
        if (choice in shapes_said if choice in SHAPES else choice.lower() in words)
    ]
    return named[0] if len(named) == 1 else None


# ---- scores -------------------------------------------------------------------------------------------------
def answer_is_correct(item: QAItem, response: str) -> bool:
    """Whether a short answer matches the item's ground truth (every kind except 'description')."""
    if item.kind == "presence":
        return parse_yes_no(response) == (parse_yes_no(item.answer) is True)
    if item.kind == "multiple_choice":
        return parse_choice(response, item.choices or ()) == item.answer
    parsers = {
        "color": parse_color,
        "shape": parse_shape,
        "size": parse_size,
        "count": parse_count,
        "position": parse_position,
    }
    if item.kind not in parsers:
        raise ValueError(f"no short-answer rule for question kind {item.kind!r}")
    parse = parsers[item.kind]
    truth = parse(item.answer)
    if truth is None:
        raise ValueError(f"cannot read the ground truth {item.answer!r} of a {item.kind} question")
    return parse(response) == truth


def _chair(responses: Sequence[str], truths: Sequence[set[str]]) -> dict:
    hallucinated_responses = mentions = hallucinated_mentions = present = present_mentioned = 0
    hallucinated_shapes: Counter[str] = Counter()
    for response, truth in zip(responses, truths, strict=True):
        mentioned = extract_shape_mentions(response)
        wrong = [shape for shape in mentioned if shape not in truth]
        hallucinated_shapes.update(wrong)
        hallucinated_responses += bool(wrong)
        mentions += len(mentioned)
        hallucinated_mentions += len(wrong)
        present += len(truth)
        present_mentioned += len(truth & set(mentioned))
    return {
        "chair_s": _ratio(hallucinated_responses, len(responses)),
        "chair_i": _ratio(hallucinated_mentions, mentions),
        "object_recall": _ratio(present_mentioned, present),
        "num_responses": len(responses),
        "num_hallucinated_responses": hallucinated_responses,
        "num_mentions": mentions,
        "num_hallucinated_mentions": hallucinated_mentions,
        "num_present": present,
        "num_present_mentioned": present_mentioned,
        "hallucinated_shapes": dict(sorted(hallucinated_shapes.items())),
    }


def chair_scores(responses: Sequence[str], scenes: Sequence[Scene]) -> dict:
    """CHAIR-style object hallucination of descriptions; a hallucination is a mentioned shape not in the scene."""
    return _chair(responses, [scene.shapes for scene in scenes])


def pope_scores(predictions: Sequence[bool | None], labels: Sequence[bool]) -> dict:
    """POPE metrics with "yes" as the positive class; None (unparsed) counts as wrong and as not "yes"."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(1 for p, y in pairs if p is True and y)
    fp = sum(1 for p, y in pairs if p is True and not y)
    tn = sum(1 for p, y in pairs if p is False and not y)
    fn = sum(1 for p, y in pairs if p is not True and y)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, len(pairs)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, len(pairs)),
        "unparsed": sum(1 for p, _ in pairs if p is None),
        "n": len(pairs),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def score_items(items: Sequence[QAItem], responses: Sequence[str]) -> dict:
    """Scores answers to ShapesWorld benchmark items into flat metrics, plus a `counts` dict of what was scored.

    Metrics: pope_{random,popular,adversarial}_{accuracy,precision,recall,f1,yes_ratio}, chair_s, chair_i,
    object_recall, attribute_accuracy (color, shape and size questions pooled) and {kind}_accuracy for color,
    shape, size, count, position and multiple_choice. A description's ground-truth shapes are the shapes its
    reference description names, so items must carry noise-free descriptions (as `benchmark_items` makes them).
    """
    if len(items) != len(responses):
        raise ValueError(f"{len(items)} items but {len(responses)} responses")
    metrics: dict = {}
    counts: dict = {}
    for setting in POPE_SETTINGS:
        probes = [(item, r) for item, r in zip(items, responses) if item.kind == "presence" and item.pope == setting]
        labels = [parse_yes_no(item.answer) is True for item, _ in probes]
        pope = pope_scores([parse_yes_no(r) for _, r in probes], labels)
        for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            metrics[f"pope_{setting}_{key}"] = pope[key]
        counts[f"pope_{setting}"] = {key: pope[key] for key in ("n", "unparsed", "tp", "fp", "tn", "fn")}

    descriptions = [(item, r) for item, r in zip(items, responses) if item.kind == "description"]
    chair = _chair([r for _, r in descriptions], [set(extract_shape_mentions(item.answer)) for item, _ in descriptions])
    metrics.update({key: chair[key] for key in ("chair_s", "chair_i", "object_recall")})
    counts["chair"] = {key: value for key, value in chair.items() if key not in metrics}

    correct: dict[str, int] = dict.fromkeys(ANSWER_KINDS, 0)
    asked: dict[str, int] = dict.fromkeys(ANSWER_KINDS, 0)
    for item, response in zip(items, responses):
        if item.kind in asked:
            asked[item.kind] += 1
            correct[item.kind] += answer_is_correct(item, response)
    metrics["attribute_accuracy"] = _ratio(
        sum(correct[kind] for kind in ATTRIBUTE_KINDS), sum(asked[kind] for kind in ATTRIBUTE_KINDS)
    )
    for kind in ANSWER_KINDS:
        metrics[f"{kind}_accuracy"] = _ratio(correct[kind], asked[kind])
    counts["questions"] = asked
    return {**metrics, "counts": counts}
