"""ShapesWorld hallucination benchmark: ask a chat model about scenes with exact ground truth, score the answers.

For each scene of a split (validation and test are free of the training biases), the model gets the questions of
`ShapesWorld.benchmark_items`: a detailed description (scored with CHAIR), POPE yes/no probes in the random,
popular and adversarial settings, and short attribute, count, position and multiple-choice questions. The report
is a flat dict of metrics in [0, 1], with the counts behind them and a few example answers kept apart.

    alignloop eval --model models/shapes-llava --num-images 500 --output eval.json --chart eval.png
    alignloop eval --endpoint http://localhost:8000/v1 --served-model llava-rlhf
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from training.evaluation.metrics import ANSWER_KINDS, ATTRIBUTE_KINDS, POPE_SETTINGS, score_items
from training.evaluation.models import ChatModel, ChatRequest
from training.evaluation.paired import scene_tallies
from training.shapes_world import QAItem, ShapesWorld

logger = logging.getLogger(__name__)

DESCRIPTION_MAX_TOKENS = 96
SHORT_ANSWER_MAX_TOKENS = 16
POPE_KEYS: tuple[str, ...] = ("accuracy", "precision", "recall", "f1", "yes_ratio")
QUESTION_KEYS: tuple[str, ...] = ("attribute", *ANSWER_KINDS)
# The metrics drawn by write_chart; chair_s and chair_i are hallucination rates (lower is better).
CHART_KEYS: tuple[str, ...] = (
    *(f"pope_{setting}_accuracy" for setting in POPE_SETTINGS),
    "chair_s",
    "chair_i",
    "object_recall",
    *(f"{kind}_accuracy" for kind in QUESTION_KEYS),
)
LOWER_IS_BETTER = frozenset({"chair_s", "chair_i"})


def max_tokens_for(item: QAItem) -> int:
    return DESCRIPTION_MAX_TOKENS if item.kind == "description" else SHORT_ANSWER_MAX_TOKENS


def evaluate_shapes(
    model: ChatModel,
    world: ShapesWorld,
    split: str = "test",
    num_images: int = 500,
    progress: bool = True,
    scenes_per_call: int = 16,
    samples_per_kind: int = 2,
    per_scene: bool = False,
    only: Callable[[QAItem], bool] | None = None,
) -> dict:
    """Runs the benchmark on scenes 0..num_images-1 of `split` and returns the report.

    Requests for `scenes_per_call` scenes go to the model at once, so backends can batch or run them concurrently.
    `samples` keeps the first `samples_per_kind` answers of every question kind. With `per_scene`, the report also
    holds each scene's tallies of the gate metrics (`training.evaluation.paired.scene_tallies`), for paired tests.
    With `only`, just the items it accepts are asked (the gate asks what its metrics need: `gate_items`), and the
    report keeps only the metrics those items measure.
    """
    popular = world.popular_shapes()
    all_items: list[QAItem] = []
    all_responses: list[str] = []
    all_scenes: list[int] = []
    samples: list[dict] = []
    sampled: Counter[str] = Counter()
    with tqdm(total=num_images, desc=f"ShapesWorld {split}", unit="image", disable=not progress) as bar:
        for start in range(0, num_images, scenes_per_call):
            scenes = list(world.scenes(split, min(scenes_per_call, num_images - start), start))
            items: list[QAItem] = []
            requests: list[ChatRequest] = []
            scene_indices: list[int] = []
            for scene in scenes:
                image = world.render(scene)
                for item in world.benchmark_items(scene, popular):
                    if only is not None and not only(item):
                        continue
                    items.append(item)
                    requests.append(ChatRequest(image, item.question, max_tokens_for(item)))
                    scene_indices.append(scene.index)
            responses = model.answer(requests)
            if len(responses) != len(requests):
                raise RuntimeError(f"the model returned {len(responses)} answers to {len(requests)} requests")
            for item, response, index in zip(items, responses, scene_indices, strict=True):
                if sampled[item.kind] < samples_per_kind:
                    sampled[item.kind] += 1
                    samples.append(
                        {
                            "scene": index,
                            "kind": item.kind,
                            "question": item.question,
                            "answer": item.answer,
                            "response": response,
                        }
                    )
            all_items += items
            all_responses += responses
            all_scenes += scene_indices
            bar.update(len(scenes))
    scores = score_items(all_items, all_responses)
    if only is not None:  # the metrics of kinds never asked would read 0
        asked = {(item.kind, item.pope) for item in all_items}
        scores = {key: value for key, value in scores.items() if measured(key, asked)}
    report = {"split": split, "num_images": num_images, **scores, "samples": samples}
    if per_scene:
        report["per_scene"] = scene_tallies(all_items, all_responses, all_scenes)
    logger.info(
        "shapes eval split=%s num_images=%d %s",
        split,
        num_images,
        " ".join(f"{key}={report[key]:.4f}" for key in ("pope_adversarial_accuracy", "chair_s", "object_recall")),
    )
    return report


def gate_items(item: QAItem) -> bool:
    """What the gate's metrics need: descriptions (CHAIR_s, recall) and adversarial POPE probes."""
    return item.kind == "description" or (item.kind == "presence" and item.pope == "adversarial")


