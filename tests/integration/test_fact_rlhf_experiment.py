"""The Fact-RLHF experiment at toy scale, reward models only, on the bundled model after one chat-stage and one
read-stage step (its SFT+): the reward models are trained on that model, the report says so, --reuse trains
nothing again, and --reuse with another loss trains the reward models again on the same pairs."""

from __future__ import annotations

import json

import pytest

from training.experiments.fact_rlhf.run import main

pytestmark = pytest.mark.slow


def test_an_sft_plus_run_trains_the_reward_models_on_the_sft_plus_model(tmp_path, capsys):
    work = tmp_path / "work"
    argv = [
        "--chat-steps",
        "1",
        "--read-steps",
        "1",
        "--no-ppo",
        "--reward-arms",
        "fact_before_answer",
        "plain",
        "--rm-train-scenes",
        "3",
        "--rm-eval-scenes",
        "3",
        "--rm-epochs",
        "1",
        "--workdir",
        str(work),
        "--output",
        str(tmp_path / "report.json"),
        "--plot",
        str(tmp_path / "plot.png"),
    ]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    plus = work / "sft-plus"
    assert report["model"] == str(plus) and report["settings"]["base_model"] == "models/shapes-llava"
    assert report["sft_plus"]["from"] == "models/shapes-llava"
    assert (report["sft_plus"]["chat_steps"], report["sft_plus"]["read_steps"]) == (1, 1)
    records = [json.loads(line) for line in (plus / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in records] == [("chat", 1), ("read", 1)]
    assert report["ppo"] == {} and not (tmp_path / "plot.png").exists()  # --no-ppo: nothing to plot
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["reward_models"]) == {"fact_before_answer", "plain"}  # without PPO, fact is not required
    for arm in ("fact_before_answer", "plain"):
        saved = json.loads((work / f"reward-{arm}" / "reward_model.json").read_text())
        assert saved["base_model"] == str(plus.resolve())
        assert report["reward_models"][arm]["held_out"]["accuracy"] == printed["reward_models"][arm]
    made_with = json.loads((work / "reward-pairs" / "train" / "made_with.json").read_text())
    assert made_with["model"] == str(plus.resolve())  # the SFT+ model sampled the pairs

    summary = (plus / "training_summary.json").read_text()
    assert main([*argv, "--reuse"]) == 0  # the SFT+ model and the reward models are read back, not trained again
    assert (plus / "training_summary.json").read_text() == summary
    again = json.loads((tmp_path / "report.json").read_text())
    assert again["reward_models"] == report["reward_models"]

    # asked for a loss balanced over pair kinds, --reuse trains the reward models again, on the same pairs
    pairs = (work / "reward-pairs" / "train" / "pairs.jsonl").read_text()
    assert main([*argv, "--reuse", "--rm-balance-kinds"]) == 0
    assert (work / "reward-pairs" / "train" / "pairs.jsonl").read_text() == pairs
    balanced = json.loads((tmp_path / "report.json").read_text())
    for arm in ("fact_before_answer", "plain"):
        saved = json.loads((work / f"reward-{arm}" / "reward_model.json").read_text())
        assert (
            saved["balance_kinds"] is True and saved["kind_weights"] == balanced["reward_models"][arm]["kind_weights"]
        )
        assert report["reward_models"][arm]["kind_weights"] == {} != saved["kind_weights"]
