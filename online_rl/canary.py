"""The live canary: a version that passed the gate serves a share of the alias's unpinned traffic, and its users'
thumbs decide whether it is promoted or rolled back.

The canary's thumbs-up rate is compared with the promoted version's over the same window (the promoted version is
the concurrent control), and so is its error rate. The test is group-sequential: the monitor looks after every
`min_rated` new ratings of the canary, at most `max_looks` times, and each look uses the confidence
1 - (1 - confidence) / max_looks (Bonferroni over the looks), so peeking does not inflate the error rate. At a look,
with Newcombe's interval for a difference of two proportions (the hybrid Wilson score interval):
- rolled back when worse with confidence: the thumbs-up difference's interval lies below 0, or the error-rate
  difference's lies above 0;
- promoted when no worse with confidence: the thumbs-up difference's interval lies above -margin;
- at the last look, undecided: promoted if the point estimate is within the margin, else rolled back.
Every decision goes into the alias history with its numbers; an admin can still promote, roll back or end it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from statistics import NormalDist

from online_rl.pairs import net_ratings
from online_rl.schema import FeedbackEvent
from online_rl.store import ConflictError, FeedbackStore

logger = logging.getLogger(__name__)
ERROR_FINISH_REASONS = frozenset({"error"})


def wilson_interval(successes: int, trials: int, z: float) -> tuple[float, float]:
    """Wilson's score interval for a proportion; (0, 1) when there are no trials."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    center = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, center - half), min(1.0, center + half)


def difference_interval(k1: int, n1: int, k2: int, n2: int, confidence: float) -> tuple[float, float, float]:
    """p1 - p2 and Newcombe's hybrid score interval for it (Newcombe 1998, method 10)."""
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p1, p2 = (k1 / n1 if n1 else 0.0), (k2 / n2 if n2 else 0.0)
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    delta = p1 - p2
    return delta, delta - math.hypot(p1 - l1, u2 - p2), delta + math.hypot(u1 - p1, p2 - l2)


@dataclasses.dataclass
class VersionTally:
    """What users made of one version's answers since the canary started."""

    up: int = 0
    rated: int = 0
    errors: int = 0
    answered: int = 0

    @property
    def up_rate(self) -> float:
        return self.up / self.rated if self.rated else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.answered if self.answered else 0.0


@dataclasses.dataclass(frozen=True)
class CanaryRules:
    min_rated: int = 30
    max_looks: int = 10
    confidence: float = 0.95
    margin: float = 0.05  # how much lower the canary's thumbs-up rate may be and still count as no worse


@dataclasses.dataclass
class CanaryDecision:
    action: str  # "promote", "rollback" or "wait"
    look: int
    canary: VersionTally
    promoted: VersionTally
    up_difference: tuple[float, float, float]
    error_difference: tuple[float, float, float]
    reason: str

    def as_dict(self) -> dict:
        return {
            "action": self.action,
            "look": self.look,
            "canary": dataclasses.asdict(self.canary),
            "promoted": dataclasses.asdict(self.promoted),
            "up_rate_difference": [round(v, 4) for v in self.up_difference],
            "error_rate_difference": [round(v, 4) for v in self.error_difference],
            "reason": self.reason,
        }


