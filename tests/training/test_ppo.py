"""The PPO recipe's wiring: the sequence reward on hand-made rollouts, the judge's view of rollouts, the prompts, and
one real PPO step on the bundled model that moves the policy and value LoRAs and nothing else."""

from __future__ import annotations

import math
import random

import pytest
import torch

from training.evaluation.models import user_turn
from training.evaluation.shapes_bench import max_tokens_for
from training.ppo import PPOConfig, PPOPrompt, PPOTrainer, rollout_truth, sequence_rewards, shapes_prompts
from training.reward_model import new_reward_model, save_reward_model
from training.rollouts import Prompt, Rollouts
from training.shapes_world import DESCRIBE_PROMPT, QAItem, ShapesWorld, object_sentence

WORLD = ShapesWorld()


def prompt(kind: str, budget: int, truth: str | None = None, choices=(), scene=None, item=None) -> PPOPrompt:
    image = WORLD.render(WORLD.scene("validation", 0))
    return PPOPrompt(Prompt(tuple(user_turn("Q?")), image, budget), (), kind, truth, choices, scene, item)


def hand_rollouts(lengths: list[int], ended: list[bool], texts: list[str]) -> Rollouts:
    width = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    empty = torch.zeros((len(lengths), 1), dtype=torch.long)
    return Rollouts(empty, empty, torch.zeros_like(mask), mask, torch.zeros(len(lengths)), torch.tensor(ended), texts)


def test_the_sequence_reward_is_scaled_score_plus_length_penalty_plus_symbolic_bonus():
    config = PPOConfig()
    prompts = [
        prompt("description", 96),
        prompt("presence", 8, truth="No."),
        prompt("multiple_choice", 8, truth="B", choices=("red", "blue", "green", "pink")),
    ]
    rollouts = hand_rollouts([10, 8, 2], [True, False, True], ["There is a star.", "Yes.", "B"])
    rewards = sequence_rewards(torch.tensor([0.5, -0.2, 0.1]), rollouts, prompts, config)
    expected = [
        10 * 0.5 - 10 * 10 / 96,  # no bonus for a description
        10 * -0.2 - 10 * 8 / 8 - 8 - 0.5,  # cut off without EOS, and "yes" where the truth is "no"
        10 * 0.1 - 10 * 2 / 8 + 2.0,
    ]  # the right letter
    assert rewards.tolist() == pytest.approx(expected)


def test_the_judge_grades_the_rollouts_it_can():
    scene = next(s for s in WORLD.scenes("validation", 50) if s.shapes == {"star"})
    description = QAItem("description", DESCRIBE_PROMPT, "")
    probe = WORLD.presence_item("moon", False)
    prompts = [
        prompt("description", 96, scene=scene, item=description),
        prompt("description", 96, scene=scene, item=description),
        prompt("presence", 8, truth="No.", scene=scene, item=probe),
        prompt("other", 8),
    ]
    truthful = f"There is one object. {object_sentence(scene.objects[0])}"
    texts = [truthful, "There is one object. A small red moon is at the top left.", "Yes.", "anything"]
    # one description of two names an absent moon and leaves out the star: CHAIR_s 1/2, recall 1/2 (pooled)
    assert rollout_truth(prompts, texts) == {
        "true_hallucination": 0.5,
        "true_recall": 0.5,
        "short_answer_accuracy": 0.0,
    }


def test_shapes_prompts_carry_the_scene_facts_and_the_known_answers():
    prompts = shapes_prompts(WORLD, "train", 0, 40, random.Random(0), description_share=0.5)
    assert len(prompts) == 40
    kinds = {p.kind for p in prompts}
    assert kinds == {"description", "presence", "multiple_choice"}
    for p, scene in zip(prompts, WORLD.scenes("train", 40), strict=True):
        assert p.facts == tuple(WORLD.facts(scene)) and p.scene == scene
        assert p.prompt.max_new_tokens == max_tokens_for(p.item)
        if p.kind == "multiple_choice":
            assert p.truth in "ABCD" and len(p.choices) == 4
        if p.kind == "presence":
            assert p.truth == ("Yes." if p.item.target in scene.shapes else "No.")


def test_one_ppo_step_moves_the_policy_and_value_loras_only(bundled_model, tmp_path):
    reward, _ = new_reward_model(bundled_model, lora_rank=4, seed=1)
    save_reward_model(reward, tmp_path / "rm", {"with_facts": True, "base_model": str(bundled_model)})
    config = PPOConfig(
        output_dir=str(tmp_path / "ppo"),
        model=str(bundled_model),
        reward_model=str(tmp_path / "rm"),
        rollout_batch=4,
        minibatch=2,
        ppo_epochs=1,
        lora_rank=4,
        learning_rate=1e-3,
        cpu=True,
    )
    trainer = PPOTrainer(config)
    trainer.schedule(total_steps=1)

    def state(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    policy_before, value_before, reward_before = (
        state(trainer.policy),
        state(trainer.value_model),
        state(trainer.reward_model),
    )
    stats = trainer.step(shapes_prompts(WORLD, "train", 0, 4, random.Random(0), description_share=0.5))
    assert all(math.isfinite(v) for v in stats.values())
    assert stats["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)  # a fresh LoRA is the reference at first
    assert stats["value_loss"] > 0 and 0.0 <= stats["clip_fraction"] <= 1.0
    for before, module in ((policy_before, trainer.policy), (value_before, trainer.value_model)):
        changed = {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}
        assert changed and all("lora_" in k or k.startswith("head.") for k in changed), changed
    assert "head.linear.weight" in {
        k for k, v in trainer.value_model.state_dict().items() if not torch.equal(value_before[k], v)
    }
    assert all(torch.equal(reward_before[k], v) for k, v in trainer.reward_model.state_dict().items())
