"""In-process rollouts: which sampled tokens count as the response, and sampling from the bundled model."""

from __future__ import annotations

import torch

from training.evaluation.models import user_turn
from training.rollouts import Prompt, generate, response_mask
from training.shapes_world import DESCRIBE_PROMPT, ShapesWorld
from training.tiny_llava import load_checkpoint

EOS = 2


def test_the_mask_ends_at_the_first_eos_or_at_the_row_budget():
    response_ids = torch.tensor([[5, 6, EOS, 3], [5, 6, 7, 8], [EOS, 3, 3, 3], [5, 6, 7, EOS]])
    mask, ended = response_mask(response_ids, EOS, [4, 3, 4, 2])
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert ended.tolist() == [True, False, True, False]  # the last row's EOS came after its budget of 2


def test_rollouts_hold_each_prompt_right_before_its_response(bundled_model):
    model, processor = load_checkpoint(bundled_model)
    world = ShapesWorld()
    scenes = list(world.scenes("validation", 2))
    prompts = [
        Prompt(tuple(user_turn(DESCRIBE_PROMPT)), world.render(scenes[0]), 48),
        Prompt(tuple(user_turn("Is there a star in the image?")), world.render(scenes[1]), 4),
    ]
    torch.manual_seed(0)
    rollouts = generate(model, processor, prompts, greedy=True)
    tokenizer = processor.tokenizer
    assert rollouts.prompt_mask[:, -1].tolist() == [1, 1]  # left-padded: every prompt ends at the same column
    assert rollouts.response_lengths[1] <= 4 and rollouts.response_lengths[0] > 4
    for row in range(2):
        kept = rollouts.response_ids[row][rollouts.response_mask[row].bool()].tolist()
        assert tokenizer.decode(kept, skip_special_tokens=True).strip() == rollouts.texts[row]
        assert (rollouts.response_ids[row][~rollouts.response_mask[row].bool()] == tokenizer.pad_token_id).all()
    assert rollouts.texts[1] in ("Yes.", "No.")
    assert rollouts.texts[0].startswith("There ")
    assert rollouts.sequences.shape == (2, rollouts.prompt_ids.shape[1] + rollouts.response_ids.shape[1])
