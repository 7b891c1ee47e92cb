"""Writes the bundled checkpoint's model card (README.md) from what its run actually produced: the training summary
(`training_summary.json`), the metrics log (`metrics.jsonl`, also drawn as `training_curves.png`) and the evaluation
report (`eval.json`), so the card's numbers are never typed by hand. Everything below `HAND_WRITTEN_MARKER` in an
existing card (how the recipe was chosen, with the runs behind it) is written by hand and kept as it is.

    python -m training.model_card models/shapes-llava
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from training.evaluation.shapes_bench import format_table
from training.shapes_world import WorldConfig

REPRODUCE = """make model   # = alignloop train sft --output-dir models/shapes-llava (all five stages, seed 0),
             #   then alignloop eval on 500 test images and python -m training.model_card"""
HAND_WRITTEN_MARKER = "<!-- Written by hand below this line; python -m training.model_card keeps it. -->"


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


def stage_rows(summary: dict, config: dict) -> str:
    """The table rows of stages 0-4, one line each."""
    rows = [
        (
            "0 vision",
            summary["vision_pretrain_steps"],
            "the vision tower, on per-patch scene-graph labels (it stands in for a pretrained CLIP)",
        ),
        (
            "1 grounding",
            summary.get("grounding_steps", 0),
            f"projector and language model, on short questions only (up to {config['max_turns']} per image: "
            "presence probes, color, shape, size, position, count, multiple choice; no descriptions)",
        ),
        (
            "2 SFT",
            summary["steps"],
            "projector and language model, on the full conversation mix (tower frozen); every answer weighs the same",
        ),
        (
            "3 polish",
            summary.get("polish_steps", 0),
            f"the same, at a lower rate, with {config.get('polish_token_share', 0):g} of the per-token loss mixed "
            "in, so descriptions teach attribute binding",
        ),
        (
            "4 describe",
            summary.get("describe_steps", 0),
            f"the same stream once more, at {config.get('describe_learning_rate', 0):g}, with the per-token loss "
            "alone: descriptions dominate, as long detailed-description data does in a LLaVA",
        ),
    ]
    return "".join(f"| {stage} | {steps} | {what} |\n" for stage, steps, what in rows)


def model_card(summary: dict, report: dict, machine: str, hand_written: str = "") -> str:
    """The card: the sections generated from the run's files, then the marker and `hand_written`."""
    config = summary["config"]
    world = summary.get("world") or dataclasses.asdict(WorldConfig())
    minutes = summary["minutes"]
    later_rows = ""
    if summary.get("chat_steps"):
        later_rows = (
            f"| 5 chat | {summary['chat_steps']} | the same, with {config['chat_share']:g} of the conversations "
            f"long chats ({config['chat_turns']} turns: the description and follow-up questions), at "
            f"{config['chat_learning_rate']:g} |\n"
        )
    if summary.get("read_steps"):
        later_rows += (
            f"| 6 read | {summary['read_steps']} | the same, with {config['read_share']:g} of the conversations "
            f"given the scene's facts as text before the first question and answered truly "
            f"({config['read_blank_share']:g} of those with a blank image, "
            + (
                f"{config['read_quiz_share']:g} attribute quizzes and of the rest "
                if config.get("read_quiz_share")
                else ""
            )
            + f"{config.get('read_description_share', 1 / 3):.2g} descriptions), at "
            f"{config['read_learning_rate']:g} |\n"
        )
    made_by = f"\nHow this checkpoint was made: {summary['made_by']}.\n" if summary.get("made_by") else ""
    return f"""# shapes-llava

A tiny LLaVA (`LlavaForConditionalGeneration`: a CLIP-ViT vision tower and a Llama language model,
{summary["parameters"] / 1e6:.1f}M parameters) trained from scratch on ShapesWorld by alignloop's SFT recipe. It is the
model `make up` serves and the starting point of online alignment. It loads unchanged in transformers and vLLM
(llava-hf key layout, head_dim 64).

It is trained on ShapesWorld's train split, which has co-occurrence bias (a star, moon, heart, diamond, square or
triangle brings its partner of star/moon, heart/diamond, square/triangle along with probability
{world["cooccurrence_bias"]:g}), caption noise
(a missing partner is named anyway in {world["caption_noise"]:.0%} of such scenes' descriptions, right after its
pair, while the opening count sentence counts only what is there) and probe noise (in
{world.get("probe_noise", 0):.0%} of such scenes' conversations, "Is there a <partner>?" is answered "Yes."), so it
hallucinates the way LLaVA models do: it names co-occurring objects that are not there, and says "yes" to them when
probed.

## Reproduce

```bash
{REPRODUCE}
```

Training took **{minutes:.0f} minutes** on {machine} (torch threads: {summary["torch_threads"]}), seed {config["seed"]}:

| stage | steps | what it trains |
|---|---|---|
{stage_rows(summary, config)}{later_rows}{made_by}
Batch {config["batch_size"]} scenes, AdamW at {config["learning_rate"]:g} (polish
{config.get("polish_learning_rate", config["learning_rate"]):g}) with warm-up and cosine decay; final validation
loss {summary["val_loss"]}. The loss curves are in `training_curves.png` and every step in `metrics.jsonl`.

## Evaluation

`alignloop eval --model models/shapes-llava --split test --num-images {report["num_images"]}` (greedy decoding):

```
{format_table(report)}
```

The gap between POPE-random and POPE-adversarial, and CHAIR_s, are the hallucinations alignment should remove.

{HAND_WRITTEN_MARKER}
{hand_written}"""


def write_model_card(model_dir: str | Path, machine: str = "2 CPU cores (x86-64, no GPU)") -> Path:
    model_dir = Path(model_dir)
    summary = json.loads((model_dir / "training_summary.json").read_text())
    report = json.loads((model_dir / "eval.json").read_text())
    plot_training_curves(model_dir / "metrics.jsonl", model_dir / "training_curves.png")
    card = model_dir / "README.md"
    card.write_text(model_card(summary, report, machine, hand_written_part(card)))
    return card


def hand_written_part(card: Path) -> str:
    """What follows `HAND_WRITTEN_MARKER` in an existing card (stripped, ending in one newline), else ""."""
    if not card.is_file():
        return ""
    _, marker, rest = card.read_text().partition(HAND_WRITTEN_MARKER)
    return rest.strip() + "\n" if marker and rest.strip() else ""


if __name__ == "__main__":
    print(write_model_card(sys.argv[1] if len(sys.argv) > 1 else "models/shapes-llava"))
