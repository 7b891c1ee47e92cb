"""Follow-up questions and facts: does a model answer a short question as well after its own description as on its
own, and can it answer from facts given as text?

A chat in the demo goes "Describe the image", then "What color is the star?". The SFT stages train each conversation
either as one description or as short questions, never both (`ShapesWorld.conversation` says why); the optional chat
stage (`alignloop train sft --chat-steps`) trains long chats that mix them. A fact-augmented reward model must take
what the facts say from their text; the optional read stage (`alignloop train sft --read-steps`) trains that. For
each model this asks, on ShapesWorld test scenes, two presence probes per scene (a present and an absent shape) and a
color question: alone with the image, as a follow-up after the model's own greedy description, and with a blank
image and the scene's facts before the question (the reward model's facts-before-answer layout, so the answer can
only come from the text). It also has the model describe each scene from the image, from the image with the facts
before the request, and from the facts with a blank image, and counts the descriptions that name a shape the scene
does not hold (CHAIR_s, `training.evaluation.metrics.chair_scores`). It prints each accuracy and rate as JSON.
`--pixel-noise` renders the images noisier: how much worse a model sees, against how well it reads the facts.
It serves the Fact-RLHF experiment (this folder's README.md): it measures the SFT+ backbones that `run.py` trains.

    .venv/bin/python -m training.experiments.fact_rlhf.follow_ups --scenes 100 \\
        --models models/shapes-llava runs/fact-rlhf-read700/sft-plus
"""

from __future__ import annotations

import argparse
import json
import random

from training.shapes_world import DESCRIBE_PROMPT, SHAPES, QAItem, Scene, ShapesWorld, WorldConfig

KINDS = ("presence", "color")


def questions(world: ShapesWorld, scene: Scene) -> list[QAItem]:
    """A probe about a present shape and one about an absent shape, and the color of an object whose shape is
    unique in the scene; drawn from the scene's own seed, so every model gets the same questions."""
    rng = random.Random(scene.seed)
    items = [world.presence_item(rng.choice(sorted(scene.shapes)), True)]
    absent = [shape for shape in SHAPES if shape not in scene.shapes]
    if absent:
        items.append(world.presence_item(rng.choice(absent), False))
    obj = rng.choice(scene.objects)
    if scene.count(obj.shape) == 1:
        items.append(QAItem("color", f"What color is the {obj.shape}?", f"{obj.color.capitalize()}.", obj.shape))
    return items


def accuracy(answers: list[str], items: list[QAItem], kind: str) -> float:
    scored = [
        answer.strip().lower() == item.answer.lower()
        for answer, item in zip(answers, items, strict=True)
        if item.kind == kind
    ]
    return round(sum(scored) / len(scored), 4)


def score_model(model_dir: str, world: ShapesWorld, scenes: list[Scene], batch_size: int = 32) -> dict:
    from training.evaluation.metrics import chair_scores
    from training.evaluation.models import user_turn
    from training.reward_prompt import with_facts_before_question
    from training.rollouts import Prompt, generate
    from training.tiny_llava import load_checkpoint

    model, processor = load_checkpoint(model_dir)
    model.eval()

    def answer(prompts: list[Prompt]) -> list[str]:
        texts = []
        for start in range(0, len(prompts), batch_size):
            texts += generate(model, processor, prompts[start : start + batch_size], greedy=True).texts
        return texts

    images = {scene.index: world.render(scene) for scene in scenes}
    (describe,) = user_turn(DESCRIBE_PROMPT)  # image first, then the text
    descriptions = dict(zip(images, answer([Prompt((describe,), images[s.index], 96) for s in scenes]), strict=True))
    asked = [(scene, item) for scene in scenes for item in questions(world, scene)]
    items = [item for _, item in asked]
    alone = answer([Prompt(tuple(user_turn(item.question)), images[scene.index], 8) for scene, item in asked])
    follow_up = answer(
        [
            Prompt(
                (
                    describe,
                    {"role": "assistant", "content": descriptions[scene.index]},
                    {"role": "user", "content": [{"type": "text", "text": item.question}]},
                ),
                images[scene.index],
                8,
            )
            for scene, item in asked
        ]
    )
    blanks = {scene.index: world.render(scene, blank=True) for scene in scenes}

    def facts_first(scene: Scene, turn: dict) -> tuple[dict, ...]:
        return tuple(with_facts_before_question([turn], world.facts(scene), random.Random(scene.seed)))

    from_facts = answer(
        [Prompt(facts_first(scene, *user_turn(item.question)), blanks[scene.index], 8) for scene, item in asked]
    )
    described_with_facts = answer([Prompt(facts_first(s, describe), images[s.index], 96) for s in scenes])
    described_from_facts = answer([Prompt(facts_first(s, describe), blanks[s.index], 96) for s in scenes])
    result = {"model": model_dir, "questions": {kind: sum(item.kind == kind for item in items) for kind in KINDS}}

    def chair_s(texts: list[str]) -> float:
        return round(chair_scores(texts, scenes)["chair_s"], 4)

    result["description_hallucination"] = chair_s([descriptions[s.index] for s in scenes])
    result["description_hallucination_with_facts"] = chair_s(described_with_facts)
    result["description_hallucination_from_facts"] = chair_s(described_from_facts)
    for kind in KINDS:
        result[f"{kind}_alone"] = accuracy(alone, items, kind)
        result[f"{kind}_after_description"] = accuracy(follow_up, items, kind)
        result[f"{kind}_from_facts"] = accuracy(from_facts, items, kind)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["models/shapes-llava"])
    parser.add_argument("--scenes", type=int, default=200, help="ShapesWorld test scenes")
    parser.add_argument(
        "--pixel-noise",
        type=float,
        default=WorldConfig.pixel_noise_std,
        help="pixel noise of the images (default: ShapesWorld's); more makes them harder to see",
    )
    args = parser.parse_args(argv)
    world = ShapesWorld(WorldConfig(pixel_noise_std=args.pixel_noise))
    scenes = list(world.scenes("test", args.scenes))
    print(json.dumps([score_model(model, world, scenes) for model in args.models], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
