"""Loss components against values computed by hand."""

import math

import pytest
import torch

from training.losses import (
    IGNORE_INDEX,
    dpo_loss,
    response_nll,
    token_logps,
    weighted_sequence_score,
    weighted_token_cross_entropy,
)


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
    per_token = torch.nn.functional.cross_entropy(
        logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    long_answer, short_answer = per_token[:4].mean(), per_token[5]
    expected = (long_answer + short_answer) / 2
    assert weighted_token_cross_entropy(logits, labels, weights).item() == pytest.approx(expected.item(), rel=1e-6)


def test_token_logps_pick_each_label_and_zero_the_rest():
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    expected = torch.tensor([[math.log(0.5), 2.0 - math.log(1 + math.e**2)]])
    assert torch.allclose(token_logps(logits, labels), expected)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 0]])
    assert token_logps(logits, labels)[0, 0].item() == 0.0


def test_dense_scores_weight_changed_tokens_by_gamma():
    logps = torch.tensor([[-1.0, -2.0, -3.0, 0.0]])  # the last position is padding
    weights = torch.tensor([[1.0, 5.0, 1.0, 0.0]])  # the middle token was changed by the correction; gamma = 5
    assert weighted_sequence_score(logps, weights, normalize=False).item() == pytest.approx(-1 - 10 - 3)
    assert weighted_sequence_score(logps, weights, normalize=True).item() == pytest.approx(-14 / 7)
    plain = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert weighted_sequence_score(logps, plain, normalize=False).item() == pytest.approx(-6.0)


def test_dpo_loss_by_hand():
    # Chosen log-ratio 1 - 0.5 = 0.5, rejected log-ratio -2 - (-1) = -1; beta 0.1: loss = -log sigmoid(0.15).
    losses, chosen_reward, rejected_reward = dpo_loss(
        torch.tensor([1.0]), torch.tensor([-2.0]), torch.tensor([0.5]), torch.tensor([-1.0]), beta=0.1
    )
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.15)))
    assert chosen_reward.item() == pytest.approx(0.05) and rejected_reward.item() == pytest.approx(-0.1)
    # Equal log-ratios: the loss is log 2 whatever beta is.
    equal, _, _ = dpo_loss(torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([1.0]), 0.5)
    assert equal.item() == pytest.approx(math.log(2))


def test_response_nll_is_the_mean_over_supervised_tokens_only():
    # Row 0 supervises 3 tokens (log-probs -1, -2, -3): NLL 2. Row 1 supervises 1 token (-0.5): NLL 0.5.
    labels = torch.tensor([[IGNORE_INDEX, 4, 5, 6], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7]])
    logps = torch.tensor([[-1.0, -2.0, -3.0], [0.0, 0.0, -0.5]])
    assert response_nll(logps, labels).tolist() == pytest.approx([2.0, 0.5])
    # A row with nothing supervised costs nothing instead of dividing by zero.
    assert response_nll(torch.zeros(1, 3), torch.full((1, 4), IGNORE_INDEX)).tolist() == [0.0]
