"""The gate between a published version and the users: both the candidate and the version it would replace are
scored on the same items by each gate suite, and a paired bootstrap decides (`training.evaluation.paired`).

A suite (`GateSuite`) names its metrics and scores a version into a report with per-item tallies. The default and
only suite is `shapes`: held-out ShapesWorld scenes. `online_rl.gate_suites` adds real-image suites (POPE, MMHal-Bench,
CHAIR on annotated images) and the held-out slice of the store's own feedback pairs. A candidate passes when it
passes every suite. The decision keeps each metric's difference and interval, keyed by its name for `shapes` (as
before suites existed) and `suite/metric` for the others.

Scores are cached per version and suite on disk (`<adapter_dir>/.gate-scores/`), keyed by what was scored: a
version's greedy answers never change, so the baseline is scored once, and a promoted candidate's scores are the
next round's baseline. The default scorer asks the gateway with the service key and the `eval` client mark, so the
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from training.evaluation.paired import GATE_METRICS, GateDecision, GateMetric, decide

logger = logging.getLogger(__name__)
SCORES_FORMAT = 2  # bump when what a cached score means changes (the benchmark, the tallies)
Scorer = Callable[[str], dict]  # served model name -> shapes_bench report with `per_scene`
DEFAULT_SUITE = "shapes"


class GateSuite(Protocol):
    """One way of scoring a version for the gate."""

    name: str
    metrics: tuple[GateMetric, ...]

    def scored_with(self) -> dict:
        """What the scores depend on besides the version (the base model, the items): a cached score made with
        anything else is not used. Called once per comparison, before both versions are scored."""
        ...

    def score(self, model_name: str, label: str) -> dict:
        """The report of `model_name` (served as `label`: policy-vN or base): scalar metrics and `per_scene`
        tallies ({"scenes": [...], metric: [[numerator, denominator], ...]})."""
        ...


@dataclasses.dataclass
class ScorerSuite:
    """A suite from a scorer of served model names and a fixed description of what it scores."""

    name: str
    scorer: Scorer
    fixed: dict
    metrics: tuple[GateMetric, ...] = GATE_METRICS

    def scored_with(self) -> dict:
        return self.fixed

    def score(self, model_name: str, label: str) -> dict:
        return self.scorer(model_name)


def prefixed(suite: str, name: str) -> str:
    """A metric's key in the gate record: its own name for the default suite, `suite/metric` for the others."""
    return name if suite == DEFAULT_SUITE else f"{suite}/{name}"


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
class SuiteResult:
    """One suite's decision and both versions' scalar metrics."""

    suite: str
    decision: GateDecision
    candidate: dict[str, float]
    baseline: dict[str, float]
    baseline_cached: bool


@dataclasses.dataclass
class GateResult:
    """A gate's outcome: the paired decision over every suite, both versions' metrics (keyed as the differences),
    the seconds it took, and each suite's own result."""

    decision: GateDecision
    candidate: dict[str, float]
    baseline: dict[str, float]
    seconds: float
    baseline_cached: bool
    suites: list[SuiteResult] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.decision.passed

    @property
    def reasons(self) -> list[str]:
        return self.decision.reasons

    @classmethod
    def combine(cls, results: Sequence[SuiteResult], seconds: float) -> GateResult:
        """One result from every suite's: differences and metrics keyed by `prefixed` names, all reasons."""
        differences, reasons, candidate, baseline = {}, [], {}, {}
        for result in results:
            for name, difference in result.decision.differences.items():
                key = prefixed(result.suite, name)
                differences[key] = dataclasses.replace(difference, metric=key)
            reasons += result.decision.reasons
            candidate |= {prefixed(result.suite, k): v for k, v in result.candidate.items()}
            baseline |= {prefixed(result.suite, k): v for k, v in result.baseline.items()}
        confidence = results[0].decision.confidence if results else 0.95
        decision = GateDecision(not reasons, differences, reasons, confidence)
        cached = all(result.baseline_cached for result in results)
        return cls(decision, candidate, baseline, seconds, cached, list(results))

    def record(self, baseline_label: str) -> dict:
        """What the registry keeps of the decision (`AdapterVersion.gate`): every metric's difference with its
        interval, the reasons, and each suite's decision and the candidate's metrics."""
        return {
            **self.decision.as_dict(),
            "baseline": baseline_label,
            "seconds": round(self.seconds, 1),
            "baseline_cached": self.baseline_cached,
            "suites": {
                result.suite: {
                    "passed": result.decision.passed,
                    "reasons": list(result.decision.reasons),
                    "metrics": {k: round(v, 6) for k, v in result.candidate.items()},
                    "baseline_metrics": {k: round(v, 6) for k, v in result.baseline.items()},
                    "baseline_cached": result.baseline_cached,
                }
                for result in self.suites
            },
        }