def sequential_decision(canary: VersionTally, promoted: VersionTally, rules: CanaryRules) -> CanaryDecision:
    """The decision at the look the canary's ratings have reached (see the module docstring)."""
    look = min(canary.rated // rules.min_rated, rules.max_looks)
    per_look = 1 - (1 - rules.confidence) / rules.max_looks
    up = difference_interval(canary.up, canary.rated, promoted.up, promoted.rated, per_look)
    errors = difference_interval(canary.errors, canary.answered, promoted.errors, promoted.answered, per_look)
    numbers = (
        f"thumbs-up {canary.up}/{canary.rated} = {canary.up_rate:.3f} vs {promoted.up}/{promoted.rated} = "
        f"{promoted.up_rate:.3f} (difference {up[0]:+.3f}, {per_look:.1%} interval [{up[1]:+.3f}, {up[2]:+.3f}]); "
        f"errors {canary.errors}/{canary.answered} vs {promoted.errors}/{promoted.answered}; look {look}"
    )
    if look == 0 or promoted.rated == 0:
        return CanaryDecision("wait", look, canary, promoted, up, errors, numbers)
    if up[2] < 0:
        action, verdict = "rollback", "worse with confidence"
    elif errors[1] > 0:
        action, verdict = "rollback", "more errors with confidence"
    elif up[1] > -rules.margin:
        action, verdict = "promote", f"no worse than {rules.margin:.2f} with confidence"
    elif look >= rules.max_looks:
        action = "promote" if up[0] >= -rules.margin else "rollback"
        verdict = f"undecided after {rules.max_looks} looks: point estimate"
    else:
        action, verdict = "wait", "undecided"
    return CanaryDecision(action, look, canary, promoted, up, errors, f"{verdict}: {numbers}")


def window_tallies(
    store: FeedbackStore, versions: set[int | None], since: float, page: int = 1000
) -> dict[int | None, VersionTally]:
    """Thumbs (the net rating of each answer) and errors of each version's answers since `since` (None: the base
    model); evaluation traffic is left out."""
    tallies = {version: VersionTally() for version in versions}
    answers = {}
    for record in store.list_generations(limit=20_000):
        if record.created < since or record.client == "eval" or record.adapter_version not in versions:
            continue
        answers[record.id] = record.adapter_version
        tally = tallies[record.adapter_version]
        tally.answered += 1
        tally.errors += record.finish_reason in ERROR_FINISH_REASONS
    events, after = [], None
    while True:
        batch = store.list_events(after=after, limit=page)
        events += [event for _, event in batch if isinstance(event, FeedbackEvent) and event.created >= since]
        if len(batch) < page:
            break
        after = batch[-1][0]
    for generation_id, (net, _) in net_ratings(events).items():
        if generation_id in answers and net != 0:  # the base model's answers have version None
            version = answers[generation_id]
            tallies[version].rated += 1
            tallies[version].up += net > 0
    return tallies


class CanaryMonitor:
    """Watches the alias's canary (whoever started it) and promotes or rolls it back by `sequential_decision`."""

    def __init__(self, store: FeedbackStore, alias: str, rules: CanaryRules, actor: str = "canary", promote=None):
        """`promote` moves the alias when the canary wins (`online_rl.promotion`): the store's own by default; the
        trainer passes its promoter, which goes through the gateway and stages the version first."""
        self.store, self.alias, self.rules, self.actor = store, alias, rules, actor
        self.promote = promote or store.promote

    def started_at(self, version: int) -> float | None:
        history = self.store.alias_history(self.alias)
        starts = [c.created for c in history if c.action == "canary_start" and c.to_version == version]
        return starts[-1] if starts else None

    def check(self) -> CanaryDecision | None:
        """One look at the canary, acting on its decision; None when there is no canary to look at."""
        canary = self.store.canaries().get(self.alias)
        if canary is None:
            return None
        version = canary[0]
        promoted = self.store.promoted_version(self.alias)
        if version == promoted:  # promoted meanwhile (an admin): the canary has nothing left to decide
            self.store.set_canary(self.alias, None, 0.0, actor=self.actor, reason=f"v{version} is promoted")
            return None
        since = self.started_at(version) or 0.0
        tallies = window_tallies(self.store, {version, promoted}, since)
        decision = sequential_decision(tallies[version], tallies[promoted], self.rules)
        if decision.action == "wait":
            return decision
        adapter = self.store.get_adapter(version)
        record = {**(adapter.gate if adapter else {}), "canary": decision.as_dict()}
        if decision.action == "promote":
            try:
                self.promote(self.alias, version, expected=promoted, actor=self.actor, reason=decision.reason)
            except ConflictError as error:  # the alias moved meanwhile, or staging refused it: this canary ends
                decision = dataclasses.replace(decision, action="rollback", reason=f"not promoted: {error}")
        self.store.set_canary(self.alias, None, 0.0, actor=self.actor, reason=decision.reason)
        if decision.action == "rollback":
            self.store.update_adapter(version, status="rejected", gate=record)
        else:
            self.store.update_adapter(version, gate=record)
        logger.info("canary version=%d decision=%s %s", version, decision.action, decision.reason)
        return decision
