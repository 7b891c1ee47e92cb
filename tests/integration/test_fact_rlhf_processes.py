"""The reward-model and PPO recipes in two processes (torchrun, gloo on CPU): each process trains on its share of
every batch and DDP averages the gradients, the way they run on several GPUs."""

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
    command = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", module, *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as output:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, timeout=900,
                                check=False)
    assert result.returncode == 0, log.read_text()[-3000:]


def test_reward_model_then_ppo_train_in_two_gloo_processes(bundled_model, tmp_path):
    torchrun("training.reward_model", "--output_dir", str(tmp_path / "rm"), "--model", str(bundled_model),
             "--pairs_dir", str(tmp_path / "pairs"), "--train_scenes", "8", "--eval_scenes", "4", "--samples", "3",
             "--epochs", "1", "--batch_pairs", "4", "--lora_rank", "4", "--cpu", "true", log=tmp_path / "rm.log")  # fmt: skip
    reward = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    assert reward["processes"] == 2 and reward["train_pairs"] > 0
    assert (tmp_path / "rm" / "adapter_model.safetensors").is_file() and (tmp_path / "rm" / "reward_head.safetensors").is_file()

    torchrun("training.ppo", "--output_dir", str(tmp_path / "ppo"), "--model", str(bundled_model), "--reward_model",
             str(tmp_path / "rm"), "--steps", "2", "--rollout_batch", "4", "--minibatch", "2", "--lora_rank", "4",
             "--learning_rate", "1e-3", "--eval_every", "0", "--final_eval_images", "0", "--cpu", "true",
             log=tmp_path / "ppo.log")  # fmt: skip
    summary = json.loads((tmp_path / "ppo" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["policy_loss"]) and math.isfinite(r["rm_score"]) for r in records)
    assert (tmp_path / "ppo" / "adapter" / "adapter_model.safetensors").is_file()
