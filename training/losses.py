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