class Gate:
    """Scores versions (cached) on each suite and decides whether a candidate may replace its baseline."""

    def __init__(
        self,
        scorer: Scorer | None,
        cache_dir: str | Path,
        scored_with: dict,
        confidence: float = 0.95,
        resamples: int = 2000,
        seed: int = 0,
        metrics: tuple[GateMetric, ...] = GATE_METRICS,
        suites: Sequence[GateSuite] | None = None,
    ):
        """`scored_with` names what the `shapes` scores depend on besides the version (base model, split, images):
        a cached score made with anything else is not used. Without `suites`, the gate is the `shapes` suite of
        `scorer` and `metrics`; with them, exactly those suites (a `shapes` one among them included)."""
        if suites is None:
            if scorer is None:
                raise ValueError("a gate needs a scorer or suites")
            suites = [ScorerSuite(DEFAULT_SUITE, scorer, scored_with, metrics)]
        if not suites:
            raise ValueError("a gate needs at least one suite")
        self.suites = list(suites)
        self.cache_dir = Path(cache_dir)
        self.confidence, self.resamples, self.seed = confidence, resamples, seed

    def _scored_with(self, suite: GateSuite) -> dict:
        return {**suite.scored_with(), "format": SCORES_FORMAT}

    def _cache_path(self, suite: GateSuite, label: str, scored_with: dict) -> Path:
        digest = hashlib.sha256(json.dumps(scored_with, sort_keys=True).encode()).hexdigest()[:12]
        if suite.name == DEFAULT_SUITE:  # the name shapes scores had before suites existed
            return self.cache_dir / f"{label}-{digest}.json"
        return self.cache_dir / f"{label}-{suite.name}-{digest}.json"

    def _cached(self, path: Path, scored_with: dict) -> dict | None:
        if not path.is_file():
            return None
        cached = json.loads(path.read_text())
        return cached["report"] if cached.get("scored_with") == scored_with else None

    def is_cached(self, label: str) -> bool:
        """Whether every suite's score of `label` is cached."""
        for suite in self.suites:
            scored_with = self._scored_with(suite)
            if self._cached(self._cache_path(suite, label, scored_with), scored_with) is None:
                return False
        return True

    def score(self, suite: GateSuite, scored_with: dict, model_name: str, label: str) -> tuple[dict, bool]:
        """The suite's report of `model_name` (served as `label`: policy-vN or base), and whether it came from the
        cache."""
        path = self._cache_path(suite, label, scored_with)
        cached = self._cached(path, scored_with)
        if cached is not None:
            return cached, True
        report = suite.score(model_name, label)
        if "per_scene" not in report:
            raise ValueError(f"the {suite.name} report for {model_name} has no per-item tallies")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.cache_dir, suffix=".tmp", delete=False) as handle:
            json.dump({"scored_with": scored_with, "label": label, "report": report}, handle)
        os.replace(handle.name, path)  # a reader never sees half a file
        return report, False

    def scores(self, model_name: str, label: str) -> dict[str, tuple[dict, bool]]:
        """Every suite's report of `model_name` (served as `label`) and whether it came from the cache."""
        return {suite.name: self.score(suite, self._scored_with(suite), model_name, label) for suite in self.suites}

    def compare(self, candidate: tuple[str, str], baseline: tuple[str, str]) -> GateResult:
        """Scores (model name, label) of the candidate and the baseline on every suite and decides."""
        started = time.monotonic()
        results = []
        for suite in self.suites:
            scored_with = self._scored_with(suite)
            baseline_report, baseline_cached = self.score(suite, scored_with, *baseline)
            candidate_report, _ = self.score(suite, scored_with, *candidate)
            decision = decide(
                candidate_report["per_scene"],
                baseline_report["per_scene"],
                suite.metrics,
                self.confidence,
                self.resamples,
                self.seed,
            )
            results.append(
                SuiteResult(suite.name, decision, metrics(candidate_report), metrics(baseline_report), baseline_cached)
            )
        return GateResult.combine(results, time.monotonic() - started)


def metrics(report: dict) -> dict[str, float]:
    """The report's scalar metrics."""
    return {key: float(value) for key, value in report.items() if isinstance(value, int | float)}
