"""SFT recipe: supervised fine-tuning of a LLaVA on ShapesWorld conversations.

Each example is one rendered scene and a conversation about it in the LLaVA-1.5 chat format: either a detailed
description, or up to `max_turns` short questions (two yes/no presence probes, then color, shape, size, count,
position, multiple choice). The loss is next-token cross-entropy on the assistant turns only, weighted so that every
answer counts the same. Scenes are drawn fresh for every step from the train split, which carries ShapesWorld's
co-occurrence bias, caption noise and probe noise, so the model learns the same biased prior that makes real LLaVAs
hallucinate.

A fresh tiny model (a tokenizer is trained first) goes through five stages:
- stage 0, vision: the tower is pretrained on ShapesWorld scene graphs; it stands in for LLaVA's pretrained CLIP,
  which no hub can provide here;
- stage 1, grounding: with the tower frozen (as LLaVA freezes CLIP), the projector and language model learn from
  short questions alone (presence probes, color, shape, size, position, count) to look an object up in the image;
- stage 2, SFT: the full conversation mix, descriptions included, every answer weighing the same;
- stage 3, polish: the SFT stream again at half the rate, with half of the plain per-token loss mixed in, so the
  long descriptions (several color/shape/position bindings each) weigh more;
- stage 4, describe: the same stream once more, at a lower rate still and with the plain per-token loss alone, the
  way LLaVA's long detailed-description data is learned: the descriptions now dominate the gradient, and the model
  takes on their habits, the named-anyway partner included.
Two optional stages, off by default and for the bundled model, also run after `--init`:
- stage 5, chat (`--chat-steps`): half of the conversations become long chats (`ShapesWorld.chat`: the description
  and up to eleven follow-up questions, ~280 tokens against SFT's ~145), with the describe stage's per-token loss;
- stage 6, read (`--read-steps`): half of the conversations get the scene's facts as text in their first user turn,
  between the image and the question, and answers true to the scene (no caption or probe noise); half of those show
  a blank image, so only the text can answer. `--read-description-share` sets how many reading conversations are a
  description (a third by default), `--read-quiz-share` how many are attribute quizzes (`ShapesWorld.quiz`).
They are the Fact-RLHF experiment's SFT+: its fact-augmented reward model reads long prompts and must take what the
facts say from their text (training/experiments/fact_rlhf/README.md measures both stages). How the recipe and its
defaults were chosen is in the model card, models/shapes-llava/README.md.
For a large checkpoint (`--init PATH --lora-rank 64`) stages 0 and 1 are skipped, the vision tower stays frozen and
the language model gets a PEFT LoRA, merged into the weights at the end. AdamW with warm-up and cosine decay per
stage; a fixed seed; tqdm bars and a metrics.jsonl (stage, step, loss, learning rate, validation loss) to plot.
The model trains on the GPU when there is one (`--device`); `--loader-workers N` renders the batches in N processes
ahead of the model, with the same batches as in the loop.

    alignloop train sft --output-dir models/shapes-llava
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from alignloop.settings import DEFAULT_MODEL
from training.losses import IGNORE_INDEX, weighted_token_cross_entropy
from training.reward_prompt import with_facts_before_question
from training.shapes_world import COLORS, GRID, SHAPES, SIZES, Scene, ShapesWorld
from training.tiny_llava import (
    TinyLlavaSpec,
    build_model,
    build_processor,
    count_parameters,
    image_token_count,
    load_checkpoint,
    save_checkpoint,
    train_tokenizer,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SFTConfig:
    output_dir: str = dataclasses.field(default=DEFAULT_MODEL, metadata={"help": "Where the checkpoint goes."})
    init: str | None = dataclasses.field(
        default=None, metadata={"help": "Start from this checkpoint directory instead of a fresh tiny model."}
    )
    steps: int = dataclasses.field(default=1400, metadata={"help": "SFT optimizer steps (after stage 0)."})
    batch_size: int = dataclasses.field(default=32, metadata={"help": "Scenes (conversations) per step."})
    learning_rate: float = dataclasses.field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    warmup_steps: int = dataclasses.field(default=100, metadata={"help": "Linear warm-up before cosine decay."})
    weight_decay: float = dataclasses.field(default=0.01, metadata={"help": "AdamW weight decay."})
    max_turns: int = dataclasses.field(default=8, metadata={"help": "Question/answer turns per conversation."})
    vision_pretrain_steps: int = dataclasses.field(
        default=2000, metadata={"help": "Stage 0 for a fresh model: scene-graph pretraining of the vision tower."}
    )
    vision_learning_rate: float = dataclasses.field(default=1e-3, metadata={"help": "Stage-0 learning rate."})
    grounding_steps: int = dataclasses.field(
        default=400,
        metadata={"help": "Stage 1 for a fresh model: short questions only (no descriptions), before the SFT mix."},
    )
    token_loss_share: float = dataclasses.field(
        default=0.0,
        metadata={"help": "SFT stage: share of the plain per-token loss mixed into the answer-weighted one."},
    )
    polish_steps: int = dataclasses.field(
        default=1000,
        metadata={"help": "Stage 3 for a fresh model: SFT again at a lower rate, per-token loss mixed in."},
    )
    polish_learning_rate: float = dataclasses.field(default=5e-4, metadata={"help": "Stage-3 peak learning rate."})
    polish_warmup_steps: int = dataclasses.field(default=30, metadata={"help": "Stage-3 linear warm-up."})
    polish_token_share: float = dataclasses.field(
        default=0.5, metadata={"help": "Stage 3: share of the per-token loss (descriptions teach attribute binding)."}
    )
    describe_steps: int = dataclasses.field(
        default=400, metadata={"help": "Stage 4 for a fresh model: SFT once more with the per-token loss alone."}
    )
    describe_learning_rate: float = dataclasses.field(default=3e-4, metadata={"help": "Stage-4 peak learning rate."})
    describe_warmup_steps: int = dataclasses.field(default=30, metadata={"help": "Stage-4 linear warm-up."})
    chat_steps: int = dataclasses.field(
        default=0, metadata={"help": "Stage 5, also after --init: long multi-turn chats mixed in; 0 skips it."}
    )
    chat_share: float = dataclasses.field(
        default=0.5,
        metadata={"help": "Chat stage: share of the conversations that are long chats (the rest as in SFT)."},
    )
    chat_turns: int = dataclasses.field(default=12, metadata={"help": "Chat stage: turns per long chat."})
    chat_learning_rate: float = dataclasses.field(default=3e-4, metadata={"help": "Chat-stage peak learning rate."})
    chat_warmup_steps: int = dataclasses.field(default=30, metadata={"help": "Chat-stage linear warm-up."})
    read_steps: int = dataclasses.field(
        default=0,
        metadata={"help": "Stage 6, last, also after --init: questions answered from facts as text; 0 skips it."},
    )
    read_share: float = dataclasses.field(
        default=0.5, metadata={"help": "Read stage: share of the conversations with the scene's facts as text."}
    )
    read_blank_share: float = dataclasses.field(
        default=0.5, metadata={"help": "Read stage: share of the reading conversations shown a blank image."}
    )
    read_description_share: float = dataclasses.field(
        default=1 / 3, metadata={"help": "Read stage: share of the reading conversations that are a description."}
    )
    read_quiz_share: float = dataclasses.field(
        default=0.0,
        metadata={
            "help": "Read stage: share of the reading conversations that are attribute quizzes (ShapesWorld.quiz)."
        },
    )
    read_learning_rate: float = dataclasses.field(default=3e-4, metadata={"help": "Read-stage peak learning rate."})
    read_warmup_steps: int = dataclasses.field(default=30, metadata={"help": "Read-stage linear warm-up."})
    freeze_vision_tower: bool = dataclasses.field(
        default=True, metadata={"help": "Freeze the vision tower during SFT, as LLaVA does with its CLIP tower."}
    )
    lora_rank: int = dataclasses.field(
        default=0, metadata={"help": "0: full fine-tuning. >0: freeze the vision tower, LoRA on the language model."}
    )
    eval_every: int = dataclasses.field(default=250, metadata={"help": "Steps between validation-loss checks."})
    val_scenes: int = dataclasses.field(default=128, metadata={"help": "Validation conversations per check."})
    time_budget_minutes: float = dataclasses.field(
        default=0.0, metadata={"help": "Stop early (and save) after this many minutes; 0 means no limit."}
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "Seeds the model init and the scene order."})
    threads: int = dataclasses.field(default=0, metadata={"help": "torch threads; 0 keeps torch's default."})
    device: str = dataclasses.field(
        default="auto",
        metadata={"help": "Where the model trains: auto (cuda when there is one), cpu, cuda, cuda:1, ..."},
    )
    loader_workers: int = dataclasses.field(
        default=0, metadata={"help": "Processes rendering and collating batches ahead of the model; 0: in the loop."}
    )


class ConversationCollator:
    """Turns scenes into a padded batch: the chat-template text, image tokens expanded, labels on answers only.

    `short_only` makes every conversation short questions (two yes/no presence probes plus color, shape, size,
    position, count and multiple choice), never a description: the grounding stage. `chat_share` makes that share
    of the conversations long chats of `chat_turns` turns (`ShapesWorld.chat`), drawn per scene: the chat stage.
    `read_share` makes that share of them reading conversations, drawn per scene: the scene's facts as text in the
    first user turn, after the image and before the question (the layout of the reward model's facts-before-answer
    prompt, `training.reward_prompt.with_facts_before_question`), and answers true to the scene, without the train
    split's noise; `read_blank_share` of those show a blank image (`ShapesWorld.render(blank=True)`), so the answers
    can only come from the text; `read_quiz_share` of them are attribute quizzes (`ShapesWorld.quiz`) and
    `read_description_share` of the others a description: the read stage.
    """

    def __init__(
        self,
        world: ShapesWorld,
        processor,
        max_turns: int,
        short_only: bool = False,
        chat_share: float = 0.0,
        chat_turns: int = 12,
        read_share: float = 0.0,
        read_blank_share: float = 0.5,
        read_description_share: float = 1 / 3,
        read_quiz_share: float = 0.0,
    ):
        self.world = world
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_turns = max_turns
        self.short_only = short_only
        self.chat_share = chat_share
        self.chat_turns = chat_turns
        self.read_share = read_share
        self.read_blank_share = read_blank_share
        self.read_description_share = read_description_share
        self.read_quiz_share = read_quiz_share
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.image_seq_length = image_token_count(processor)

    def reading(self, scene: Scene) -> str | None:
        """None for a conversation without facts; "image" or "blank" (the image it shows) for a reading one."""
        draw = random.Random(scene.seed * 29 + 13)
        if not (self.read_share and draw.random() < self.read_share):
            return None
        return "blank" if draw.random() < self.read_blank_share else "image"

    def messages(self, scene: Scene) -> list[dict]:
        messages = []
        reading = self.reading(scene)
        quizzed = reading and random.Random(scene.seed * 29 + 15).random() < self.read_quiz_share
        quiz = self.world.quiz(scene, self.max_turns) if quizzed else []
        if quiz:  # empty too when the objects all look alike: nothing to quiz, a usual reading conversation instead
            items = quiz
        elif reading:
            items = self.world.conversation(scene, self.max_turns, self.read_description_share, noisy=False)
        elif self.chat_share and random.Random(scene.seed * 7 + 3).random() < self.chat_share:
            items = self.world.chat(scene, self.chat_turns)
        else:
            items = self.world.conversation(scene, self.max_turns, description_share=0.0 if self.short_only else 1 / 3)
        for turn, item in enumerate(items):
            parts = ([{"type": "image"}] if turn == 0 else []) + [{"type": "text", "text": item.question}]
            messages.append({"role": "user", "content": parts})
            messages.append({"role": "assistant", "content": item.answer})
        if reading:
            shuffle = random.Random(scene.seed * 29 + 14)
            messages = with_facts_before_question(messages, self.world.facts(scene), shuffle, user_turn=0)
        return messages

    def encode(self, messages: list[dict]) -> tuple[list[int], list[int], list[float]]:
        """Token ids, labels and loss weights for one conversation.

        Labels cover each answer and its end-of-turn token; each answer's tokens share a weight of 1, so every
        answer counts the same in the loss whatever its length.
        """
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        spans, cursor = [], 0
        for message in messages:
            if message["role"] != "assistant":
                continue
            marker = "ASSISTANT: " + message["content"] + self.tokenizer.eos_token
            start = text.index(marker, cursor) + len("ASSISTANT:")  # the space before the answer belongs to it
            spans.append((start, start + len(marker) - len("ASSISTANT:")))
            cursor = spans[-1][1]
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids, labels, span_of_token = [], [], []
        for token_id, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
            span = next((i for i, (s, e) in enumerate(spans) if s <= start and end <= e), None)
            if token_id == self.image_token_id:
                input_ids += [token_id] * self.image_seq_length
                labels += [IGNORE_INDEX] * self.image_seq_length
                span_of_token += [None] * self.image_seq_length
            else:
                input_ids.append(token_id)
                labels.append(token_id if span is not None else IGNORE_INDEX)
                span_of_token.append(span)
        tokens_per_span = Counter(span for span in span_of_token if span is not None)
        weights = [0.0 if span is None else 1.0 / tokens_per_span[span] for span in span_of_token]
        return input_ids, labels, weights

    def __call__(self, scenes: list[Scene]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(self.messages(scene)) for scene in scenes]
        length = max(len(ids) for ids, _, _ in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(scenes), length), pad, dtype=torch.long)
        labels = torch.full((len(scenes), length), IGNORE_INDEX, dtype=torch.long)
        loss_weights = torch.zeros((len(scenes), length), dtype=torch.float32)
        attention_mask = torch.zeros((len(scenes), length), dtype=torch.long)
        for row, (ids, labs, weights) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(labs)] = torch.tensor(labs)
            loss_weights[row, : len(weights)] = torch.tensor(weights)
            attention_mask[row, : len(ids)] = 1
        images = [self.world.render(scene, blank=self.reading(scene) == "blank") for scene in scenes]
        pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "loss_weights": loss_weights,
            "pixel_values": pixel_values,
        }


class StepBatches(torch.utils.data.Dataset):
    """Batch number `step` of a stage: `make_batch` applied to the scenes drawn for that step.

    The scene indices of every step are drawn up front from the stage's seeded stream, so the batches are the same
    whether they are built in the training loop or ahead of it by DataLoader workers (`loader_workers`).
    """

    def __init__(self, world: ShapesWorld, make_batch, scene_indices: list[list[int]]):
        self.world = world
        self.make_batch = make_batch
        self.scene_indices = scene_indices

    def __len__(self) -> int:
        return len(self.scene_indices)

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return self.make_batch([self.world.scene("train", i) for i in self.scene_indices[step]])


def step_batches(world: ShapesWorld, make_batch, order: random.Random, steps: int, config: SFTConfig):
    """Iterates the batches of a stage in step order, rendered by `config.loader_workers` processes when > 0."""
    indices = [order.sample(range(100_000_000), config.batch_size) for _ in range(steps)]
    dataset = StepBatches(world, make_batch, indices)
    workers = config.loader_workers
    return iter(
        torch.utils.data.DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=workers, prefetch_factor=4 if workers else None
        )
    )


def training_device(config: SFTConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def answer_loss(model, batch: dict[str, torch.Tensor], token_share: float = 0.0) -> torch.Tensor:
    """The SFT loss on a collated batch: token cross-entropy weighted so that every answer counts the same.

    `token_share` mixes in the plain per-token loss, in which long descriptions weigh more: they carry many
    color/shape/position bindings per answer, which short questions teach only one at a time.
    """
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_weights")}
    logits = model(**inputs).logits
    loss = weighted_token_cross_entropy(logits, batch["labels"], batch["loss_weights"])
    if token_share > 0:
        per_token = (batch["labels"] != IGNORE_INDEX).float()
        loss = (1 - token_share) * loss + token_share * weighted_token_cross_entropy(logits, batch["labels"], per_token)
    return loss


def vision_tower(model) -> torch.nn.Module:
    """The vision tower of a LLaVA, also when it is wrapped in a PEFT model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.vision_tower


