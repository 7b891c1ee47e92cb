"""Loss components against values computed by hand."""

import math

import pytest
import torch

from training.losses import IGNORE_INDEX, weighted_token_cross_entropy


def test_weighted_cross_entropy_by_hand():
    # Vocabulary of 2; logits give p(token 0) = 0.5 at position 0 and p(token 1) = e/(1+e) at position 1.
    logits = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 0, 1]])  # position t+1's label is predicted from position t
    ce = [math.log(2), math.log(1 + math.e) - 1.0]
    weights = torch.tensor([[9.0, 0.25, 0.75]])
    expected = (0.25 * ce[0] + 0.75 * ce[1]) / 1.0
    assert weighted_token_cross_entropy(logits, labels, weights).item() == pytest.approx(expected, rel=1e-6)
    # Unit weights give the plain mean token loss, the one transformers computes.
    assert weighted_token_cross_entropy(logits, labels, torch.ones(1, 3)).item() == pytest.approx(sum(ce) / 2, rel=1e-6)


def test_ignored_positions_never_count_whatever_their_weight():
    logits = torch.tensor([[[0.0, 3.0], [1.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 0]])
    weights = torch.tensor([[1.0, 100.0, 2.0]])
    # Only the last label counts: predicted from position 1, p(0) = e/(1+e).
    assert weighted_token_cross_entropy(logits, labels, weights).item() == pytest.approx(math.log(1 + math.e) - 1.0)


def test_equal_answer_weights_make_a_short_answer_count_as_much_as_a_long_one():
    torch.manual_seed(0)
    logits = torch.randn(1, 7, 4)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3, 0, IGNORE_INDEX, 2]])  # a 4-token answer, then a 1-token answer
    weights = torch.tensor([[0.0, 0.25, 0.25, 0.25, 0.25, 0.0, 1.0]])
    per_token = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="none")
    long_answer, short_answer = per_token[:4].mean(), per_token[5]
    expected = (long_answer + short_answer) / 2
    assert weighted_token_cross_entropy(logits, labels, weights).item() == pytest.approx(expected.item(), rel=1e-6)
