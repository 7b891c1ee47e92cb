"""The Fact-RLHF reward model (LLaVA-RLHF, docs/papers.md §1) and its training recipe, `alignloop train reward`.

The model is the policy's own backbone with a LoRA on the language model and a scalar head (`ScalarHead`) on the
hidden state of the last token of the rating prompt (`training.reward_prompt`): the conversation, the answer, one
more user turn that lists the image's facts (shuffled) and the criteria, and the primer "The quality score of my last
response is". `--with-facts false` leaves the facts out: the plain reward model the paper compares against.

The recipe samples its preference pairs from the SFT model on ShapesWorld scenes, ranked by ground truth
(`training.reward_data`), adds users' pairs exported from the feedback store when `--feedback-pairs DIR` names them
(`alignloop feedback export --what reward-pairs --output DIR`), trains with -log sigmoid(r_chosen - r_rejected)
(with `--balance-kinds`, weighted so every kind of pair weighs the same; with `--facts-dropout F`, a share F of the
training pairs rated without their facts), and reports the accuracy on held-out pairs (validation scenes), overall
and per kind. The sampled pairs are cached (`--pairs-dir`), so a fact and a plain reward model train and are scored
on exactly the same pairs; a cache sampled with other settings (model, scenes, samples, probe samples, temperature,
pairs seed, question set, pixel noise) is sampled again. `--pixel-noise-std` renders the pairs' images noisier than
ShapesWorld's default: an image the reward model sees less well than it reads the facts, the condition facts are for.
The pairs have their own seed (`--pairs-seed`): reward models trained with different `--seed`s share the pairs.
Measured results: training/experiments/fact_rlhf/README.md.

It runs on one device or many: launched with `torchrun --nproc_per_node N -m training.reward_model ...`, every
process trains on its share of each batch, and the gradients are averaged by DDP (accelerate's `Accelerator`, the
default) or, with `--sharding fsdp`, by FSDP2 with the model's weights sharded over the processes
(`training.sharding`). CI runs both with 2 gloo processes on CPU. `--mixed-precision bf16` runs the forward passes
under autocast, the weights staying fp32 (with DDP; `bench/fact_rlhf_recipes.py` times it).

    alignloop train reward --output-dir runs/reward-fact
    alignloop train reward --output-dir runs/reward-plain --with-facts false
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from alignloop.settings import DEFAULT_MODEL
from training.ppo_losses import ScalarHead, reward_preference_loss
from training.reward_data import (
    QUESTION_SET,
    RewardPair,
    cache_made_with,
    kind_weights,
    load_pairs,
    save_pairs,
    shapes_reward_pairs,
)
from training.reward_prompt import DEFAULT_FACT_PLACEMENT, FACT_PLACEMENTS, RATING_PROMPT_VERSION, reward_model_text
from training.shapes_world import ShapesWorld, WorldConfig
from training.sharding import SHARDINGS, gathered_state_dict, is_sharded, shard
from training.tiny_llava import image_token_count, load_checkpoint

logger = logging.getLogger(__name__)

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"


class ScoredBackbone(torch.nn.Module):
    """A LoRA'd LLaVA and a `ScalarHead`: one score per row (the reward model) or one per token (the value model)."""

    def __init__(self, backbone, head: ScalarHead):
        super().__init__()
        self.backbone = backbone  # a PeftModel over LlavaForConditionalGeneration
        self.head = head

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The language model's final (normed) hidden states; the LM head is never computed."""
        llava = self.backbone.get_base_model().model  # LlavaModel, with the LoRA layers in place
        output = llava(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, position_ids=position_ids
        )
        return output.last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        per_token: bool = False,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One score per row (the head on the last attended token), or with `per_token` one per position."""
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, position_ids)
        if per_token:
            return self.head.linear(hidden).squeeze(-1)
        return self.head(hidden, attention_mask)


class RewardEncoder:
    """Encodes (conversation, answer, facts, image) rows as the reward model's input, right-padded."""

    def __init__(self, processor, with_facts: bool = True, facts_placement: str = DEFAULT_FACT_PLACEMENT):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.with_facts = with_facts
        self.facts_placement = facts_placement
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.image_seq_length = image_token_count(processor)

    def encode(self, messages: Sequence[dict], response: str, facts: Sequence[str], rng: random.Random) -> list[int]:
        text = reward_model_text(self.tokenizer, messages, response, facts, rng, self.with_facts, self.facts_placement)
        ids = []
        for token_id in self.tokenizer(text, add_special_tokens=False)["input_ids"]:
            ids += [token_id] * (self.image_seq_length if token_id == self.image_token_id else 1)
        return ids

    def collate(
        self, rows: Sequence[tuple[Sequence[dict], str, Sequence[str], object]], rng: random.Random
    ) -> dict[str, torch.Tensor]:
        """rows: (messages, response, facts, PIL image)."""
        encoded = [self.encode(messages, response, facts, rng) for messages, response, facts, _ in rows]
        length = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, ids in enumerate(encoded):
            input_ids[index, : len(ids)] = torch.tensor(ids)
            attention_mask[index, : len(ids)] = 1
        images = [image.convert("RGB") for *_, image in rows]
        pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}

    def collate_pairs(self, pairs: Sequence[RewardPair], rng: random.Random) -> dict[str, torch.Tensor]:
        """Rows [chosen_0..chosen_n, rejected_0..rejected_n]."""
        rows = [(p.messages, p.chosen, p.facts, p.image) for p in pairs]
        rows += [(p.messages, p.rejected, p.facts, p.image) for p in pairs]
        return self.collate(rows, rng)


