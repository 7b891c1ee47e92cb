"""One DPO optimizer step: the online worker's own (`online_rl.dpo.preference_loss` + AdamW) against TRL's
`DPOTrainer`, on the same model (the bundled one), the same preference pairs as one batch, and the same LoRA (rank,
seed, initialisation), in one run. Prints JSON.

A step is forward passes of the policy and of the reference (the policy with its adapter disabled), backward,
gradient clipping and the AdamW update, on a batch already collated (each side's own collator; its time is reported
apart). The worker's step is `OnlineTrainer.train`'s loop body; TRL's is what its training loop runs per step
(`training_step`, which holds its loss, then its clipping, optimizer and scheduler steps). Each side has its own copy
of the model with the same LoRA initialisation; after one warm-up step each, the steps alternate (worker, TRL,
worker, ...) so that load from other processes falls on both alike. Reported: the mean step time of each side over
all repeats, their ratio (TRL / worker: above 1, TRL's step is slower), each repeat's means, and the collate times.
Plain DPO by default (`--rpo-alpha` adds the chosen answers' NLL on both sides, TRL's `sft` loss).

    .venv/bin/python bench/dpo_step.py --repeats 4 --steps 5
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def shapes_pairs(count: int):
    """`count` pairs on ShapesWorld scenes: the caption against the caption with an object that is not there."""
    from online_rl.pairs import PreferencePair
    from training.shapes_world import DESCRIBE_PROMPT, ShapesWorld

    world = ShapesWorld()
    pairs, images = [], {}
    for index, scene in enumerate(world.scenes("validation", count)):
        buffer = io.BytesIO()
        world.render(scene).save(buffer, format="PNG")
        sha = f"{index:064x}"
        images[sha] = buffer.getvalue()
        caption = world.caption(scene)
        messages = (
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"sha256:{sha}"}},
                    {"type": "text", "text": DESCRIBE_PROMPT},
                ],
            },
        )
        rejected = caption.rstrip(".") + " and a small purple moon."
        pairs.append(PreferencePair(messages, caption, rejected, "thumbs", None, f"gen-{index}", (f"fb-{index}",)))
    return pairs, images


def trl_dataset(pairs, images, directory: Path):
    from online_rl.dpo_trl import load_trl_pairs
    from online_rl.export import trl_row

    (directory / "images").mkdir(parents=True, exist_ok=True)
    with (directory / "pairs.jsonl").open("w") as out:
        for pair in pairs:
            sha = pair.image_hashes[0]
            (directory / "images" / f"{sha}.png").write_bytes(images[sha])
            out.write(json.dumps(trl_row(pair, [f"images/{sha}.png"])) + "\n")
    return load_trl_pairs(directory)


def worker_stepper(args, pairs, images):
    """The online worker's step (`OnlineTrainer.train`'s loop body) on its own copy of the model: a function that
    runs one step and returns its seconds, and the seconds the batch took to collate."""
    import torch
    from peft import get_peft_model

    from online_rl.dpo import PreferenceLossConfig, preference_loss
    from online_rl.preference_batch import PreferenceEncoder
    from training.lora import language_model_lora
    from training.tiny_llava import load_checkpoint

    model, processor = load_checkpoint(args.model)
    torch.manual_seed(args.seed)
    policy = get_peft_model(model, language_model_lora(rank=args.lora_rank))
    started = time.perf_counter()
    batch = PreferenceEncoder(processor).collate(pairs, images.get)
    collate = time.perf_counter() - started
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.01)
    config = PreferenceLossConfig(beta=args.beta, sft_weight=args.rpo_alpha)
    policy.train()

    def step() -> float:
        started = time.perf_counter()
        loss, _ = preference_loss(policy, batch, config)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    return step, collate


def trl_stepper(args, dataset):
    """TRL's DPOTrainer step as its training loop runs it (`training_step`: its loss, forward and backward; then
    its gradient clipping, the optimizer and scheduler steps, zeroing), on a batch from its own data collator."""
    import torch

    from online_rl.dpo_trl import DPOTrainConfig, build_trainer

    config = DPOTrainConfig(
        model=args.model,
        output_dir=tempfile.mkdtemp(prefix="dpo-step-"),
        lora_rank=args.lora_rank,
        beta=args.beta,
        rpo_alpha=args.rpo_alpha,
        learning_rate=args.learning_rate,
        batch_pairs=len(dataset),
        max_steps=10**6,
        seed=args.seed,
    )
    torch.manual_seed(args.seed)
    trainer = build_trainer(config, dataset, disable_tqdm=True)
    examples = [dataset[i] for i in range(len(dataset))]
    started = time.perf_counter()
    batch = trainer.data_collator(examples)
    collate = time.perf_counter() - started
    model = trainer.model
    model.train()
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.current_gradient_accumulation_steps = 1  # what its loop sets before each step

    def step() -> float:
        started = time.perf_counter()
        trainer.training_step(model, batch)
        trainer._clip_grad_norm(model)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        return time.perf_counter() - started

    return step, collate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "models" / "shapes-llava"))
    parser.add_argument("--pairs", type=int, default=4, help="pairs in the batch")
    parser.add_argument("--steps", type=int, default=5, help="steps of each side per repeat")
    parser.add_argument("--repeats", type=int, default=4, help="repeats (a warm-up step of each side comes first)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--rpo-alpha", type=float, default=0.0, help="chosen-NLL weight on both sides (0: DPO)")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be positive")

    import torch
    import transformers
    import trl

    transformers.utils.logging.set_verbosity_error()
    pairs, images = shapes_pairs(args.pairs)
    with tempfile.TemporaryDirectory() as directory:
        dataset = trl_dataset(pairs, images, Path(directory))
        worker_step, worker_collate = worker_stepper(args, pairs, images)
        trl_step, trl_collate = trl_stepper(args, dataset)
        warmup = {"worker": worker_step(), "trl": trl_step()}  # first kernels, allocations: left out
        runs = []
        for _ in range(args.repeats):  # step by step, alternating, so load on the machine falls on both alike
            pairs_of_times = [(worker_step(), trl_step()) for _ in range(args.steps)]
            runs.append(([w for w, _ in pairs_of_times], [t for _, t in pairs_of_times]))
    worker_all = [t for run in runs for t in run[0]]
    trl_all = [t for run in runs for t in run[1]]
    report = {
        "bench": "dpo_step",
        "model": args.model,
        "batch_pairs": args.pairs,
        "lora_rank": args.lora_rank,
        "loss": "dpo" if args.rpo_alpha == 0 else f"dpo+{args.rpo_alpha}*nll",
        "steps_kept": {"worker": len(worker_all), "trl": len(trl_all)},
        "worker_step_s_mean": statistics.fmean(worker_all),
        "trl_step_s_mean": statistics.fmean(trl_all),
        "trl_over_worker": statistics.fmean(trl_all) / statistics.fmean(worker_all),
        "per_repeat": [{"worker_step_s": statistics.fmean(w), "trl_step_s": statistics.fmean(t)} for w, t in runs],
        "warmup_step_s": warmup,
        "collate_s": {"worker": worker_collate, "trl": trl_collate},
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "machine": platform.machine(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