def prepare_model(config: SFTConfig, world: ShapesWorld):
    """The model and processor to train: a fresh tiny LLaVA, or a checkpoint (optionally with a LoRA)."""
    if config.init is None:
        spec = TinyLlavaSpec()
        tokenizer = train_tokenizer(world, spec.vocab_size)
        processor = build_processor(tokenizer, spec)
        model = build_model(tokenizer, spec, seed=config.seed)
    else:
        model, processor = load_checkpoint(config.init)
    # LLaVA reads image features from an encoder layer, so the vision tower's final LayerNorm is never used.
    for parameter in vision_tower(model).post_layernorm.parameters():
        parameter.requires_grad_(False)
    if config.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        vision_tower(model).requires_grad_(False)
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=2 * config.lora_rank,
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
            modules_to_save=["multi_modal_projector"],
        )
        model = get_peft_model(model, lora)
    return model, processor


class SceneGraphProbe(torch.nn.Module):
    """Stage-0 head: reads the shape, color and size (or 'empty') of the object in a patch's cell from its feature."""

    def __init__(self, hidden: int):
        super().__init__()
        self.shape = torch.nn.Linear(hidden, len(SHAPES) + 1)
        self.color = torch.nn.Linear(hidden, len(COLORS) + 1)
        self.size = torch.nn.Linear(hidden, len(SIZES) + 1)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"shape": self.shape(features), "color": self.color(features), "size": self.size(features)}