def new_reward_model(model_dir: str | Path, lora_rank: int = 16, seed: int = 0):
    """(ScoredBackbone with a fresh LoRA and head, processor) on the checkpoint in `model_dir`."""
    from peft import get_peft_model

    from training.lora import language_model_lora

    torch.manual_seed(seed)
    model, processor = load_checkpoint(model_dir)
    backbone = get_peft_model(model, language_model_lora(rank=lora_rank))
    return ScoredBackbone(backbone, ScalarHead(model.config.text_config.hidden_size)), processor


def save_reward_model(model: ScoredBackbone, output_dir: str | Path, metadata: dict) -> Path:
    """The LoRA (PEFT layout), the head, and a JSON record of how it was trained (with_facts, base model, accuracy)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(str(output_dir), safe_serialization=True)
    save_file({k: v.detach().contiguous() for k, v in model.head.state_dict().items()}, str(output_dir / HEAD_FILE))
    metadata = {**metadata, "rating_prompt": RATING_PROMPT_VERSION}
    (output_dir / META_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return output_dir


def require_reward_model(directory: str | Path) -> Path:
    """`directory` as a Path; FileNotFoundError, with what to do, when no reward model was saved there."""
    directory = Path(directory)
    if not (directory / META_FILE).is_file():
        raise FileNotFoundError(
            f"no reward model at {directory}: {META_FILE} is missing (`alignloop train reward` makes one)"
        )
    return directory


def load_reward_model(
    directory: str | Path, base_model: str | Path | None = None, trainable: bool = False, zero_head: bool = False
):
    """(ScoredBackbone, processor, metadata) from `save_reward_model`'s directory.

    `trainable=True, zero_head=True` is PPO's value model: the reward LoRA as a starting point, a zero head."""
    from peft import PeftModel

    directory = require_reward_model(directory)
    metadata = json.loads((directory / META_FILE).read_text())
    if metadata.get("rating_prompt", 1) != RATING_PROMPT_VERSION:
        raise ValueError(
            f"the reward model at {directory} was trained on rating prompt version "
            f"{metadata.get('rating_prompt', 1)}, and this code writes version {RATING_PROMPT_VERSION}: "
            f"train it again (`alignloop train reward`)"
        )
    model, processor = load_checkpoint(base_model or metadata["base_model"])
    backbone = PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)
    head = ScalarHead(model.config.text_config.hidden_size, zero_init=zero_head)
    if not zero_head:
        head.load_state_dict(load_file(str(directory / HEAD_FILE)))
    scored = ScoredBackbone(backbone, head)
    scored.train(trainable)
    scored.requires_grad_(False) if not trainable else head.requires_grad_(True)
    return scored, processor, metadata


