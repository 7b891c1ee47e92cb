"""Fact-RLHF components (LLaVA-RLHF, docs/papers.md §1): the reward model's head and loss, the reward a PPO rollout
gets, GAE and PPO's clipped losses. Small pure functions on tensors with hand-computed tests; the reward-model and
PPO recipes, offline and in the online worker, are built from them and know nothing of these formulas.

Shapes: per-token tensors are (batch, response_len), aligned with the response tokens; `mask` is 1 on real response
tokens and 0 on padding. The defaults are the paper's values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.evaluation.metrics import parse_choice, parse_yes_no


# ---- reward model ----------------------------------------------------------------------------------------------
class ScalarHead(torch.nn.Module):
    """`Linear(hidden, 1)` on the last real token's final hidden state. The reward model's head starts random with
    a zero bias; the value model's head (`zero_init=True`) starts at exactly zero, as the paper's does."""

    def __init__(self, hidden_size: int, zero_init: bool = False):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.bias)
        if zero_init:
            torch.nn.init.zeros_(self.linear.weight)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One score per row: the head applied to the hidden state of the row's last attended token."""
        return self.linear(last_token_states(hidden_states, attention_mask)).squeeze(-1)


def last_token_states(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, hidden): each row's hidden state at its last position with attention_mask 1, for right padding
    (the last real token is before the pads) and left padding (it is the final position) alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.long() * positions).argmax(dim=1)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]


def reward_preference_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """The reward model's loss per pair: -log sigmoid(r(chosen) - r(rejected))."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


# ---- the rollout's reward -------------------------------------------------------------------------------------
def length_penalty(
    response_tokens: torch.Tensor,
    ended: torch.Tensor,
    max_response_tokens: int,
    scale: float = 10.0,
    no_eos_penalty: float = 8.0,
) -> torch.Tensor:
    """-scale * (tokens / max_tokens), and a further -no_eos_penalty for a response cut off without EOS."""
    penalty = -scale * response_tokens.float() / max_response_tokens
    return penalty - no_eos_penalty * (~ended.bool()).float()


def symbolic_bonus(
    kind: str,
    truth: str,
    response: str,
    choices: tuple[str, ...] = (),
    choice_bonus: float = 2.0,
    no_bonus: float = 0.5,
) -> float:
    """The bonus for questions with a known answer: +choice_bonus for a right multiple-choice letter; for a yes/no
    question whose truth is "no", +no_bonus for "no" and -no_bonus for "yes" (the paper rewards only the negatives,
    where hallucination lives); 0 for every other question or an unparseable answer."""
    if kind == "multiple_choice":
        return choice_bonus if parse_choice(response, choices) == truth.strip().rstrip(".").upper() else 0.0
    if kind == "presence" and parse_yes_no(truth) is False:
        said = parse_yes_no(response)
        return {False: no_bonus, True: -no_bonus}.get(said, 0.0)
    return 0.0


def kl_penalty(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Per-token KL penalty, clamped at zero from below: -beta * max(logp_policy - logp_ref, 0)."""
    return -beta * (policy_logps - reference_logps).clamp_min(0.0)


def token_rewards(sequence_reward: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The per-token rewards PPO sees: the KL penalty on every response token, plus the sequence's reward
    (RM score x scale + length penalty + symbolic bonus) on its last real token."""
    rewards = kl * mask
    last = (mask.long() * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += sequence_reward
    return rewards


# ---- PPO -------------------------------------------------------------------------------------------------------
def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / std over the masked entries of the whole batch (unbiased variance, as TRL and AlpacaFarm
    compute it); masked-out entries come back as 0."""
    count = mask.sum()
    mean = (values * mask).sum() / count
    variance = (((values - mean) * mask) ** 2).sum() / (count - 1).clamp_min(1)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response: delta_t = r_t + gamma * V_{t+1} - V_t (V after the last
    real token is 0), A_t = delta_t + gamma * lam * A_{t+1}. Returns (advantages, returns = advantages + values),
    both 0 on padding."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = advantage
        # A padded position passes nothing back: the response ended before it.
        next_value = torch.where(mask[:, t] > 0, values[:, t], next_value)
        next_advantage = torch.where(mask[:, t] > 0, advantage, next_advantage)
    return advantages, (advantages + values) * mask


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1)


def ppo_policy_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate, mean over response tokens: max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip)),
    with the share of clipped tokens and the approximate KL to the rollout policy."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": float(masked_mean((clipped > unclipped).float(), mask)),
            "approx_kl": float(masked_mean(0.5 * (logps - old_logps) ** 2, mask)),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> torch.Tensor:
    """The clipped value loss, mean over response tokens: 0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped kept
    within `clip` of the rollout's values. The recipe weighs it by the value coefficient (0.1)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
