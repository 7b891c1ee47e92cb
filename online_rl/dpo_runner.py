"""DPO and Dense DPO rounds on whatever the machine has: the CPU, one GPU, or several under `accelerate launch`.

`PreferenceTrainer` owns accelerate's `Accelerator` and the base model, loaded once onto the accelerator's device
and kept between rounds. A round wraps the base in a LoRA (the parent version's adapter, trainable, or a fresh one),
trains it on the round's preference pairs with `online_rl.dpo.preference_loss` (DPO, or Dense DPO with per-token
weights; the reference is the same model with its adapter disabled), and returns the trained `PeftModel` for the
caller to publish. The next round first takes that LoRA off again (PEFT's `unload`, which removes the LoRA layers
and leaves the base weights untouched), so no round pays for loading the model.

- Device and precision: the accelerator's device (CUDA when present). `mixed_precision="auto"` runs the forward
  passes under bf16 autocast on CUDA and in plain fp32 on the CPU; `base_dtype="auto"` keeps the frozen base in
  bf16 on CUDA (half the memory; the LoRA weights stay fp32) and fp32 on the CPU. On a CPU-only machine a round
  computes exactly what the trainer's own loop computes (same order, seeds, clipping and optimizer).
- Several GPUs: under `accelerate launch --num_processes N` every process holds the model, takes every N-th pair of
  each batch (a batch smaller than N is repeated cyclically so no process idles), and DDP averages the LoRA's
  gradients; metrics are averaged over the processes. Only the main process (`is_main_process`) should publish.

    runner = PreferenceTrainer(settings.model, RoundConfig.from_settings(settings), store.get_image)  # once
    parent = store.get_adapter(promoted).path if promoted else None
    policy = runner.wrap(parent)                       # optional: sample BDHS / online pairs from it first
    output = runner.train_round(pairs, parent_adapter=parent)
    publish_adapter(store, output.policy, adapter_dir, model, algorithm="dense-dpo", ...)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch

from online_rl.dpo import PreferenceLossConfig, preference_loss
from online_rl.pairs import PreferencePair
from online_rl.preference_batch import PreferenceEncoder

logger = logging.getLogger(__name__)

ImageLoader = Callable[[str], bytes | None]


@dataclasses.dataclass(frozen=True)
class RoundConfig:
    """One round's training: the trainer's settings of the same names."""

    algorithm: Literal["dpo", "dense-dpo"] = "dense-dpo"
    epochs: int = 3
    batch_pairs: int = 4
    learning_rate: float = 5e-4
    beta: float = 0.1
    gamma: float = 5.0  # Dense DPO: weight of corrected tokens
    correction_end_weight: float | None = None  # Dense DPO: weight of a correction's end-of-answer token
    dense_normalize: bool = True
    sft_weight: float = 1.0  # RPO: weight of the chosen answers' NLL
    lora_rank: int = 8  # of a fresh LoRA; a parent's adapter keeps its own
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    base_dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    @classmethod
    def from_settings(cls, settings) -> RoundConfig:
        """From any object with the trainer's setting names (`TrainerSettings`); missing ones keep their defaults."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: getattr(settings, name) for name in names if hasattr(settings, name)})


@dataclasses.dataclass
class RoundOutput:
    policy: object  # the trained PeftModel (unwrapped), valid until the next train_round
    metrics: dict[str, float]
    steps: int