@torch.no_grad()
def score_rows(
    model: ScoredBackbone, encoder: RewardEncoder, rows: Sequence[tuple], rng: random.Random, batch_rows: int = 16
) -> torch.Tensor:
    """The reward of each (messages, response, facts, image) row."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(rows), batch_rows):
        batch = encoder.collate(rows[start : start + batch_rows], rng)
        scores.append(model(**{k: v.to(device) for k, v in batch.items()}).float().cpu())
    model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0)


def pair_accuracy(
    model: ScoredBackbone, encoder: RewardEncoder, pairs: Sequence[RewardPair], seed: int = 0
) -> dict[str, float]:
    """Share of pairs whose chosen answer scores higher, overall, by kind and as the mean over the kinds (the
    balanced accuracy, which a reward model that prefers one kind's usual answer cannot earn), and the mean margin."""
    rng = random.Random(seed)
    chosen = score_rows(model, encoder, [(p.messages, p.chosen, p.facts, p.image) for p in pairs], rng)
    rejected = score_rows(model, encoder, [(p.messages, p.rejected, p.facts, p.image) for p in pairs], rng)
    right = (chosen > rejected).float()
    report = {
        "accuracy": round(float(right.mean()), 4),
        "pairs": len(pairs),
        "margin": round(float((chosen - rejected).mean()), 4),
    }
    by_kind = {}
    for kind in sorted({p.kind for p in pairs}):
        rows = torch.tensor([p.kind == kind for p in pairs])
        by_kind[kind] = float(right[rows].mean())
        report[f"accuracy_{kind}"] = round(by_kind[kind], 4)
        report[f"pairs_{kind}"] = int(rows.sum())
    if by_kind:
        report["balanced_accuracy"] = round(sum(by_kind.values()) / len(by_kind), 4)
    return report


@dataclasses.dataclass
class RewardConfig:
    output_dir: str = dataclasses.field(default="runs/reward-model", metadata={"help": "Where the reward model goes."})
    model: str = dataclasses.field(default=DEFAULT_MODEL, metadata={"help": "The SFT checkpoint (backbone)."})
    with_facts: bool = dataclasses.field(default=True, metadata={"help": "List the image's facts in the prompt."})
    facts_placement: str = dataclasses.field(
        default=DEFAULT_FACT_PLACEMENT,
        metadata={"help": "before_answer (in the question's turn) or rating_turn (the paper's)."},
    )
    pairs_dir: str = dataclasses.field(
        default="runs/reward-pairs", metadata={"help": "Cache of the sampled pairs (made once, reused by every run)."}
    )
    train_scenes: int = dataclasses.field(default=600, metadata={"help": "Train-split scenes to sample pairs on."})
    eval_scenes: int = dataclasses.field(default=200, metadata={"help": "Validation scenes for held-out pairs."})
    samples: int = dataclasses.field(default=4, metadata={"help": "Answers sampled per description prompt."})
    probe_samples: int = dataclasses.field(
        default=8, metadata={"help": "Answers sampled per presence probe (mostly right, so more tries for a pair)."}
    )
    temperature: float = dataclasses.field(default=1.0, metadata={"help": "Sampling temperature for the pairs."})
    pixel_noise_std: float = dataclasses.field(
        default=WorldConfig.pixel_noise_std,
        metadata={"help": "Pixel noise of the pairs' images; more makes them harder to see, the facts stay exact."},
    )
    feedback_pairs: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Also train on these pairs from users (`alignloop feedback export --what reward-pairs`)."},
    )
    lora_rank: int = dataclasses.field(default=16, metadata={"help": "LoRA rank (the paper: 64)."})
    learning_rate: float = dataclasses.field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    epochs: int = dataclasses.field(default=3, metadata={"help": "Passes over the training pairs."})
    batch_pairs: int = dataclasses.field(default=8, metadata={"help": "Pairs per optimizer step, over all processes."})
    balance_kinds: bool = dataclasses.field(
        default=False,
        metadata={"help": "Weight the loss so every pair kind weighs the same (reward_data.kind_weights, at most 4)."},
    )
    facts_dropout: float = dataclasses.field(
        default=0.0, metadata={"help": "Share of training pairs rated without their facts (`without_facts`)."}
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "Seeds the LoRA, the head, the order and the facts."})
    pairs_seed: int = dataclasses.field(default=0, metadata={"help": "Seeds the sampled answers the pairs come from."})
    threads: int = dataclasses.field(default=0, metadata={"help": "torch threads per process; 0 keeps the default."})
    cpu: bool = dataclasses.field(default=False, metadata={"help": "Train on CPU even when there is a GPU."})
    mixed_precision: str | None = dataclasses.field(
        default=None, metadata={"help": "no, bf16 or fp16 (autocast, fp32 weights); default: accelerate's, else no."}
    )
    sharding: str = dataclasses.field(
        default="ddp", metadata={"help": "Over several processes: ddp (a whole copy each) or fsdp (training.sharding)."}
    )


