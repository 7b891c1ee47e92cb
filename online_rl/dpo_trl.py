"""`alignloop train dpo`: TRL's DPOTrainer on exported feedback pairs, producing an adapter like any other version.

The data is `alignloop feedback export --style trl` output: `pairs.jsonl` (conversational `prompt` with image
placeholders, one-turn `chosen` and `rejected`, `images` as paths under `images/`). The recipe trains a LoRA on the
language model (`training.lora.language_model_lora`, or continues a version's adapter with `--init-adapter`) with
TRL's `DPOTrainer` and the model's own processor: sigmoid DPO, plus the chosen answers' NLL weighted by
`--rpo-alpha` (RPO; TRL 1.16 spells it `loss_type=["sigmoid", "sft"]` with `loss_weights=[1, alpha]`, and averages
that NLL over all chosen tokens of a batch where the online worker averages per answer). The reference is the policy
with its adapter disabled, as in the worker. Dense DPO has no TRL counterpart (no per-token weights): the worker's
own loop (`online_rl.dpo_runner`) trains it.

It writes `OUTPUT_DIR/adapter/` (PEFT, safetensors, naming the base model as vLLM serves it) and
`OUTPUT_DIR/metrics.json`; with `--publish` it also registers the adapter as the next candidate version in the
store (`online_rl.adapters.publish_adapter`, which refuses an adapter that matches nothing in the base model), to be
scored and gated like any other: `alignloop eval --endpoint URL --served-model llava-rlhf@vN`.

    alignloop feedback export --style trl --output runs/pairs
    alignloop train dpo --data runs/pairs --output-dir runs/dpo-trl --publish
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from alignloop.settings import DEFAULT_ADAPTER_DIR, DEFAULT_MODEL, DEFAULT_STORE_URL

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DPOTrainConfig:
    data: str = dataclasses.field(
        default="runs/pairs", metadata={"help": "an `alignloop feedback export --style trl` directory"}
    )
    model: str = dataclasses.field(default=DEFAULT_MODEL, metadata={"help": "the base model directory (served)"})
    output_dir: str = dataclasses.field(default="runs/dpo-trl", metadata={"help": "where the adapter is written"})
    init_adapter: str | None = dataclasses.field(
        default=None, metadata={"help": "continue this adapter (e.g. the promoted version's); default a fresh LoRA"}
    )
    lora_rank: int = dataclasses.field(default=8, metadata={"help": "rank of a fresh LoRA"})
    beta: float = dataclasses.field(default=0.1, metadata={"help": "DPO's beta"})
    rpo_alpha: float = dataclasses.field(
        default=1.0, metadata={"help": "weight of the chosen answers' NLL (RPO); 0 is plain DPO"}
    )
    learning_rate: float = dataclasses.field(default=5e-4, metadata={"help": "AdamW learning rate (constant)"})
    epochs: float = dataclasses.field(default=3.0, metadata={"help": "passes over the pairs"})
    batch_pairs: int = dataclasses.field(default=4, metadata={"help": "pairs per optimizer step (per device)"})
    max_steps: int = dataclasses.field(default=-1, metadata={"help": "stop after this many steps (-1: epochs)"})
    gradient_checkpointing: bool = dataclasses.field(
        default=False, metadata={"help": "recompute activations in backward (TRL's default; slower, less memory)"}
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "seeds the LoRA and the data order"})
    publish: bool = dataclasses.field(
        default=False, metadata={"help": "register the adapter as the next candidate version in --store-url"}
    )
    store_url: str = dataclasses.field(default=DEFAULT_STORE_URL, metadata={"help": "the feedback store (--publish)"})
    adapter_dir: str = dataclasses.field(
        default=str(DEFAULT_ADAPTER_DIR), metadata={"help": "the served adapter directory (--publish)"}
    )
    parent_version: int | None = dataclasses.field(
        default=None, metadata={"help": "the version --init-adapter came from, recorded with the new one"}
    )


def load_trl_pairs(data_dir: str | Path):
    """The export as a `datasets.Dataset` TRL reads: images decoded from their files, the `source` column dropped."""
    import datasets

    data_dir = Path(data_dir)
    path = data_dir / "pairs.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no pairs at {path}: export them with `alignloop feedback export --style trl`")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"prompt", "chosen", "rejected", "images"} - set(row)
        if missing:
            raise ValueError(f"{path}:{number}: not a TRL-style pair (missing {', '.join(sorted(missing))})")
        images = [str(data_dir / image) for image in row["images"]]
        absent = [image for image in images if not Path(image).is_file()]
        if absent:
            raise FileNotFoundError(f"{path}:{number}: image {absent[0]} is missing")
        rows.append({key: row[key] for key in ("prompt", "chosen", "rejected")} | {"images": images})
    if not rows:
        raise ValueError(f"{path} holds no pairs")
    dataset = datasets.Dataset.from_list(rows)
    return dataset.cast_column("images", datasets.Sequence(datasets.Image()))


def dpo_args(config: DPOTrainConfig, **overrides):
    """TRL's DPOConfig for the recipe: the worker's optimizer (AdamW, weight decay 0.01, constant LR, clip 1)."""
    import torch
    from trl import DPOConfig

    cuda = torch.cuda.is_available()
    sft = config.rpo_alpha > 0
    values = {
        "output_dir": str(Path(config.output_dir) / "trl"),
        "beta": config.beta,
        "loss_type": ["sigmoid", "sft"] if sft else ["sigmoid"],
        "loss_weights": [1.0, config.rpo_alpha] if sft else None,
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps,
        "per_device_train_batch_size": config.batch_pairs,
        "gradient_checkpointing": config.gradient_checkpointing,
        "max_length": None,
        "bf16": cuda,
        "use_cpu": not cuda,
        "seed": config.seed,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
    }
    return DPOConfig(**(values | overrides))


def build_trainer(config: DPOTrainConfig, dataset, **arg_overrides):
    """The DPOTrainer on the base model (with a fresh LoRA, or `init_adapter` trainable) and its processor."""
    import torch
    from peft import PeftModel
    from trl import DPOTrainer

    from training.lora import language_model_lora
    from training.tiny_llava import load_checkpoint

    model, processor = load_checkpoint(config.model, dtype=torch.float32)
    torch.manual_seed(config.seed)
    peft_config = None
    if config.init_adapter:
        model = PeftModel.from_pretrained(model, config.init_adapter, is_trainable=True)
    else:
        peft_config = language_model_lora(rank=config.lora_rank)
    return DPOTrainer(
        model=model,
        ref_model=None,  # with a PEFT model TRL's reference is the policy with its adapter disabled
        args=dpo_args(config, **arg_overrides),
        train_dataset=dataset,
        processing_class=processor,
        peft_config=peft_config,
    )


def train(config: DPOTrainConfig) -> dict:
    from training.lora import vllm_base_model, write_adapter

    if not (Path(config.model) / "config.json").is_file():
        raise FileNotFoundError(f"no model at {config.model}: config.json is missing")
    dataset = load_trl_pairs(config.data)
    output_dir = Path(config.output_dir)
    if (output_dir / "adapter").exists():
        raise FileExistsError(f"{output_dir / 'adapter'} exists; choose another --output-dir")
    started = time.monotonic()
    trainer = build_trainer(config, dataset)
    result = trainer.train()
    losses = [entry for entry in trainer.state.log_history if "loss" in entry]
    last = losses[-1] if losses else {}
    metrics = {
        "pairs": len(dataset),
        "steps": trainer.state.global_step,
        "train_loss": float(result.training_loss),
        "final_loss": float(last.get("loss", float("nan"))),
        "reward_accuracy": float(last.get("rewards/accuracies", float("nan"))),
        "reward_margin": float(last.get("rewards/margins", float("nan"))),
        "seconds": round(time.monotonic() - started, 1),
    }
    policy = trainer.model
    base_model = vllm_base_model(config.model)
    summary = {"metrics": metrics, "adapter": str(write_adapter(policy, output_dir, "adapter", base_model))}
    if config.publish:
        from online_rl.adapters import publish_adapter
        from online_rl.store import open_store

        notes = f"TRL DPOTrainer on {config.data}: " + ", ".join(f"{k}={v}" for k, v in metrics.items())
        with open_store(config.store_url) as store:
            record = publish_adapter(
                store,
                policy,
                config.adapter_dir,
                config.model,
                algorithm="dpo-trl",
                parent_version=config.parent_version,
                notes=notes,
            )
        summary |= {"version": record.version, "name": record.name, "status": record.status}
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("dpo-trl %s", " ".join(f"{k}={v}" for k, v in metrics.items()))
    return summary


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    from training.recipe_args import recipe_parser

    parser = recipe_parser(DPOTrainConfig, prog, __doc__.split("\n\n")[0])
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    summary = train(config)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
