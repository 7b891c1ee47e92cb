"""One preference-optimisation step on a PEFT LoRA policy: DPO, or Dense DPO (RLHF-V) from token weights.

The policy and the reference score the same collated batch (`online_rl.preference_batch`); the reference is the
policy with its adapter disabled (the SFT model) unless a separate reference model is given (e.g. the last promoted
version). The loss itself lives in `training.losses`, as pure functions with hand-computed tests. `sft_weight` > 0
adds the chosen answers' per-token negative log-likelihood (RPO), so the chosen answers stay likely in absolute terms.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from training.losses import dpo_loss, response_nll, token_logps, weighted_sequence_score

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values")


@dataclasses.dataclass(frozen=True)
class PreferenceLossConfig:
    beta: float = 0.1
    normalize: bool = False  # Dense DPO divides by the summed weights (the paper); RLHF-V's code does not
    sft_weight: float = 0.0  # weight of the chosen answers' mean token NLL added to the DPO loss (RPO's alpha)


def response_token_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's per-token response log-probabilities under `model`, (rows, seq-1), 0 off the response."""
    logits = model(**{key: batch[key] for key in MODEL_INPUTS}).logits
    return token_logps(logits, batch["labels"])


def sequence_scores(model, batch: dict[str, torch.Tensor], normalize: bool) -> torch.Tensor:
    """Each row's weighted response log-probability under `model` (DPO: weights 1, plain sum)."""
    return weighted_sequence_score(response_token_logps(model, batch), batch["token_weights"][:, 1:], normalize)


def reference_scores(policy, batch: dict[str, torch.Tensor], normalize: bool, reference=None) -> torch.Tensor:
    adapter_off = policy.disable_adapter() if reference is None else contextlib.nullcontext()
    with torch.no_grad(), adapter_off:
        return sequence_scores(reference if reference is not None else policy, batch, normalize)


def preference_loss(
    policy, batch: dict[str, torch.Tensor], config: PreferenceLossConfig, reference=None
) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean DPO loss over the batch's pairs (chosen rows first, rejected rows second), with training metrics."""
    reference_all = reference_scores(policy, batch, config.normalize, reference)
    policy_logps = response_token_logps(policy, batch)
    policy_all = weighted_sequence_score(policy_logps, batch["token_weights"][:, 1:], config.normalize)
    pairs = policy_all.shape[0] // 2
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_all[:pairs], policy_all[pairs:], reference_all[:pairs], reference_all[pairs:], config.beta
    )
    chosen_nll = response_nll(policy_logps[:pairs], batch["labels"][:pairs])
    if config.sft_weight > 0:
        losses = losses + config.sft_weight * chosen_nll
    metrics = {
        "loss": float(losses.detach().mean()),
        "chosen_nll": float(chosen_nll.detach().mean()),
        "reward_accuracy": float((chosen_rewards > rejected_rewards).float().mean()),
        "reward_margin": float((chosen_rewards - rejected_rewards).mean()),
        "chosen_reward": float(chosen_rewards.mean()),
        "rejected_reward": float(rejected_rewards.mean()),
    }
    return losses.mean(), metrics