def measured(metric: str, asked: set[tuple[str, str | None]]) -> bool:
    """Whether `metric` of `score_items` comes from items of the (kind, POPE setting) pairs asked."""
    if metric == "counts":
        return True
    if metric.startswith("pope_"):
        return ("presence", metric.split("_")[1]) in asked
    if metric in ("chair_s", "chair_i", "object_recall"):
        return ("description", None) in asked
    kinds = ATTRIBUTE_KINDS if metric == "attribute_accuracy" else (metric.removesuffix("_accuracy"),)
    return any((kind, None) in asked for kind in kinds)


def format_table(report: dict) -> str:
    """The report's metrics as a plain-text table for the terminal."""
    questions = report.get("counts", {}).get("questions", {})
    lines = [f"ShapesWorld {report.get('split', '?')} split, {report.get('num_images', '?')} images", ""]
    lines.append(f"{'POPE':<14}" + "".join(f"{key.replace('_', ' '):>11}" for key in POPE_KEYS))
    for setting in POPE_SETTINGS:
        lines.append(f"  {setting:<12}" + "".join(f"{report[f'pope_{setting}_{key}']:>11.3f}" for key in POPE_KEYS))
    lines += ["", f"{'CHAIR':<14}{'chair_s':>11}{'chair_i':>11}{'obj recall':>11}"]
    lines.append("  descriptions" + "".join(f"{report[key]:>11.3f}" for key in ("chair_s", "chair_i", "object_recall")))
    lines += ["", f"{'Questions':<18}{'accuracy':>11}{'n':>7}"]
    for kind in QUESTION_KEYS:
        n = sum(questions.get(k, 0) for k in ATTRIBUTE_KINDS) if kind == "attribute" else questions.get(kind, 0)
        lines.append(f"  {kind:<16}{report[f'{kind}_accuracy']:>11.3f}{n:>7}")
    return "\n".join(lines)


def write_json(report: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def write_chart(report: dict, path: str | Path) -> None:
    """A bar chart (PNG) of the main metrics; hallucination rates are drawn in a different color."""
    from matplotlib.figure import Figure

    values = [report[key] for key in CHART_KEYS]
    labels = [key.removesuffix("_accuracy").replace("_", " ") for key in CHART_KEYS]
    colors = ["tab:red" if key in LOWER_IS_BETTER else "tab:blue" for key in CHART_KEYS]
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    axes = figure.add_subplot()
    bars = axes.bar(range(len(values)), values, color=colors)
    axes.bar_label(bars, fmt="%.2f", fontsize=8)
    axes.set_xticks(range(len(values)), labels, rotation=35, ha="right")
    axes.set_ylim(0, 1.1)
    axes.set_ylabel("score (red: hallucination rate, lower is better)")
    axes.set_title(f"ShapesWorld {report.get('split', '')} split, {report.get('num_images', '?')} images")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
