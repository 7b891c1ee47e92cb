"""Loss components shared by the training recipes: small pure functions on tensors, tested against hand-computed
values. Recipes (training/sft.py, ...) and the online worker import them; none of them knows about a model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def weighted_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy with a weight per target token: sum(w * ce) / sum(w) over supervised tokens.

    `logits` is (batch, seq, vocab) and predicts position t+1 from position t; `labels` and `weights` are
    (batch, seq), aligned with the input ids (labels IGNORE_INDEX where unsupervised). With weight 1 everywhere this
    is the usual mean token loss; with weight 1/len(answer) on each answer's tokens every answer counts the same,
    so a two-token "Yes." is not drowned by forty-token descriptions in the same batch.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    shift_weights = weights[:, 1:].float() * (shift_labels != IGNORE_INDEX)
    per_token = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
    return (per_token * shift_weights).sum() / shift_weights.sum().clamp_min(torch.finfo(torch.float32).tiny)


# ---- preference losses ------------------------------------------------------------------------------------------
def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next token: (batch, seq-1), 0 where the label is IGNORE_INDEX.

    Position t of the result is log p(labels[t+1] | tokens <= t), aligned with `labels[:, 1:]`.
    """
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = torch.gather(logprobs, 2, shift_labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked * mask


def weighted_sequence_score(token_logps: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """A response's score from its token log-probs (Dense DPO, RLHF-V): sum(w * logp), divided by sum(w) when
    `normalize`. `weights` is 0 outside the response, 1 on unchanged tokens and gamma on changed ones; with weight 1
    everywhere and no normalisation this is the plain sequence log-probability DPO uses."""
    total = (token_logps * weights).sum(-1)
    if not normalize:
        return total
    return total / weights.sum(-1).clamp_min(torch.finfo(torch.float32).tiny)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sigmoid DPO loss per pair, -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), with the implicit
    rewards beta * (pi - ref) of chosen and rejected (detached). Inputs are per-pair sequence scores: summed
    log-probs for DPO, `weighted_sequence_score` for Dense DPO."""
    chosen_logratio = policy_chosen - reference_chosen
    rejected_logratio = policy_rejected - reference_rejected
    losses = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))
    return losses, (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach()


def response_nll(token_logps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each response's mean negative log-likelihood per token, from `token_logps` (batch, seq-1) and the labels
    they were taken against (batch, seq): -sum(logp) / number of supervised tokens.

    Added to DPO on the chosen side (RPO, Pang et al. 2024; TRL's `rpo_alpha`), it keeps the chosen answer likely in
    absolute terms, where DPO alone only widens the gap between chosen and rejected and may lower both (without it,
    corrections taught the model to stop talking: training/experiments/online_alignment/README.md).
    """
    supervised = (labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp_min(1)
    return -token_logps.sum(-1) / supervised