class _AdapterOff(torch.nn.Module):
    """The reference policy: the same model with its LoRA disabled, called outside any DDP wrapper (no gradients)."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, **inputs):
        with self.peft_model.disable_adapter():
            return self.peft_model(**inputs)


class PreferenceTrainer:
    def __init__(self, model_dir: str | Path, config: RoundConfig, load_image: ImageLoader, accelerator=None):
        """Loads the base model once onto the accelerator's device. `load_image(sha256) -> bytes` fetches a pair's
        image (the store's `get_image`)."""
        from accelerate import Accelerator

        from training.tiny_llava import load_checkpoint

        self.config = config
        self.load_image = load_image
        if accelerator is None:
            cuda = torch.cuda.is_available()
            precision = config.mixed_precision if config.mixed_precision != "auto" else ("bf16" if cuda else "no")
            # cpu=True on a machine without CUDA makes torchrun / accelerate launch processes one gloo group
            accelerator = Accelerator(cpu=not cuda, mixed_precision=precision)
        self.accelerator = accelerator
        on_cuda = self.device.type == "cuda"
        dtype = {"auto": torch.bfloat16 if on_cuda else torch.float32, "float32": torch.float32}.get(
            config.base_dtype, torch.bfloat16
        )
        self.base, self.processor = load_checkpoint(model_dir, dtype=dtype)
        self.base.to(self.device).eval()
        self.base.requires_grad_(False)
        self.model_dir = str(model_dir)
        self._policy, self._parent, self._trained = None, None, False
        logger.info(
            "preference trainer model=%s device=%s processes=%d mixed_precision=%s base_dtype=%s",
            model_dir,
            self.device,
            self.accelerator.num_processes,
            self.accelerator.mixed_precision,
            dtype,
        )

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def wrap(self, parent_adapter: str | Path | None = None):
        """The round's policy before training: the base with the parent's adapter (trainable) or a fresh LoRA, in
        eval mode, for sampling BDHS or online pairs from it; `train_round` with the same parent then trains this
        very model. It replaces the previous round's LoRA."""
        from peft import PeftModel, get_peft_model

        from training.lora import language_model_lora

        self.release()
        torch.manual_seed(self.config.seed)  # a fresh LoRA's initialisation is part of the round's seed
        if parent_adapter is not None:
            policy = PeftModel.from_pretrained(self.base, str(parent_adapter), is_trainable=True)
        else:
            policy = get_peft_model(self.base, language_model_lora(rank=self.config.lora_rank))
        policy.to(self.device).eval()
        self._policy, self._parent, self._trained = policy, parent_adapter, False
        return policy

    def share(self, value):
        """The main process's `value` on every process (pairs, the parent adapter's path): under
        `accelerate launch` only the main process reads the store; a single process gets `value` back."""
        if self.accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def release(self) -> None:
        """Takes the last round's LoRA off the base model (its PeftModel is no longer usable afterwards)."""
        if self._policy is not None:
            self.base = self._policy.unload()
            self._policy = None
            self.accelerator.free_memory()

    def implicit_rewards(self, pairs: Sequence[PreferencePair], adapter_path: str | Path, beta: float) -> list[float]:
        """Each pair's implicit reward margin under the adapter at `adapter_path`, against the base model, with the
        score this runner's algorithm trains (`online_rl.holdout.implicit_reward_margins`). Takes the last round's
        LoRA off first; the base model stays loaded."""
        from online_rl.holdout import implicit_reward_margins

        dense = self.config.algorithm == "dense-dpo"
        self.release()
        margins, self.base = implicit_reward_margins(
            self.base,
            self.processor,
            pairs,
            self.load_image,
            adapter_path,
            beta,
            dense_gamma=self.config.gamma if dense else None,
            end_weight=self.config.correction_end_weight,
            normalize=dense and self.config.dense_normalize,
            autocast=self.accelerator.autocast,
        )
        return margins

    def _local(self, chunk: list[PreferencePair]) -> list[PreferencePair]:
        processes, rank = self.accelerator.num_processes, self.accelerator.process_index
        if processes == 1:
            return chunk
        if len(chunk) < processes:
            chunk = [chunk[i % len(chunk)] for i in range(processes)]
        return chunk[rank::processes]

    def train_round(self, pairs: Sequence[PreferencePair], parent_adapter: str | Path | None = None) -> RoundOutput:
        """Trains a LoRA on `pairs` for `epochs` passes of `batch_pairs`-pair steps; returns the trained PeftModel
        and the final epoch's mean metrics (loss, chosen_nll, reward_accuracy, reward_margin, ...)."""
        config = self.config
        if not pairs:
            raise ValueError("a round needs at least one preference pair")
        dense = config.algorithm == "dense-dpo"
        encoder = PreferenceEncoder(
            self.processor, dense_gamma=config.gamma if dense else None, end_weight=config.correction_end_weight
        )
        loss_config = PreferenceLossConfig(
            beta=config.beta, normalize=dense and config.dense_normalize, sft_weight=config.sft_weight
        )
        reuse = self._policy is not None and not self._trained and self._parent == parent_adapter
        policy = self._policy if reuse else self.wrap(parent_adapter)
        self._trained = True
        torch.manual_seed(config.seed)
        trainable = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate)
        model, optimizer = self.accelerator.prepare(policy, optimizer)
        reference = _AdapterOff(policy)
        order = random.Random(config.seed)
        model.train()
        history: list[dict[str, float]] = []
        for _ in range(config.epochs):
            shuffled = order.sample(list(pairs), len(pairs))
            for start in range(0, len(shuffled), config.batch_pairs):
                mine = self._local(shuffled[start : start + config.batch_pairs])
                batch = {k: v.to(self.device) for k, v in encoder.collate(mine, self.load_image).items()}
                with self.accelerator.autocast():
                    loss, metrics = preference_loss(model, batch, loss_config, reference=reference)
                self.accelerator.backward(loss)
                self.accelerator.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                history.append(self._mean_over_processes(metrics))
        model.eval()
        policy.eval()
        last = history[-max(1, len(history) // config.epochs) :]  # the final epoch
        metrics = {key: sum(m[key] for m in last) / len(last) for key in last[0]}
        with contextlib.suppress(AttributeError):
            del model, optimizer
        return RoundOutput(policy, metrics, len(history))

    def _mean_over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1:
            return metrics
        values = torch.tensor(list(metrics.values()), device=self.device, dtype=torch.float32)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(metrics, values.tolist()))
