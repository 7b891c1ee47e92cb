"""The reward-model and PPO recipes in two processes (torchrun, gloo on CPU), the way they run on several GPUs: each
process trains on its share of every batch, with DDP averaging the gradients, or with FSDP2 sharding the models'
weights over the processes (`--sharding fsdp`). What they save is the gathered, trained model: the reward model
reloaded in one process scores the held-out pairs exactly as training reported, and the PPO adapter has moved off
its zero initialisation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow


def torchrun(module: str, *args: str, log: Path) -> None:
    command = [
        str(Path(sys.executable).with_name("torchrun")),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        module,
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as output:
        result = subprocess.run(
            command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, timeout=900, check=False
        )
    assert result.returncode == 0, log.read_text()[-3000:]


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_reward_model_then_ppo_train_in_two_gloo_processes(bundled_model, tmp_path, sharding):
    from safetensors.torch import load_file

    from training.reward_data import load_pairs
    from training.reward_model import RewardEncoder, load_reward_model, pair_accuracy

    torchrun(
        "training.reward_model",
        "--output-dir",
        str(tmp_path / "rm"),
        "--model",
        str(bundled_model),
        "--pairs-dir",
        str(tmp_path / "pairs"),
        "--train-scenes",
        "8",
        "--eval-scenes",
        "4",
        "--samples",
        "3",
        "--probe-samples",
        "3",
        "--epochs",
        "1",
        "--batch-pairs",
        "4",
        "--lora-rank",
        "4",
        "--cpu",
        "true",
        "--sharding",
        sharding,
        log=tmp_path / "rm.log",
    )
    reward = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    assert reward["processes"] == 2 and reward["sharding"] == sharding and reward["train_pairs"] > 0
    model, processor, _ = load_reward_model(tmp_path / "rm", bundled_model)
    reloaded = pair_accuracy(
        model,
        RewardEncoder(processor, reward["with_facts"], reward["facts_placement"]),
        load_pairs(tmp_path / "pairs" / "validation"),
        seed=0,
    )
    assert reloaded == reward["held_out"]

    torchrun(
        "training.ppo",
        "--output-dir",
        str(tmp_path / "ppo"),
        "--model",
        str(bundled_model),
        "--reward-model",
        str(tmp_path / "rm"),
        "--steps",
        "2",
        "--rollout-batch",
        "4",
        "--minibatch",
        "2",
        "--lora-rank",
        "4",
        "--learning-rate",
        "1e-3",
        "--eval-every",
        "0",
        "--final-eval-images",
        "2" if sharding == "fsdp" else "0",
        "--cpu",
        "true",
        "--sharding",
        sharding,
        log=tmp_path / "ppo.log",
    )
    summary = json.loads((tmp_path / "ppo" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2 and summary["sharding"] == sharding
    if sharding == "fsdp":  # evaluation runs sharded too, every process answering in lockstep
        assert set(summary["before"]) >= {"chair_s", "object_recall", "pope_adversarial_accuracy"}
    records = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["policy_loss"]) and math.isfinite(r["rm_score"]) for r in records)
    adapter = load_file(str(tmp_path / "ppo" / "adapter" / "adapter_model.safetensors"))
    assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in adapter.items())
