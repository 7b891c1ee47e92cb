"""The versions table with real-image gate suites: the ShapesWorld columns stay as they are, and every other suite's
metric (`suite/metric`) is in the decision with its difference and interval."""

from demo.actions import versions_table


def test_other_suites_metrics_are_in_the_decision():
    gate = {
        "passed": True,
        "baseline": "policy-v1",
        "reasons": [],
        "differences": {
            "pope/f1": {"candidate": 0.8, "baseline": 0.75, "difference": 0.05, "low": -0.01, "high": 0.11},
            "feedback-holdout/reward_accuracy": {
                "candidate": 0.9,
                "baseline": 0.5,
                "difference": 0.4,
                "low": 0.3,
                "high": 0.5,
            },
        },
    }
    (row,) = versions_table(
        [{"version": 2, "status": "promoted", "gate": gate, "pair_sources": {"thumbs": 3}}]
    ).to_dict("records")
    assert row["CHAIR_s"] == "" and row["recall"] == ""  # no ShapesWorld suite in this gate
    assert row["decision"] == (
        "vs policy-v1 | pope/f1 0.800 (+0.050; -0.01..+0.11); "
        "feedback-holdout/reward_accuracy 0.900 (+0.400; +0.30..+0.50) | pairs: 3 thumbs"
    )
