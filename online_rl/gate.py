"""The gate between a published version and the users: both the candidate and the version it would replace answer
the same held-out ShapesWorld scenes, and a paired bootstrap decides (`training.evaluation.paired`).

Scores are cached per version on disk (`<adapter_dir>/.gate-scores/`), keyed by what was scored: a version's
greedy answers never change, so the baseline is scored once, and a promoted candidate's scores are the next
round's baseline. The default scorer asks the gateway with the service key and the `eval` client mark, so the
gate's requests are neither rate-limited as a user's nor stored as users' generations; `alignloop.client` retries
its transient failures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from training.evaluation.paired import GATE_METRICS, GateDecision, GateMetric, decide

logger = logging.getLogger(__name__)
SCORES_FORMAT = 2  # bump when what a cached score means changes (the benchmark, the tallies)
Scorer = Callable[[str], dict]  # served model name -> shapes_bench report with `per_scene`


def gateway_scorer(gateway_url: str, api_key: str, split: str, images: int, concurrency: int = 8) -> Scorer:
    """Scores a model name through the gateway on scenes 0..images-1 of `split`, with per-scene tallies, asking only
    what the gate's metrics need (a description and the adversarial POPE probes of each scene)."""

    def score(model_name: str) -> dict:
        from training.evaluation.models import OpenAIChatModel
        from training.evaluation.shapes_bench import evaluate_shapes, gate_items
        from training.shapes_world import ShapesWorld

        served = OpenAIChatModel(f"{gateway_url}/v1", model_name, api_key, concurrency=concurrency)
        return evaluate_shapes(served, ShapesWorld(), split, images, progress=False, per_scene=True, only=gate_items)

    return score


@dataclasses.dataclass
class GateResult:
    """A gate's outcome: the paired decision, both versions' metrics, the seconds it took."""

    decision: GateDecision
    candidate: dict[str, float]
    baseline: dict[str, float]
    seconds: float
    baseline_cached: bool

    @property
    def passed(self) -> bool:
        return self.decision.passed

    @property
    def reasons(self) -> list[str]:
        return self.decision.reasons

    def record(self, baseline_label: str) -> dict:
        """What the registry keeps of the decision (`AdapterVersion.gate`)."""
        return {
            **self.decision.as_dict(),
            "baseline": baseline_label,
            "seconds": round(self.seconds, 1),
            "baseline_cached": self.baseline_cached,
        }


class Gate:
    """Scores versions (cached) and decides whether a candidate may replace its baseline."""

    def __init__(
        self,
        scorer: Scorer,
        cache_dir: str | Path,
        scored_with: dict,
        confidence: float = 0.95,
        resamples: int = 2000,
        seed: int = 0,
        metrics: tuple[GateMetric, ...] = GATE_METRICS,
    ):
        """`scored_with` names what the scores depend on besides the version (base model, split, images): a cached
        score made with anything else is not used."""
        self.scorer = scorer
        self.metrics = metrics
        self.cache_dir = Path(cache_dir)
        self.scored_with = {**scored_with, "format": SCORES_FORMAT}
        self.confidence, self.resamples, self.seed = confidence, resamples, seed

    def _cache_path(self, label: str) -> Path:
        digest = hashlib.sha256(json.dumps(self.scored_with, sort_keys=True).encode()).hexdigest()[:12]
        return self.cache_dir / f"{label}-{digest}.json"

    def is_cached(self, label: str) -> bool:
        path = self._cache_path(label)
        return path.is_file() and json.loads(path.read_text()).get("scored_with") == self.scored_with

    def scores(self, model_name: str, label: str) -> tuple[dict, bool]:
        """The report of `model_name` (served as `label`: policy-vN or base), and whether it came from the cache."""
        path = self._cache_path(label)
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("scored_with") == self.scored_with:
                return cached["report"], True
        report = self.scorer(model_name)
        if "per_scene" not in report:
            raise ValueError(f"the scorer's report for {model_name} has no per-scene tallies")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.cache_dir, suffix=".tmp", delete=False) as handle:
            json.dump({"scored_with": self.scored_with, "label": label, "report": report}, handle)
        os.replace(handle.name, path)  # a reader never sees half a file
        return report, False

    def compare(self, candidate: tuple[str, str], baseline: tuple[str, str]) -> GateResult:
        """Scores (model name, label) of the candidate and the baseline and decides."""
        started = time.monotonic()
        baseline_report, baseline_cached = self.scores(*baseline)
        candidate_report, _ = self.scores(*candidate)
        decision = decide(
            candidate_report["per_scene"],
            baseline_report["per_scene"],
            self.metrics,
            self.confidence,
            self.resamples,
            self.seed,
        )
        return GateResult(
            decision, metrics(candidate_report), metrics(baseline_report), time.monotonic() - started, baseline_cached
        )


def metrics(report: dict) -> dict[str, float]:
    """The report's scalar metrics."""
    return {key: float(value) for key, value in report.items() if isinstance(value, int | float)}