def without_facts(pairs: Sequence[RewardPair], share: float, rng: random.Random) -> list[RewardPair]:
    """`pairs` with the facts left out of a random `share` of them: those are rated with the plain prompt.

    Modality dropout for the fact reward model: pairs without facts give it the plain model's way off the plateau
    where it first learns only the answers' wording; the held-out pairs keep all their facts. Measured in
    training/experiments/fact_rlhf/README.md ("Two changes to the reward-model loss")."""
    return [dataclasses.replace(pair, facts=()) if rng.random() < share else pair for pair in pairs]


def reward_pairs(config: RewardConfig, split: str, accelerator) -> list[RewardPair]:
    """The cached ShapesWorld pairs of `split`, sampled by the main process on first use."""
    directory = Path(config.pairs_dir) / split
    scenes = config.train_scenes if split == "train" else config.eval_scenes
    made_with = {
        "questions": QUESTION_SET,
        "model": str(Path(config.model).resolve()),
        "scenes": scenes,
        "samples": config.samples,
        "probe_samples": config.probe_samples,
        "temperature": config.temperature,
        "seed": config.pairs_seed,
        "pixel_noise_std": config.pixel_noise_std,
    }
    cached = cache_made_with(directory)
    if accelerator.is_main_process and cached != made_with:
        if cached is not None:
            logger.info(
                "the %s pairs in %s were sampled with other settings (%s); sampling again",
                split,
                directory,
                ", ".join(f"{k}={cached.get(k)}" for k in made_with if cached.get(k) != made_with[k]),
            )
        policy, processor = load_checkpoint(config.model)
        policy.to(accelerator.device)
        started = time.monotonic()
        world = ShapesWorld(WorldConfig(pixel_noise_std=config.pixel_noise_std))
        pairs = shapes_reward_pairs(
            policy,
            processor,
            world,
            split,
            scenes,
            samples=config.samples,
            probe_samples=config.probe_samples,
            temperature=config.temperature,
            seed=config.pairs_seed,
        )
        save_pairs(pairs, directory, made_with)
        logger.info(
            "sampled %d %s pairs from %d scenes in %.0f s", len(pairs), split, scenes, time.monotonic() - started
        )
    accelerator.wait_for_everyone()
    return load_pairs(directory)


