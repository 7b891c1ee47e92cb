"""SFT recipe sweep: trains several variants of the bundled model's recipe side by side and scores each one.

Each variant is a set of SFTConfig overrides plus ShapesWorld overrides (e.g. `caption_noise`). Every variant runs in
its own process (all on the same GPU when there is one, each with `--loader-workers` processes rendering batches),
then is scored by the ShapesWorld benchmark in-process (float32, greedy), and one JSON report is printed with the
training time and the headline metrics of every variant (also written to `--output`, by default this folder's
`results/<today>-<variants file name>.json`). It is how the recipe in `training/sft.py` was chosen; the variant
files and the results are in this folder (README.md).

    python -m training.experiments.sft_sweep.run --variants training/experiments/sft_sweep/variants/sweep-1.json \\
        --output-dir runs/sft-sweep --eval-images 500 --loader-workers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

HEADLINE = (
    "pope_random_accuracy",
    "pope_adversarial_accuracy",
    "chair_s",
    "chair_i",
    "object_recall",
    "attribute_accuracy",
    "color_accuracy",
    "shape_accuracy",
    "size_accuracy",
    "count_accuracy",
    "position_accuracy",
)


def run_variant(name: str, overrides: dict, output_dir: Path, eval_images: int, loader_workers: int) -> dict:
    """Trains one variant into output_dir/name, scores it, writes result.json there and returns the result."""
    import torch

    from training.evaluation.models import TransformersChatModel
    from training.evaluation.shapes_bench import evaluate_shapes
    from training.sft import SFTConfig, train
    from training.shapes_world import ShapesWorld, WorldConfig

    world_fields = {field.name for field in dataclasses.fields(WorldConfig)}
    world_overrides = {k: v for k, v in overrides.items() if k in world_fields}
    sft_overrides = {k: v for k, v in overrides.items() if k not in world_fields}
    model_dir = output_dir / name
    config = SFTConfig(output_dir=str(model_dir), loader_workers=loader_workers, threads=1, **sft_overrides)
    summary = train(config, ShapesWorld(WorldConfig(**world_overrides)))
    model = TransformersChatModel(model_dir, batch_size=64, dtype=torch.float32)
    report = evaluate_shapes(model, ShapesWorld(), split="test", num_images=eval_images, progress=False)
    (model_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    result = {
        "name": name,
        "overrides": overrides,
        "train_minutes": summary["minutes"],
        "val_loss": summary["val_loss"],
        "device": summary["device"],
        "eval_images": eval_images,
        **{key: round(report[key], 4) for key in HEADLINE if key in report},
    }
    (model_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", type=Path, required=True, help="JSON object: variant name -> overrides")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/sft-sweep"))
    parser.add_argument("--eval-images", type=int, default=500)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--only", help="run this one variant in this process (used by the sweep itself)")
    parser.add_argument("--tag", help="names the report: results/<date>-<tag>.json (default: the variants file's name)")
    parser.add_argument(
        "--output", type=Path, help="the JSON report (default: this folder's results/<today>-<tag>.json)"
    )
    args = parser.parse_args(argv)
    tag = args.tag or args.variants.stem
    args.output = args.output or RESULTS / f"{datetime.date.today().isoformat()}-{tag}.json"
    try:
        variants = json.loads(args.variants.read_text())
    except (OSError, json.JSONDecodeError) as error:
        print(f"error: cannot read variants from {args.variants}: {error}", file=sys.stderr)
        return 1
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.only:
        run_variant(args.only, variants[args.only], args.output_dir, args.eval_images, args.loader_workers)
        return 0
    started = time.monotonic()
    children = {}
    for name in variants:
        log = (args.output_dir / f"{name}.log").open("w")
        command = [
            sys.executable,
            "-m",
            "training.experiments.sft_sweep.run",
            "--variants",
            str(args.variants),
            "--output-dir",
            str(args.output_dir),
            "--eval-images",
            str(args.eval_images),
            "--loader-workers",
            str(args.loader_workers),
            "--only",
            name,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        children[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    results = []
    for name, child in children.items():
        code = child.wait()
        result_file = args.output_dir / name / "result.json"
        if code == 0 and result_file.is_file():
            results.append(json.loads(result_file.read_text()))
        else:
            results.append({"name": name, "error": f"exit code {code}; see {args.output_dir / (name + '.log')}"})
    report = {"wall_minutes": round((time.monotonic() - started) / 60, 1), "variants": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