def scene_graph_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Per cell (row-major 3x3) class indices; index 0 means the cell is empty."""
    targets = {key: torch.zeros(len(scenes), GRID * GRID, dtype=torch.long) for key in ("shape", "color", "size")}
    for row, scene in enumerate(scenes):
        for obj in scene.objects:
            cell = obj.row * GRID + obj.col
            targets["shape"][row, cell] = SHAPES.index(obj.shape) + 1
            targets["color"][row, cell] = list(COLORS).index(obj.color) + 1
            targets["size"][row, cell] = SIZES.index(obj.size) + 1
    return targets


def patch_cells(side: int) -> torch.Tensor:
    """For a side x side patch grid in row-major order, the index of the 3x3 scene-grid cell each patch lies in."""
    return torch.tensor(
        [(row * GRID // side) * GRID + col * GRID // side for row in range(side) for col in range(side)]
    )


class SceneGraphBatch:
    """Stage-0 batches: pixel values and, per patch, the class indices of the object in the patch's grid cell."""

    def __init__(self, world: ShapesWorld, processor):
        self.world = world
        self.processor = processor
        self.cell_of_patch = patch_cells(processor.image_processor.crop_size["height"] // processor.patch_size)

    def __call__(self, scenes: list[Scene]) -> dict[str, torch.Tensor]:
        pixels = self.processor.image_processor([self.world.render(s) for s in scenes], return_tensors="pt")
        targets = {
            key: cell_targets[:, self.cell_of_patch] for key, cell_targets in scene_graph_targets(scenes).items()
        }
        return {"pixel_values": pixels["pixel_values"], **targets}


def pretrain_vision_tower(model, processor, world: ShapesWorld, config: SFTConfig) -> list[dict]:
    """Stage 0 for a from-scratch model: teach the vision tower to see before the language model learns to talk.

    LLaVA starts from a pretrained CLIP; no hub is reachable here, so the tiny tower is pretrained on ShapesWorld's
    scene graphs instead: linear heads classify, from every patch feature (of the layer LLaVA reads), the shape,
    color and size of the object in that patch's grid cell. Per patch, not pooled per cell: the language model
    finds "the moon" by attending to the image tokens whose features say moon, so each token must carry its
    object's shape on its own (the model card has what cell-pooled heads did). Without this stage the language model
    first learns to answer blind and the image only starts to matter after many hundreds of steps.
    Returns per-step records.
    """
    tower = vision_tower(model)
    device = next(tower.parameters()).device
    probe = SceneGraphProbe(tower.config.hidden_size).to(device)
    params = [p for p in tower.parameters() if p.requires_grad] + list(probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.vision_learning_rate, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.vision_pretrain_steps)
    batches = step_batches(
        world, SceneGraphBatch(world, processor), random.Random(config.seed + 1), config.vision_pretrain_steps, config
    )
    records = []
    for step in tqdm(range(1, config.vision_pretrain_steps + 1), desc="vision stage 0", unit="step"):
        targets = to_device(next(batches), device)
        hidden = tower(targets.pop("pixel_values"), output_hidden_states=True).hidden_states
        logits = probe(hidden[model.config.vision_feature_layer][:, 1:])  # per patch, without the class token
        losses = {k: torch.nn.functional.cross_entropy(logits[k].flatten(0, 1), targets[k].flatten()) for k in logits}
        loss = sum(losses.values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        accuracy = {k: float((logits[k].argmax(-1) == targets[k]).float().mean()) for k in logits}
        records.append(
            {"stage": "vision", "step": step, "loss": round(loss.item(), 5)}
            | {f"patch_{k}_accuracy": round(v, 4) for k, v in accuracy.items()}
        )
    return records


@torch.no_grad()
def validation_loss(model, batches: list[dict[str, torch.Tensor]]) -> float:
    """The answer-weighted loss over the validation batches (each batch weighted by its number of answers)."""
    model.eval()
    total, answers = 0.0, 0.0
    for batch in batches:
        n = float(batch["loss_weights"][:, 1:].sum())
        total += float(answer_loss(model, batch)) * n
        answers += n
    model.train()
    return total / max(answers, 1.0)


def run_stage(
    stage: str,
    model,
    world: ShapesWorld,
    collator: ConversationCollator,
    config: SFTConfig,
    steps: int,
    metrics_file,
    started: float,
    learning_rate: float | None = None,
    warmup_steps: int | None = None,
    token_share: float = 0.0,
    order_key: str | None = None,
) -> tuple[int, dict]:
    """One stage of conversation training (AdamW, warm-up then cosine decay, answer-weighted loss with
    `token_share` of the per-token loss); returns the number of steps run and the last metrics record. The
    training scenes come from a stream seeded by `order_key` (the stage name by default). Validation loss
    (answer-weighted) on clean validation scenes every eval_every steps."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    learning_rate = config.learning_rate if learning_rate is None else learning_rate
    warmup_steps = config.warmup_steps if warmup_steps is None else warmup_steps
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(warmup_steps, steps // 4), steps)
    device = next(model.parameters()).device
    val_batches = [
        to_device(collator(list(world.scenes("validation", config.batch_size, start))), device)
        for start in range(0, config.val_scenes, config.batch_size)
    ]
    logger.info("%s start trainable=%d steps=%d", stage, sum(p.numel() for p in trainable), steps)
    batches = step_batches(world, collator, random.Random(f"{config.seed}-{order_key or stage}"), steps, config)
    step, val, record = 0, float("nan"), {}
    with tqdm(total=steps, desc=stage, unit="step") as bar:
        for step in range(1, steps + 1):
            batch = to_device(next(batches), device)
            loss = answer_loss(model, batch, token_share)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            record = {"stage": stage, "step": step, "loss": round(loss.item(), 5), "lr": scheduler.get_last_lr()[0]}
            out_of_time = config.time_budget_minutes and time.monotonic() - started > 60 * config.time_budget_minutes
            if step % config.eval_every == 0 or step == steps or out_of_time:
                val = validation_loss(model, val_batches)
                record["val_loss"] = round(val, 5)
            record["elapsed_s"] = round(time.monotonic() - started, 1)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            bar.set_postfix(loss=f"{record['loss']:.3f}", val=f"{val:.3f}")
            bar.update()
            if out_of_time:
                logger.info("%s time budget reached at step %d", stage, step)
                break
    return step, record


def train(config: SFTConfig, world: ShapesWorld | None = None) -> dict:
    """Runs the stages (vision, grounding, SFT, polish, describe) and saves the checkpoint; returns a summary.

    `world` defaults to ShapesWorld's own configuration (experiments pass variants, e.g. another caption noise).
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    world = world or ShapesWorld()
    device = training_device(config)
    model, processor = prepare_model(config, world)
    model.to(device).train()
    started = time.monotonic()
    fresh = config.init is None
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    logger.info("sft params=%d output=%s", count_parameters(model), output_dir)
    stage0_records, grounding_steps = [], 0
    with (output_dir / "metrics.jsonl").open("w") as metrics_file:
        if fresh and config.vision_pretrain_steps > 0:
            stage0_records = pretrain_vision_tower(model, processor, world, config)
            for record in stage0_records:
                metrics_file.write(json.dumps(record) + "\n")
        if config.freeze_vision_tower:
            vision_tower(model).requires_grad_(False)
        if fresh and config.grounding_steps > 0:
            # Short questions only first: each answer is a lookup of one object in the image, and no description
            # can be answered from the language prior, so the model learns to look before it learns to narrate.
            short = ConversationCollator(world, processor, config.max_turns, short_only=True)
            grounding_steps, _ = run_stage(
                "grounding", model, world, short, config, config.grounding_steps, metrics_file, started
            )
        collator = ConversationCollator(world, processor, config.max_turns)
        step, record = 0, {}
        if config.steps > 0:
            step, record = run_stage(
                "sft",
                model,
                world,
                collator,
                config,
                config.steps,
                metrics_file,
                started,
                token_share=config.token_loss_share,
            )
        polish_steps = 0
        if fresh and config.polish_steps > 0:
            # A second pass over the SFT scene stream at a lower rate; the per-token share lets descriptions, with
            # several color/shape/position bindings each, teach attributes that one-word answers teach slowly.
            polish_steps, record = run_stage(
                "polish",
                model,
                world,
                collator,
                config,
                config.polish_steps,
                metrics_file,
                started,
                config.polish_learning_rate,
                config.polish_warmup_steps,
                config.polish_token_share,
                order_key="sft",
            )
        describe_steps = 0
        if fresh and config.describe_steps > 0:
            # Per-token loss alone: a description's twenty-odd tokens outweigh a one-word answer twenty to one, as
            # they do when a LLaVA learns from long detailed-description data, habits and all.
            describe_steps, record = run_stage(
                "describe",
                model,
                world,
                collator,
                config,
                config.describe_steps,
                metrics_file,
                started,
                config.describe_learning_rate,
                config.describe_warmup_steps,
                1.0,
                order_key="sft",
            )
        chat_steps = 0
        if config.chat_steps > 0:
            # Long chats beside the usual conversations, with the per-token loss of the stage before (so the
            # descriptions keep their weight and their habits): contexts twice as long as SFT's, with user turns
            # after an answer, which is where the reward model's rating turn sits.
            chats = ConversationCollator(
                world, processor, config.max_turns, chat_share=config.chat_share, chat_turns=config.chat_turns
            )
            chat_steps, record = run_stage(
                "chat",
                model,
                world,
                chats,
                config,
                config.chat_steps,
                metrics_file,
                started,
                config.chat_learning_rate,
                config.chat_warmup_steps,
                1.0,
            )
        read_steps = 0
        if config.read_steps > 0:
            # Facts as text beside the image, answered from them (from them alone when the image is blank), with the
            # same per-token loss: the reading a pretrained LLM brings to a LLaVA and this backbone never had.
            readings = ConversationCollator(
                world,
                processor,
                config.max_turns,
                read_share=config.read_share,
                read_blank_share=config.read_blank_share,
                read_description_share=config.read_description_share,
                read_quiz_share=config.read_quiz_share,
            )
            read_steps, record = run_stage(
                "read",
                model,
                world,
                readings,
                config,
                config.read_steps,
                metrics_file,
                started,
                config.read_learning_rate,
                config.read_warmup_steps,
                1.0,
            )
    model.to("cpu")
    if config.lora_rank > 0:
        model = model.merge_and_unload()
    save_checkpoint(model, processor, output_dir)
    summary = {
        "vision_pretrain_steps": len(stage0_records),
        "grounding_steps": grounding_steps,
        "steps": step,
        "polish_steps": polish_steps,
        "describe_steps": describe_steps,
        "chat_steps": chat_steps,
        "read_steps": read_steps,
        "minutes": round((time.monotonic() - started) / 60, 1),
        "final_loss": record.get("loss"),
        "val_loss": record.get("val_loss"),
        "parameters": count_parameters(model),
        "config": dataclasses.asdict(config),
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "world": dataclasses.asdict(world.config),
    }
    (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info(
        "sft done steps=%d chat_steps=%d read_steps=%d minutes=%.1f val_loss=%s",
        step,
        chat_steps,
        read_steps,
        summary["minutes"],
        summary["val_loss"],
    )
    return summary


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    from training.recipe_args import recipe_parser

    parser = recipe_parser(SFTConfig, prog, __doc__.split("\n\n")[0])
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    return train(config)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
