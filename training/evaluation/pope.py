"""POPE on real images: the official question files, answered by a chat model, scored as the official evaluation.

POPE (Li et al., EMNLP 2023) asks "Is there a <object> in the image?" about COCO val2014 images, half of them about
objects that are there. Its question files are JSONL, one file per setting (`coco_pope_random.json`,
`coco_pope_popular.json`, `coco_pope_adversarial.json`), one question a line:
`{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
"label": "yes"}`. A file's setting is read from its name (random, popular or adversarial; else the file's stem).

Scoring follows the official evaluation (POPE's `evaluate.py`, the same in LLaVA's `eval_pope.py`): keep the answer
up to its first ".", drop commas, split on spaces; the answer is "no" when a word is exactly "No", "no" or "not",
else "yes" (so "NO" reads as yes, as in that code). With "yes" as the positive class: accuracy, precision, recall,
F1 and the yes-ratio (the share answered yes). A ratio with an empty denominator is 0.0, where the official code
would divide by zero.

For the paired gate (`training.evaluation.paired`), each image contributes a tally per metric: each setting's
accuracy (right answers, questions) and F1 over all settings, as F1 = 2 TP / (2 TP + FP + FN) is a ratio of sums.
An image's questions are answered from the same look at it, so the bootstrap resamples images, not questions.

    alignloop eval --benchmark pope --pope-files pope/coco_pope_random.json,pope/coco_pope_adversarial.json \\
        --image-dir coco/val2014 --endpoint http://localhost:8000/v1 --served-model llava-rlhf
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from training.evaluation.models import ChatModel, ChatRequest

logger = logging.getLogger(__name__)

POPE_SETTINGS: tuple[str, ...] = ("random", "popular", "adversarial")
POPE_KEYS: tuple[str, ...] = ("accuracy", "precision", "recall", "f1", "yes_ratio")
REQUIRED_KEYS: tuple[str, ...] = ("question_id", "image", "text", "label")
POPE_MAX_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class PopeItem:
    """One POPE question: its setting, the image file, the question and whether the truth is yes."""

    setting: str
    question_id: str
    image: str
    image_path: Path
    question: str
    label: bool


def setting_of(path: Path) -> str:
    """The POPE setting a question file holds, from its name: random, popular or adversarial; else its stem."""
    return next((setting for setting in POPE_SETTINGS if setting in path.stem.lower()), path.stem)


def load_pope(files: Sequence[str | Path], image_dir: str | Path) -> list[PopeItem]:
    """Reads and checks POPE question files; raises ValueError naming the file, the line and what is wrong: not
    JSON, a missing key, a label other than yes/no, an image that is not in image_dir, or two files of one
    setting."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image directory {image_dir} does not exist")
    items: list[PopeItem] = []
    seen: dict[str, Path] = {}
    for path in map(Path, files):
        if not path.is_file():
            raise FileNotFoundError(f"POPE question file {path} does not exist")
        setting = setting_of(path)
        if setting in seen:
            raise ValueError(f"{path} and {seen[setting]} are both POPE {setting} files")
        seen[setting] = path
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not valid JSON ({error})") from error
            if not isinstance(entry, dict):
                raise ValueError(f"{path}: line {number} is a {type(entry).__name__}, not an object")
            missing = [key for key in REQUIRED_KEYS if key not in entry]
            if missing:
                raise ValueError(f"{path}: line {number} lacks the key(s) {', '.join(missing)}")
            label = str(entry["label"]).strip().lower()
            if label not in ("yes", "no"):
                raise ValueError(f"{path}: line {number}: label must be yes or no, not {entry['label']!r}")
            image_path = image_dir / str(entry["image"])
            if not image_path.is_file():
                raise ValueError(f"{path}: line {number}: image {entry['image']} is not in {image_dir}")
            items.append(
                PopeItem(
                    setting,
                    str(entry["question_id"]),
                    str(entry["image"]),
                    image_path,
                    str(entry["text"]),
                    label == "yes",
                )
            )
    if not items:
        raise ValueError(f"no POPE questions in {', '.join(map(str, files)) or 'no files'}")
    return items


def first_images(items: Sequence[PopeItem], images: int) -> list[PopeItem]:
    """The questions about the first `images` distinct images, in file order (0: every question)."""
    if not images:
        return list(items)
    kept = set(list(dict.fromkeys(item.image for item in items))[:images])
    return [item for item in items if item.image in kept]