def train(config: RewardConfig) -> dict:
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    if config.facts_placement not in FACT_PLACEMENTS:
        raise ValueError(
            f"--facts_placement must be one of {', '.join(FACT_PLACEMENTS)}, not {config.facts_placement!r}"
        )
    if config.sharding not in SHARDINGS:
        raise ValueError(f"--sharding must be one of {', '.join(SHARDINGS)}, not {config.sharding!r}")
    if not 0.0 <= config.facts_dropout <= 1.0:
        raise ValueError(f"--facts_dropout is a share of the pairs, from 0 to 1, not {config.facts_dropout}")
    if config.threads:
        torch.set_num_threads(config.threads)
    accelerator = Accelerator(cpu=config.cpu, mixed_precision=config.mixed_precision)
    sharded = is_sharded(accelerator, config.sharding)
    train_pairs = reward_pairs(config, "train", accelerator)
    eval_pairs = reward_pairs(config, "validation", accelerator)
    if config.feedback_pairs:
        if cache_made_with(config.feedback_pairs) is None:
            raise FileNotFoundError(f"no exported pairs in {config.feedback_pairs} (pairs.jsonl and made_with.json)")
        train_pairs += load_pairs(config.feedback_pairs)
    if not train_pairs:
        raise ValueError("no preference pairs to train on: the sampled answers never differed")
    weights = kind_weights([pair.kind for pair in train_pairs]) if config.balance_kinds else {}
    model, processor = new_reward_model(config.model, config.lora_rank, config.seed)
    encoder = RewardEncoder(processor, config.with_facts, config.facts_placement)
    processes, rank = accelerator.num_processes, accelerator.process_index
    per_process = max(1, config.batch_pairs // processes)
    steps_per_epoch = math.ceil(len(train_pairs) / (per_process * processes))
    total_steps = steps_per_epoch * config.epochs
    if sharded:
        model = shard(model.to(accelerator.device), model.backbone)  # the optimizer then holds the shards
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, total_steps // 20), total_steps)
    if not sharded:
        model, optimizer = accelerator.prepare(model, optimizer)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rng, order = random.Random(f"{config.seed}-facts-{rank}"), random.Random(config.seed)
    dropout_rng = random.Random(f"{config.seed}-facts-dropout-{rank}")
    started, history = time.monotonic(), []
    model.train()
    with tqdm(total=total_steps, desc="reward model", unit="step", disable=not accelerator.is_main_process) as bar:
        for epoch in range(config.epochs):
            shuffled = order.sample(train_pairs, len(train_pairs))  # the same order in every process
            for step in range(steps_per_epoch):
                batch_pairs = shuffled[step * per_process * processes : (step + 1) * per_process * processes]
                mine = batch_pairs[rank::processes] or batch_pairs[:1]
                if config.facts_dropout:
                    mine = without_facts(mine, config.facts_dropout, dropout_rng)
                batch = {k: v.to(accelerator.device) for k, v in encoder.collate_pairs(mine, rng).items()}
                scores = model(**batch)
                chosen, rejected = scores[: len(mine)], scores[len(mine) :]
                pair_losses = reward_preference_loss(chosen, rejected)
                if weights:
                    pair_losses = pair_losses * torch.tensor([weights[p.kind] for p in mine], device=pair_losses.device)
                loss = pair_losses.mean()
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                record = {
                    "epoch": epoch,
                    "step": len(history) + 1,
                    "loss": round(loss.item(), 5),
                    "accuracy": round(float((chosen > rejected).float().mean()), 4),
                    "elapsed_s": round(time.monotonic() - started, 3),
                }
                history.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
    accelerator.wait_for_everyone()
    summary: dict = {}
    if sharded:  # every process takes part in each forward pass and in gathering the weights
        held_out = pair_accuracy(model, encoder, eval_pairs, config.seed)
        state = gathered_state_dict(model)
        if accelerator.is_main_process:
            scored, _ = new_reward_model(config.model, config.lora_rank, config.seed)
            scored.load_state_dict(state)
    elif accelerator.is_main_process:
        scored = accelerator.unwrap_model(model)
        held_out = pair_accuracy(scored, encoder, eval_pairs, config.seed)
    if accelerator.is_main_process:
        summary = {
            "with_facts": config.with_facts,
            "facts_placement": config.facts_placement,
            "base_model": str(Path(config.model).resolve()),
            "lora_rank": config.lora_rank,
            "train_pairs": len(train_pairs),
            "pixel_noise_std": config.pixel_noise_std,
            "balance_kinds": config.balance_kinds,
            "facts_dropout": config.facts_dropout,
            "kind_weights": {k: round(w, 4) for k, w in sorted(weights.items())},
            "steps": total_steps,
            "processes": processes,
            "sharding": "fsdp" if sharded else "ddp",
            "mixed_precision": accelerator.mixed_precision,
            "device": str(accelerator.device),
            "minutes": round((time.monotonic() - started) / 60, 3),
            "train_loss_last_epoch": round(sum(r["loss"] for r in history[-steps_per_epoch:]) / steps_per_epoch, 4),
            "held_out": held_out,
        }
        save_reward_model(scored, output_dir, summary)
        with (output_dir / "metrics.jsonl").open("w") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in history)
        logger.info("reward model with_facts=%s held-out accuracy %.3f", config.with_facts, held_out["accuracy"])
    accelerator.wait_for_everyone()
    return summary


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    from training.recipe_args import recipe_parser

    parser = recipe_parser(RewardConfig, prog, __doc__.split("\n\n")[0])
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    summary = train(config)
    if summary:
        print(json.dumps(summary["held_out"]))
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
