"""The Fact-RLHF experiment at toy scale, reward models only, on the bundled model after one chat-stage step: the
reward models are trained on the chat model, the report says so, and --reuse trains nothing again."""

from __future__ import annotations

import json

import pytest

from training.experiments.fact_rlhf import main

pytestmark = pytest.mark.slow


def test_a_chat_stage_run_trains_the_reward_models_on_the_chat_model(tmp_path, capsys):
    work = tmp_path / "work"
    argv = ["--chat-steps", "1", "--no-ppo", "--reward-arms", "fact", "plain", "--rm-train-scenes", "3",
            "--rm-eval-scenes", "3", "--rm-epochs", "1", "--workdir", str(work), "--output", str(tmp_path / "report.json"),
            "--plot", str(tmp_path / "plot.png")]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    chat_model = str(work / "sft-chat")
    assert report["model"] == chat_model and report["settings"]["base_model"] == "models/shapes-llava"
    assert report["chat_stage"]["from"] == "models/shapes-llava" and report["chat_stage"]["steps"] == 1
    assert report["ppo"] == {} and not (tmp_path / "plot.png").exists()  # --no-ppo: nothing to plot
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["reward_models"]) == {"fact", "plain"}
    for arm in ("fact", "plain"):
        saved = json.loads((work / f"reward-{arm}" / "reward_model.json").read_text())
        assert saved["base_model"] == str((work / "sft-chat").resolve())
        assert report["reward_models"][arm]["held_out"]["accuracy"] == printed["reward_models"][arm]
    made_with = json.loads((work / "reward-pairs" / "train" / "made_with.json").read_text())
    assert made_with["model"] == str((work / "sft-chat").resolve())  # the chat model sampled the pairs

    summary = (work / "sft-chat" / "training_summary.json").read_text()
    assert main([*argv, "--reuse"]) == 0  # the chat model and the reward models are read back, not trained again
    assert (work / "sft-chat" / "training_summary.json").read_text() == summary
    again = json.loads((tmp_path / "report.json").read_text())
    assert again["reward_models"] == report["reward_models"]