def parse_pope_answer(text: str) -> bool:
    """True for "yes", False for "no", by the official rule: the text up to its first ".", without commas, split on
    spaces, is "no" when it holds the word "No", "no" or "not"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return not ("No" in words or "not" in words or "no" in words)


def pope_metrics(predictions: Sequence[bool], labels: Sequence[bool]) -> dict:
    """The official POPE metrics of yes (True) / no (False) predictions against the labels, with the counts."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(1 for p, y in pairs if p and y)
    fp = sum(1 for p, y in pairs if p and not y)
    tn = sum(1 for p, y in pairs if not p and not y)
    fn = sum(1 for p, y in pairs if not p and y)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / len(pairs) if pairs else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / len(pairs) if pairs else 0.0,
        "n": len(pairs),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def pope_report(items: Sequence[PopeItem], answers: Sequence[str]) -> dict:
    """Each setting's official metrics (`{setting}_{accuracy,precision,recall,f1,yes_ratio}`), counts, and the
    per-image tallies for the paired gate: `{setting}_accuracy` and `f1` (pooled over the settings)."""
    predictions = [parse_pope_answer(answer) for answer in answers]
    settings = list(dict.fromkeys(item.setting for item in items))
    report: dict = {"num_questions": len(items), "settings": settings}
    counts = {}
    for setting in settings:
        rows = [(p, item.label) for item, p in zip(items, predictions, strict=True) if item.setting == setting]
        metrics = pope_metrics([p for p, _ in rows], [y for _, y in rows])
        report |= {f"{setting}_{key}": metrics[key] for key in POPE_KEYS}
        counts[setting] = {key: metrics[key] for key in ("n", "tp", "fp", "tn", "fn")}
    report["f1"] = pope_metrics(predictions, [item.label for item in items])["f1"]
    report["counts"] = counts
    images = list(dict.fromkeys(item.image for item in items))
    row = {image: index for index, image in enumerate(images)}
    tallies = {f"{setting}_accuracy": [[0, 0] for _ in images] for setting in settings}
    tallies["f1"] = [[0, 0] for _ in images]
    for item, yes in zip(items, predictions, strict=True):
        index = row[item.image]
        tallies[f"{item.setting}_accuracy"][index][0] += int(yes == item.label)
        tallies[f"{item.setting}_accuracy"][index][1] += 1
        tallies["f1"][index][0] += 2 * int(yes and item.label)  # 2 TP
        tallies["f1"][index][1] += 2 * int(yes and item.label) + int(yes != item.label)  # 2 TP + FP + FN
    report["per_scene"] = {"scenes": images, **tallies}
    return report


def evaluate_pope(
    model: ChatModel,
    items: Sequence[PopeItem],
    question_suffix: str = "",
    max_tokens: int = POPE_MAX_TOKENS,
    chunk_size: int = 64,
    progress: bool = True,
) -> dict:
    """Asks every question (with `question_suffix` appended, e.g. LLaVA-1.5's " Answer the question using a single
    word or phrase."), greedy, and returns `pope_report` with a few sample answers."""
    answers: list[str] = []
    for start in tqdm(range(0, len(items), chunk_size), desc="POPE", disable=not progress):
        chunk = items[start : start + chunk_size]
        images: dict[Path, Image.Image] = {}
        for item in chunk:
            if item.image_path not in images:
                with Image.open(item.image_path) as image:
                    images[item.image_path] = image.convert("RGB")
        requests = [ChatRequest(images[i.image_path], i.question + question_suffix, max_tokens) for i in chunk]
        answers += model.answer(requests)
    report = pope_report(items, answers)
    report["samples"] = [
        {"setting": i.setting, "question": i.question, "label": "yes" if i.label else "no", "answer": a}
        for i, a in list(zip(items, answers))[:5]
    ]
    logger.info(
        "pope eval num_questions=%d %s",
        len(items),
        " ".join(f"{s}_accuracy={report[f'{s}_accuracy']:.4f}" for s in report["settings"]),
    )
    return report


def format_table(report: dict) -> str:
    """The POPE report as a plain-text table, one row per setting."""
    lines = [f"POPE, {report['num_questions']} questions", ""]
    lines.append(f"{'setting':<14}" + "".join(f"{key.replace('_', ' '):>11}" for key in POPE_KEYS))
    for setting in report["settings"]:
        lines.append(f"  {setting:<12}" + "".join(f"{report[f'{setting}_{key}']:>11.3f}" for key in POPE_KEYS))
    return "\n".join(lines)
