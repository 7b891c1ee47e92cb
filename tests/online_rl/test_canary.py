"""The live canary: Newcombe's interval by hand, the sequential decision, and the monitor acting on a real store."""

from __future__ import annotations

import pytest

from online_rl.canary import (
    CanaryMonitor,
    CanaryRules,
    VersionTally,
    difference_interval,
    sequential_decision,
    wilson_interval,
)
from online_rl.schema import AdapterVersion, FeedbackEvent, GenerationRecord
from online_rl.store import open_store


def test_newcombes_worked_examples():
    """Newcombe (1998), Table II, method 10: 56/70 - 48/80 and 9/10 - 3/10 at 95%."""
    delta, low, high = difference_interval(56, 70, 48, 80, 0.95)
    assert (round(delta, 4), round(low, 4), round(high, 4)) == (0.2, 0.0524, 0.3339)
    delta, low, high = difference_interval(9, 10, 3, 10, 0.95)
    assert (round(delta, 4), round(low, 4), round(high, 4)) == (0.6, 0.1705, 0.809)
    assert wilson_interval(0, 0, 1.96) == (0.0, 1.0)


RULES = CanaryRules(min_rated=30, max_looks=4, confidence=0.95, margin=0.05)


def test_before_the_first_look_it_waits():
    decision = sequential_decision(VersionTally(0, 29, 0, 40), VersionTally(80, 100, 0, 130), RULES)
    assert (decision.action, decision.look) == ("wait", 0)


def test_a_clearly_worse_canary_is_rolled_back_and_an_equal_one_promoted():
    worse = sequential_decision(VersionTally(6, 30, 0, 40), VersionTally(90, 120, 0, 150), RULES)
    assert worse.action == "rollback" and worse.reason.startswith("worse with confidence: thumbs-up 6/30 = 0.200")
    equal = sequential_decision(VersionTally(120, 120, 0, 150), VersionTally(115, 120, 0, 150), RULES)
    assert equal.action == "promote" and equal.up_difference[1] > -RULES.margin
    errors = sequential_decision(VersionTally(30, 30, 30, 60), VersionTally(118, 120, 0, 150), RULES)
    assert errors.action == "rollback" and errors.reason.startswith("more errors with confidence")


def test_an_undecided_canary_waits_until_the_last_look_then_goes_by_the_point_estimate():
    close = VersionTally(21, 30, 0, 30), VersionTally(72, 100, 0, 100)  # 0.70 vs 0.72: neither side is certain
    assert sequential_decision(*close, RULES).action == "wait"
    last = sequential_decision(VersionTally(84, 120, 0, 120), VersionTally(288, 400, 0, 400), RULES)
    assert last.look == 4 and last.action == "promote" and last.reason.startswith("undecided after 4 looks")
    # Each look uses 1 - 0.05 / 4 = 98.75%, wider than one look at 95%.
    assert last.up_difference[1] < difference_interval(84, 120, 288, 400, 0.95)[1]


@pytest.fixture
def store(tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as opened:
        for version in (1, 2):
            opened.register_adapter(
                AdapterVersion(
                    version=opened.allocate_adapter_version(),
                    name=f"policy-v{version}",
                    path=f"/adapters/policy-v{version}",
                    algorithm="dpo",
                )
            )
        opened.promote("llava-rlhf", 1, actor="trainer")
        yield opened


def answers(store, version: int, ups: int, downs: int, prefix: str) -> None:
    for index in range(ups + downs):
        record_id = f"{prefix}-{index}"
        store.add_generation(
            GenerationRecord(
                id=record_id,
                alias="llava-rlhf",
                adapter_version=version,
                messages=[{"role": "user", "content": "Hi"}],
                response="Hello.",
                user_id=f"u-{index}",
            )
        )
        store.add_feedback(
            FeedbackEvent(generation_id=record_id, rating=1 if index < ups else -1, user_id=f"u-{index}")
        )


def test_the_monitor_rolls_back_a_worse_canary_and_records_why(store):
    answers(store, 1, ups=5, downs=5, prefix="before")  # before the canary started: not in its window
    store.set_canary("llava-rlhf", 2, 0.2, actor="trainer", reason="gate passed")
    store.update_adapter(2, status="canary")
    answers(store, 2, ups=6, downs=24, prefix="canary")
    answers(store, 1, ups=100, downs=20, prefix="promoted")
    decision = CanaryMonitor(store, "llava-rlhf", RULES).check()
    assert decision.action == "rollback" and (decision.canary.up, decision.canary.rated) == (6, 30)
    assert (decision.promoted.up, decision.promoted.rated) == (100, 120)
    assert store.canaries() == {} and store.promoted_version("llava-rlhf") == 1
    assert store.get_adapter(2).status == "rejected" and store.get_adapter(2).gate["canary"]["action"] == "rollback"
    stop = store.alias_history("llava-rlhf")[-1]
    assert (stop.action, stop.actor, stop.from_version) == ("canary_stop", "canary", 2)
    assert "thumbs-up 6/30 = 0.200 vs 100/120 = 0.833" in stop.reason
    assert CanaryMonitor(store, "llava-rlhf", RULES).check() is None  # nothing left to watch


def test_the_monitor_promotes_a_canary_no_worse_and_waits_while_it_has_too_few_ratings(store):
    store.set_canary("llava-rlhf", 2, 0.2, actor="trainer", reason="gate passed")
    monitor = CanaryMonitor(store, "llava-rlhf", RULES)
    answers(store, 2, ups=20, downs=0, prefix="early")
    assert monitor.check().action == "wait" and store.canaries() == {"llava-rlhf": (2, 0.2)}
    answers(store, 2, ups=100, downs=0, prefix="canary")
    answers(store, 1, ups=110, downs=10, prefix="promoted")
    decision = monitor.check()
    assert decision.action == "promote" and store.promoted_version("llava-rlhf") == 2 and store.canaries() == {}
    promote = [c for c in store.alias_history("llava-rlhf") if c.action == "promote"][-1]
    assert (promote.actor, promote.from_version, promote.to_version) == ("canary", 1, 2)
    assert promote.reason.startswith("no worse than 0.05 with confidence: thumbs-up 120/120")


def test_an_admin_who_promotes_the_canary_ends_it(store):
    store.set_canary("llava-rlhf", 2, 0.5, actor="trainer")
    store.promote("llava-rlhf", 2, actor="admin")
    assert CanaryMonitor(store, "llava-rlhf", RULES).check() is None and store.canaries() == {}


def test_the_base_model_is_the_control_when_the_alias_serves_it(store):
    store.promote("llava-rlhf", None, actor="test")
    store.set_canary("llava-rlhf", 2, 0.5, actor="admin")
    answers(store, None, ups=90, downs=30, prefix="base")  # the base model's answers: no adapter version
    answers(store, 2, ups=5, downs=25, prefix="canary")
    decision = CanaryMonitor(store, "llava-rlhf", RULES).check()
    assert (decision.promoted.up, decision.promoted.rated) == (90, 120) and decision.action == "rollback"
