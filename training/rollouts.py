"""Generating from a LLaVA in-process, keeping the token ids: PPO's rollouts, the answers sampled from the SFT model
that become reward-model pairs and judged online pairs, and (greedy) the in-process evaluation's answers.

One `generate` call samples a batch of prompts (each its own image and its own answer budget) in one left-padded
`model.generate`, and returns the prompt and response tokens separately, with a mask that covers each response up to
and including its EOS (or up to its own `max_new_tokens`), so PPO can score exactly the tokens the policy produced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from PIL import Image


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A chat prompt with one image part, the image, and the answer's token budget."""

    messages: tuple[dict, ...]
    image: Image.Image
    max_new_tokens: int


@dataclasses.dataclass
class Rollouts:
    """A batch of sampled responses. Prompts are left-padded and responses right-padded, so
    `sequences = cat(prompt_ids, response_ids)` puts every response right after its prompt."""

    prompt_ids: torch.Tensor  # (batch, prompt_len), left-padded
    prompt_mask: torch.Tensor  # (batch, prompt_len)
    response_ids: torch.Tensor  # (batch, response_len), pad after the end
    response_mask: torch.Tensor  # (batch, response_len), 1 up to and including EOS (or the row's budget)
    pixel_values: torch.Tensor
    ended: torch.Tensor  # (batch,) bool: the response ended with EOS within its budget
    texts: list[str]

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)

    def to(self, device) -> Rollouts:
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "texts"}
        return Rollouts(**{k: v.to(device) for k, v in tensors.items()}, texts=self.texts)


def response_mask(
    response_ids: torch.Tensor, eos_token_id: int, budgets: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, ended): each row's mask covers its tokens up to and including the first EOS, and at most its budget;
    `ended` says whether that EOS came within the budget."""
    batch, length = response_ids.shape
    positions = torch.arange(length).expand(batch, length)
    is_eos = response_ids == eos_token_id
    first_eos = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1), torch.full((batch,), length))
    budget = torch.tensor(list(budgets)).clamp_max(length)
    ended = first_eos < budget
    end = torch.where(ended, first_eos + 1, budget)
    return (positions < end[:, None]).long(), ended


def generate(
    policy, processor, prompts: Sequence[Prompt], temperature: float = 1.0, greedy: bool = False, synced: bool = False
) -> Rollouts:
    """Samples one response per prompt (temperature `temperature`, top-p 1, as PPO samples; or greedily).

    `synced`: the policy is sharded over processes (FSDP), so each one keeps running forward passes until every
    process has finished its batch (transformers' `synced_gpus`)."""
    tokenizer = processor.tokenizer
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts = [
        tokenizer.apply_chat_template(list(p.messages), tokenize=False, add_generation_prompt=True) for p in prompts
    ]
    device = next(policy.parameters()).device
    try:
        inputs = processor(
            images=[p.image.convert("RGB") for p in prompts], text=texts, padding=True, return_tensors="pt"
        ).to(device)
    finally:
        tokenizer.padding_side = padding_side
    inputs["pixel_values"] = inputs["pixel_values"].to(next(policy.parameters()).dtype)  # bf16 models on a GPU
    was_training = policy.training
    policy.eval()
    sampling = (
        {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
    )
    with torch.no_grad():
        output = policy.generate(
            **inputs,
            **sampling,
            max_new_tokens=max(p.max_new_tokens for p in prompts),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced,
        )
    policy.train(was_training)
    prompt_length = inputs["input_ids"].shape[1]
    response_ids = output[:, prompt_length:].cpu()
    mask, ended = response_mask(response_ids, tokenizer.eos_token_id, [p.max_new_tokens for p in prompts])
    response_ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, tokenizer.pad_token_id))
    decoded = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return Rollouts(
        inputs["input_ids"].cpu(),
        inputs["attention_mask"].cpu(),
        response_ids,
        mask,
        inputs["pixel_values"].cpu(),
        ended,
        [text.strip() for text in decoded],
    )
