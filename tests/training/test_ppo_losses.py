"""Fact-RLHF components on hand-made sequences, against values computed by hand."""

import math

import pytest
import torch

from training.ppo_losses import (
    ScalarHead,
    gae,
    kl_penalty,
    last_token_states,
    length_penalty,
    ppo_policy_loss,
    ppo_value_loss,
    reward_preference_loss,
    symbolic_bonus,
    token_rewards,
    whiten,
)


def test_the_head_reads_the_last_attended_token_with_either_padding():
    hidden = torch.tensor(
        [
            [[1.0, 0.0], [2.0, 0.0], [9.0, 9.0]],  # right-padded: last real token is position 1
            [[9.0, 9.0], [0.0, 3.0], [0.0, 4.0]],
        ]
    )  # left-padded: last real token is position 2
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert last_token_states(hidden, mask).tolist() == [[2.0, 0.0], [0.0, 4.0]]
    head = ScalarHead(2)
    assert head.linear.bias.item() == 0.0
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[0.5, -1.0]]))
    assert head(hidden, mask).tolist() == [1.0, -4.0]  # 0.5*2 - 0 ; 0 - 1*4
    value_head = ScalarHead(2, zero_init=True)
    assert value_head(hidden, mask).tolist() == [0.0, 0.0]


def test_reward_preference_loss_by_hand():
    loss = reward_preference_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-1)), math.log(2)])


def test_length_penalty_by_hand():
    tokens, ended = torch.tensor([16, 64, 64]), torch.tensor([True, True, False])
    assert length_penalty(tokens, ended, max_response_tokens=64).tolist() == pytest.approx([-2.5, -10.0, -18.0])


@pytest.mark.parametrize(
    ("kind", "truth", "response", "choices", "bonus"),
    [
        ("multiple_choice", "B", "B", ("red", "blue", "green", "pink"), 2.0),
        ("multiple_choice", "B", "(B) blue", ("red", "blue", "green", "pink"), 2.0),
        ("multiple_choice", "B", "The answer is blue.", ("red", "blue", "green", "pink"), 2.0),
        ("multiple_choice", "B", "A", ("red", "blue", "green", "pink"), 0.0),
        ("multiple_choice", "B", "Maybe.", ("red", "blue", "green", "pink"), 0.0),
        ("presence", "No.", "No, there is no moon.", (), 0.5),
        ("presence", "No.", "Yes.", (), -0.5),
        ("presence", "No.", "I am not sure.", (), 0.0),
        ("presence", "Yes.", "Yes.", (), 0.0),  # only questions whose truth is "no" count
        ("presence", "Yes.", "No.", (), 0.0),
        ("color", "Red.", "Red.", (), 0.0),
    ],
)
def test_symbolic_bonus(kind, truth, response, choices, bonus):
    assert symbolic_bonus(kind, truth, response, choices) == bonus


def test_kl_penalty_is_clamped_below_at_zero():
    policy, reference = torch.tensor([[-1.0, -3.0, -2.0]]), torch.tensor([[-2.0, -1.0, -2.0]])
    assert kl_penalty(policy, reference, beta=0.1).flatten().tolist() == pytest.approx([-0.1, 0.0, 0.0])


def test_token_rewards_put_the_sequence_reward_on_the_last_real_token():
    kl = torch.tensor([[-0.1, -0.2, -0.3], [-0.1, -0.2, -0.3]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = token_rewards(torch.tensor([5.0, -1.0]), kl, mask)
    assert rewards.flatten().tolist() == pytest.approx([-0.1, -0.2, 4.7, -0.1, -1.2, 0.0])


def test_gae_by_hand():
    # gamma = lambda = 1 (the paper): A_t = sum of future rewards - V_t.
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.25, 0.75]])
    mask = torch.ones(1, 3)
    advantages, returns = gae(rewards, values, mask)
    assert advantages.flatten().tolist() == pytest.approx([0.5, 0.75, 0.25])
    assert returns.flatten().tolist() == pytest.approx([1.0, 1.0, 1.0])
    # gamma 0.5, lambda 0.5: delta = [0 + .5*.25 - .5, 0 + .5*.75 - .25, 1 - .75] = [-.375, .125, .25]
    # A_2 = .25; A_1 = .125 + .25*.25 = .1875; A_0 = -.375 + .25*.1875 = -.328125
    advantages, _ = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    assert advantages.flatten().tolist() == pytest.approx([-0.328125, 0.1875, 0.25])


def test_gae_stops_at_the_end_of_each_response():
    rewards = torch.tensor([[0.0, 2.0, 7.0]])  # the 7 sits on padding and must not leak back
    values = torch.tensor([[1.0, 0.5, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask)
    assert advantages.flatten().tolist() == pytest.approx([1.0, 1.5, 0.0])
    assert returns.flatten().tolist() == pytest.approx([2.0, 2.0, 0.0])


def test_whiten_uses_only_masked_entries():
    values = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # mean 2, unbiased variance ((1)^2 + (1)^2) / 1 = 2
    assert whiten(values, mask).flatten().tolist() == pytest.approx(
        [-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0], abs=1e-6
    )


def test_ppo_policy_loss_clips_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    advantages = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, stats = ppo_policy_loss(new, old, advantages, mask, clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: max(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3)
    assert stats["clip_fraction"] == pytest.approx(1 / 3)


def test_ppo_value_loss_clips_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[1.0, 1.0]])
    # token 0: unclipped (1-1)^2 = 0, clipped (0.2-1)^2 = 0.64 -> 0.64; token 1: (0.1-1)^2 = 0.81 both ways
    loss = ppo_value_loss(new, old, returns, torch.ones(1, 2), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
