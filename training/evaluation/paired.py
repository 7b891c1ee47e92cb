"""Paired comparison of two models on the same scenes: per-scene tallies, a bootstrap interval on each metric's
difference, and the gate's decision.

Every gate metric is a ratio of sums over scenes (CHAIR_s = hallucinating descriptions / descriptions; object recall
= present objects named / present objects; POPE-adversarial accuracy = right adversarial probes / probes), so a
scene contributes a (numerator, denominator) tally to each. Both models answer the same scenes, so their difference
is estimated by the paired bootstrap: resample scenes with replacement, recompute both ratios on the same resample,
and take the percentile interval of the differences. A metric blocks promotion only when the candidate is worse
with that confidence (the whole interval lies beyond `margin` on the worse side), so noise alone never rejects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from training.evaluation.metrics import answer_is_correct, extract_shape_mentions
from training.shapes_world import QAItem


@dataclasses.dataclass(frozen=True)
class GateMetric:
    name: str
    label: str
    higher_is_better: bool
    margin: float = 0.0  # how much worse the candidate may be, with confidence, before it is rejected


GATE_METRICS: tuple[GateMetric, ...] = (
    GateMetric("chair_s", "CHAIR_s", higher_is_better=False),
    GateMetric("pope_adversarial_accuracy", "POPE-adversarial", higher_is_better=True),
    GateMetric("object_recall", "object recall", higher_is_better=True, margin=0.02),  # "recall within 2 points"
)


def with_margins(margins: dict[str, float], metrics: Sequence[GateMetric] = GATE_METRICS) -> tuple[GateMetric, ...]:
    """The gate metrics with the margins given by name (the others keep theirs)."""
    return tuple(dataclasses.replace(m, margin=margins.get(m.name, m.margin)) for m in metrics)


def scene_tallies(items: Sequence[QAItem], responses: Sequence[str], scenes: Sequence[int]) -> dict:
    """{"scenes": [index, ...], metric: [[numerator, denominator] per scene]} for the gate metrics, from the
    benchmark's items, the model's answers and the scene each item is about."""
    order = list(dict.fromkeys(scenes))
    position = {scene: i for i, scene in enumerate(order)}
    tallies = {metric.name: [[0.0, 0.0] for _ in order] for metric in GATE_METRICS}
    for item, response, scene in zip(items, responses, scenes, strict=True):
        row = position[scene]
        if item.kind == "description":
            truth = set(extract_shape_mentions(item.answer))
            mentioned = extract_shape_mentions(response)
            tallies["chair_s"][row][0] += any(shape not in truth for shape in mentioned)
            tallies["chair_s"][row][1] += 1
            tallies["object_recall"][row][0] += len(truth & set(mentioned))
            tallies["object_recall"][row][1] += len(truth)
        elif item.kind == "presence" and item.pope == "adversarial":
            tallies["pope_adversarial_accuracy"][row][0] += answer_is_correct(item, response)
            tallies["pope_adversarial_accuracy"][row][1] += 1
    return {"scenes": order, **tallies}


def ratio(tally: Sequence[Sequence[float]]) -> float:
    """The metric a tally gives: the sum of numerators over the sum of denominators (0 when there is none)."""
    numerator, denominator = np.asarray(tally, dtype=float).reshape(-1, 2).sum(axis=0)
    return float(numerator / denominator) if denominator else 0.0


@dataclasses.dataclass(frozen=True)
class Difference:
    """candidate - baseline for one metric, with its bootstrap interval."""

    metric: str
    candidate: float
    baseline: float
    difference: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


def paired_difference(
    candidate: dict, baseline: dict, metric: str, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> Difference:
    """The difference of `metric` between two `scene_tallies` of the same scenes, with a paired-bootstrap
    percentile interval at `confidence`."""
    if candidate["scenes"] != baseline["scenes"]:
        raise ValueError("a paired comparison needs both models scored on the same scenes, in the same order")
    ours, theirs = np.asarray(candidate[metric], dtype=float), np.asarray(baseline[metric], dtype=float)
    point = ratio(ours) - ratio(theirs)
    if len(ours) == 0:
        return Difference(metric, 0.0, 0.0, 0.0, 0.0, 0.0)
    rows = np.random.default_rng(seed).integers(0, len(ours), size=(resamples, len(ours)))

    def resampled(tally: np.ndarray) -> np.ndarray:
        sums = tally[rows].sum(axis=1)  # (resamples, 2)
        return np.divide(sums[:, 0], sums[:, 1], out=np.zeros(resamples), where=sums[:, 1] > 0)

    differences = resampled(ours) - resampled(theirs)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    return Difference(metric, ratio(ours), ratio(theirs), point, float(low), float(high))


@dataclasses.dataclass
class GateDecision:
    passed: bool
    differences: dict[str, Difference]
    reasons: list[str]
    confidence: float

    @property
    def candidate(self) -> dict[str, float]:
        return {name: d.candidate for name, d in self.differences.items()}

    @property
    def baseline(self) -> dict[str, float]:
        return {name: d.baseline for name, d in self.differences.items()}

    def as_dict(self) -> dict:
        return {
            "passed": self.passed,
            "confidence": self.confidence,
            "reasons": list(self.reasons),
            "differences": {name: d.as_dict() for name, d in self.differences.items()},
        }


def decide(
    candidate: dict,
    baseline: dict,
    metrics: Sequence[GateMetric] = GATE_METRICS,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> GateDecision:
    """Passes unless some metric is worse with `confidence`: its whole interval lies beyond the metric's margin on
    the worse side. Each reason names the metric, both values and the interval."""
    differences, reasons = {}, []
    for metric in metrics:
        difference = paired_difference(candidate, baseline, metric.name, resamples, confidence, seed)
        differences[metric.name] = difference
        worse = difference.high < -metric.margin if metric.higher_is_better else difference.low > metric.margin
        if worse:
            moved = "fell" if metric.higher_is_better else "rose"
            reasons.append(
                f"{metric.label} {moved} {difference.baseline:.3f} -> {difference.candidate:.3f} "
                f"({confidence:.0%} interval of the difference [{difference.low:+.3f}, {difference.high:+.3f}])"
            )
    return GateDecision(not reasons, differences, reasons, confidence)
