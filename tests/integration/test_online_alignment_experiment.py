"""The online alignment experiment at toy scale, on the bundled model: the in-process gateway records what the real
one records, the unchanged trainer turns the simulated feedback into versions, and the report says what happened."""

from __future__ import annotations

import json

import pytest

from online_rl.schema import IMAGE_REF_PREFIX
from online_rl.store import open_store
from training.experiments.online_alignment.diagnose import main as diagnose
from training.experiments.online_alignment.run import main

pytestmark = pytest.mark.slow


def test_a_toy_run_reports_every_round_and_leaves_the_loop_state_in_the_store(tmp_path, capsys):
    work = tmp_path / "work"
    code = main(
        [
            "--events",
            "6",
            "--rounds",
            "2",
            "--arms",
            "corrections,preferences",
            "--gate-images",
            "2",
            "--test-images",
            "2",
            "--correction-share",
            "1.0",
            "--seeds",
            "0,1",
            "--work-dir",
            str(work),
            "--output",
            str(tmp_path / "report.json"),
            "--plot",
            str(tmp_path / "plot.png"),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["events_per_arm"] == 6 and report["events_per_round"] == 3
    arm, preferences = report["arms"]
    assert arm["arm"] == "corrections" and [r["round"] for r in arm["rounds"]] == [1, 2]
    assert [r["events"] for r in arm["rounds"]] == [3, 3]
    trained = [r for r in arm["rounds"] if "version" in r]
    assert arm["pairs"] == sum(r["pairs"] for r in trained)
    for r in trained:
        assert set(r["pair_sources"]) == {"correction"} and set(r["test"]) == set(report["sft"])
        assert r["promoted"] == (not r["gate_reasons"])
    assert preferences["arm"] == "preferences"
    assert {kind.partition(":")[2] for r in preferences["rounds"] for kind in r["events_by_kind"]} == {"preference"}
    for r in preferences["rounds"]:
        assert set(r.get("pair_sources", {"preference": 1})) == {"preference"}
    assert report["offline_dpo"]["pairs"] == (max(arm["pairs"], preferences["pairs"]) or 3)
    assert (tmp_path / "plot.png").stat().st_size > 10_000

    # every seed runs every arm; the summary is the mean over the seeds with its t-interval
    assert report["seeds"] == [0, 1] and [run["seed"] for run in report["runs"]] == [0, 1]
    assert report["runs"][0]["arms"][0]["rounds"] == arm["rounds"]
    finals = [run["arms"][0]["final_served_test"]["object_recall"] for run in report["runs"]]
    recall = report["summary"]["corrections"]["object_recall"]
    assert recall["values"] == finals and recall["mean"] == pytest.approx(sum(finals) / 2, abs=1e-4)
    assert recall["low"] <= recall["mean"] <= recall["high"]

    with open_store(f"sqlite:///{work / 'seed-0' / 'corrections' / 'store.db'}") as store:
        generations = store.list_generations()
        assert len(generations) == 6
        for record in generations:  # what serve/ stores: images as sha256 refs, with their bytes and facts
            (sha,) = record.image_hashes
            assert record.messages[0]["content"][0]["image_url"]["url"] == IMAGE_REF_PREFIX + sha
            assert store.get_image(sha) is not None and store.get_facts(sha)
        assert {version.version for version in store.list_adapters()} == {r["version"] for r in trained}
        assert store.pending_count("trainer") == 0  # every event was acknowledged by the round that read it

    # the diagnosis of the corrections arm: its pairs, and how the SFT model's and each version's descriptions end
    assert diagnose([str(work / "seed-0" / "corrections"), "--images", "2"]) == 0
    diagnosis = json.loads(capsys.readouterr().out)
    corrections = diagnosis["pairs"]["correction_pairs"]
    assert corrections == sum(r.get("pair_sources", {}).get("correction", 0) for r in arm["rounds"])
    assert sum(diagnosis["pairs"]["by_kind"].values()) == corrections
    assert set(diagnosis["descriptions"]) == {"sft"} | {f"v{r['version']}" for r in trained}
    assert {d["descriptions"] for d in diagnosis["descriptions"].values()} == {2}
