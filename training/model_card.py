"""Writes the bundled checkpoint's model card (README.md) from what its run actually produced: the training summary
(`training_summary.json`), the metrics log (`metrics.jsonl`, also drawn as `training_curves.png`) and the evaluation
report (`eval.json`), so the card's numbers are never typed by hand.

    python -m training.model_card models/shapes-llava
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from training.evaluation.shapes_bench import format_table
from training.shapes_world import WorldConfig

REPRODUCE = """make model   # = alignloop train sft --output_dir models/shapes-llava (all four stages, seed 0),
             #   then alignloop eval on 500 test images and python -m training.model_card"""


def plot_training_curves(metrics_path: Path, output: Path) -> None:
    """Loss per stage (vision probe, grounding, SFT) against step, with validation points."""
    from matplotlib.figure import Figure

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    stages = list(dict.fromkeys(r["stage"] for r in records))
    figure = Figure(figsize=(4 * len(stages), 3.2), layout="constrained")
    for index, stage in enumerate(stages, start=1):
        rows = [r for r in records if r["stage"] == stage]
        axes = figure.add_subplot(1, len(stages), index)
        axes.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.6, label="train")
        validated = [r for r in rows if "val_loss" in r]
        if validated:
            axes.plot([r["step"] for r in validated], [r["val_loss"] for r in validated], "o-", label="validation")
        axes.set_title(stage)
        axes.set_xlabel("step")
        axes.set_yscale("log")
        axes.legend(fontsize=7)
    figure.savefig(output, dpi=110)


def model_card(summary: dict, report: dict, machine: str) -> str:
    config = summary["config"]
    minutes = summary["minutes"]
    return f"""# shapes-llava

A tiny LLaVA (`LlavaForConditionalGeneration`: a CLIP-ViT vision tower and a Llama language model,
{summary["parameters"] / 1e6:.1f}M parameters) trained from scratch on ShapesWorld by alignloop's SFT recipe. It is the
model `make up` serves and the starting point of online alignment. It loads unchanged in transformers and vLLM
(llava-hf key layout, head_dim 64).

It is trained on ShapesWorld's train split, which has co-occurrence bias (star/moon, heart/diamond,
square/triangle usually appear together) and caption noise (a missing partner is named anyway in
{WorldConfig().caption_noise:.0%} of such descriptions), so it hallucinates the way LLaVA models do: it
names co-occurring objects that are not there, and says "yes" to them when probed.

## Reproduce

```bash
{REPRODUCE}
```

Training took **{minutes:.0f} minutes** on {machine} (torch threads: {summary["torch_threads"]}), seed {config["seed"]}:

| stage | steps | what it trains |
|---|---|---|
| 0 vision | {summary["vision_pretrain_steps"]} | the vision tower, on per-patch scene-graph labels (it stands in for a pretrained CLIP) |
| 1 grounding | {summary.get("grounding_steps", 0)} | projector and language model, on short questions only (presence probes, color, shape, size, position, count; no descriptions) |
| 2 SFT | {summary["steps"]} | projector and language model, on the full conversation mix (tower frozen); every answer weighs the same |
| 3 polish | {summary.get("polish_steps", 0)} | the same, at a lower rate, with {config.get("polish_token_share", 0):g} of the per-token loss mixed in, so descriptions teach attribute binding |

Batch {config["batch_size"]} scenes, AdamW at {config["learning_rate"]:g} (polish
{config.get("polish_learning_rate", config["learning_rate"]):g}) with warm-up and cosine decay; final validation
loss {summary["val_loss"]}. The loss curves are in `training_curves.png` and every step in `metrics.jsonl`.

## Evaluation

`alignloop eval --model models/shapes-llava --split test --num-images {report["num_images"]}` (greedy decoding):

```
{format_table(report)}
```

The gap between POPE-random and POPE-adversarial, and CHAIR_s, are the hallucinations alignment should remove.
"""


def write_model_card(model_dir: str | Path, machine: str = "2 CPU cores (x86-64, no GPU)") -> Path:
    model_dir = Path(model_dir)
    summary = json.loads((model_dir / "training_summary.json").read_text())
    report = json.loads((model_dir / "eval.json").read_text())
    plot_training_curves(model_dir / "metrics.jsonl", model_dir / "training_curves.png")
    card = model_dir / "README.md"
    card.write_text(model_card(summary, report, machine))
    return card


if __name__ == "__main__":
    print(write_model_card(sys.argv[1] if len(sys.argv) > 1 else "models/shapes-llava"))
