"""Speed of the Fact-RLHF recipes by device and precision: the reward-model recipe and the PPO recipe, each run as
its own command (`python -m training.reward_model`, `python -m training.ppo`) once per arm, on the bundled model and
the same workload. Prints JSON.

An arm is DEVICE:PRECISION, e.g. `cpu:no`, `cuda:no`, `cuda:bf16` (`--mixed-precision`: autocast over fp32 weights).
All arms share one pair cache, sampled by the first arm's reward-model run (so its command time includes the sampling).
Reported per arm: reward-model seconds per optimizer step and PPO seconds per step (medians over the steps after the
first, whose time is reported apart), the reward model's held-out accuracy, the rollouts' mean length; and each
arm's step times as ratios to the first arm's.

    python bench/fact_rlhf_recipes.py --arms cpu:no cuda:no cuda:bf16
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(module: str, args: list[str], threads: int) -> float:
    """Runs `python -m module args` from the repository root; returns its wall seconds (raises with its tail on
    failure)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{module} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return time.monotonic() - started


def median_step_seconds(records: list[dict]) -> float:
    """The median time between consecutive steps' `elapsed_s`: the first step (warm-up, first kernels) left out."""
    return statistics.median(
        later["elapsed_s"] - earlier["elapsed_s"] for earlier, later in itertools.pairwise(records)
    )


def arm_run(arm: str, args, workdir: Path) -> dict:
    device, precision = arm.split(":")
    common = [
        "--model",
        args.model,
        "--cpu",
        str(device == "cpu").lower(),
        "--mixed-precision",
        precision,
        "--threads",
        str(args.threads),
    ]
    rm_dir, ppo_dir = workdir / f"rm-{device}-{precision}", workdir / f"ppo-{device}-{precision}"
    rm_wall = run(
        "training.reward_model",
        [
            *common,
            "--output-dir",
            str(rm_dir),
            "--pairs-dir",
            str(workdir / "pairs"),
            "--train-scenes",
            str(args.train_scenes),
            "--eval-scenes",
            str(args.eval_scenes),
            "--epochs",
            "1",
        ],
        args.threads,
    )
    reward = json.loads((rm_dir / "reward_model.json").read_text())
    rm_steps = [json.loads(line) for line in (rm_dir / "metrics.jsonl").read_text().splitlines()]
    ppo_wall = run(
        "training.ppo",
        [
            *common,
            "--output-dir",
            str(ppo_dir),
            "--reward-model",
            str(rm_dir),
            "--steps",
            str(args.ppo_steps),
            "--rollout-batch",
            str(args.rollout_batch),
            "--lora-rank",
            "16",
            "--eval-every",
            "0",
            "--final-eval-images",
            "0",
        ],
        args.threads,
    )
    steps = [json.loads(line) for line in (ppo_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "device": reward["device"],
        "mixed_precision": reward["mixed_precision"],
        "rm_train_pairs": reward["train_pairs"],
        "rm_steps": reward["steps"],
        "rm_seconds_per_step": round(median_step_seconds(rm_steps), 4),
        "rm_first_step_s": rm_steps[0]["elapsed_s"],
        "rm_held_out_accuracy": reward["held_out"]["accuracy"],
        "rm_command_wall_s": round(rm_wall, 1),
        "ppo_seconds_per_step": round(median_step_seconds(steps), 3),
        "ppo_first_step_s": steps[0]["elapsed_s"],
        "ppo_response_tokens": round(statistics.mean(s["response_tokens"] for s in steps), 1),
        "ppo_rm_score_last": steps[-1]["rm_score"],
        "ppo_command_wall_s": round(ppo_wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=["cpu:no"], help="DEVICE:PRECISION, e.g. cpu:no cuda:bf16")
    parser.add_argument("--model", default=str(REPO / "models" / "shapes-llava"))
    parser.add_argument("--train-scenes", type=int, default=200)
    parser.add_argument("--eval-scenes", type=int, default=100)
    parser.add_argument("--ppo-steps", type=int, default=8)
    parser.add_argument("--rollout-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run; 0 keeps the default")
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    for arm in args.arms:
        device, _, precision = arm.partition(":")
        if device not in ("cpu", "cuda") or precision not in ("no", "bf16", "fp16"):
            parser.error(f"an arm is cpu|cuda:no|bf16|fp16, not {arm!r}")
    import torch

    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        started = time.monotonic()
        arms = {arm: arm_run(arm, args, workdir) for arm in args.arms}
        sampling = json.loads((workdir / "pairs" / "train" / "made_with.json").read_text())
    anchor = arms[args.arms[0]]
    for result in arms.values():
        for recipe in ("rm", "ppo"):
            ratio = result[f"{recipe}_seconds_per_step"] / anchor[f"{recipe}_seconds_per_step"]
            result[f"{recipe}_step_ratio_to_first_arm"] = round(ratio, 3)
    report = {
        "what": "Fact-RLHF recipes, seconds per step by device and precision (bundled model)",
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "workload": {
            "train_scenes": args.train_scenes,
            "eval_scenes": args.eval_scenes,
            "ppo_steps": args.ppo_steps,
            "rollout_batch": args.rollout_batch,
            "pairs_made_with": sampling,
        },
        "arms": arms,
        "minutes": round((time.monotonic() - started) / 60, 2),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
