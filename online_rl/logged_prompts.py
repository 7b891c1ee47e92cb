"""Prompts from the feedback store's traffic: the distinct recent prompts with one image, the facts registered for
that image, and, where those facts describe a ShapesWorld scene and the question is one the rule judge grades, the
scene and the question's true answer.

Mixed-DPO samples its judged online pairs on `judgeable_prompts` (the rule judge) and, with an LLM judge, on
`open_prompts` (images without ShapesWorld facts); the PPO worker rolls out on `traffic_prompts`.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator

from PIL import Image

from online_rl.schema import GenerationRecord
from online_rl.store.base import FeedbackStore
from training.evaluation.judge import item_for_question, scene_from_facts
from training.evaluation.shapes_bench import max_tokens_for
from training.ppo import PPOPrompt
from training.rollouts import Prompt
from training.shapes_world import QAItem, Scene, ShapesWorld

SERVICE_CLIENTS = frozenset({"eval"})  # records of evaluation requests made with a user's key


def image_facts(store: FeedbackStore, image_sha256: str) -> list[str]:
    """The facts registered for an image (by the simulator, a user or an admin), each once, in registration order.
    Facts read out of a user's correction are left out: they restate one side of a correction pair."""
    facts = [fact for record in store.get_facts(image_sha256) if record.source != "correction" for fact in record.facts]
    return list(dict.fromkeys(facts))  # the same facts registered twice are one set


@dataclasses.dataclass(frozen=True)
class LoggedPrompt:
    """A distinct recent prompt with one image, its image's facts, and (when the facts describe a scene and the
    question is one the rule judge grades) the scene and the question with its true answer."""

    record: GenerationRecord
    facts: tuple[str, ...]
    scene: Scene | None
    item: QAItem | None


def logged_prompts(store: FeedbackStore, world: ShapesWorld, limit: int = 1000) -> Iterator[LoggedPrompt]:
    """The distinct single-image prompts among the last `limit` generation records, newest first; evaluation
    traffic (records marked `client: eval`) is never a training prompt."""
    seen = set()
    for record in store.list_generations(limit=limit):
        if record.client in SERVICE_CLIENTS or record.prompt_hash in seen or len(record.image_hashes) != 1:
            continue
        seen.add(record.prompt_hash)
        facts = image_facts(store, record.image_hashes[0])
        scene = scene_from_facts(facts)
        item = item_for_question(world, scene, record.question) if scene is not None else None
        yield LoggedPrompt(record, tuple(facts), scene if item else None, item)


def judgeable_prompts(store: FeedbackStore, world: ShapesWorld, limit: int = 1000) -> list[JudgeablePrompt]:
    """The distinct recent single-image prompts whose question the rule judge can grade (descriptions and presence
    probes) and whose image has object facts."""
    return [JudgeablePrompt(p.record, p.scene, p.item) for p in logged_prompts(store, world, limit) if p.item]


@dataclasses.dataclass(frozen=True)
class JudgeablePrompt:
    """A logged prompt with one image whose scene is known, and the question's true answer."""

    record: GenerationRecord
    scene: Scene
    item: QAItem


@dataclasses.dataclass(frozen=True)
class OpenPrompt:
    """A logged prompt with one image whose facts describe no ShapesWorld scene (a real image): an LLM judge ranks
    answers to it, given what is known of the image: its facts and captions, and users' corrections of answers."""

    record: GenerationRecord
    facts: tuple[str, ...]
    corrections: tuple[str, ...]


def image_corrections(store: FeedbackStore, image_sha256: str) -> list[str]:
    """Users' corrections of answers about an image (kept as captions of source "correction"), each once."""
    return list(
        dict.fromkeys(r.caption for r in store.get_facts(image_sha256) if r.source == "correction" and r.caption)
    )


def open_prompts(store: FeedbackStore, world: ShapesWorld, limit: int = 1000) -> list[OpenPrompt]:
    """The distinct recent single-image prompts whose image has no ShapesWorld facts, with the image's facts
    (captions included) and corrections."""
    prompts = []
    for logged in logged_prompts(store, world, limit):
        if scene_from_facts(logged.facts) is not None:
            continue
        sha = logged.record.image_hashes[0]
        captions = [r.caption for r in store.get_facts(sha) if r.source != "correction" and r.caption]
        facts = tuple(dict.fromkeys([*captions, *logged.facts]))
        prompts.append(OpenPrompt(logged.record, facts, tuple(image_corrections(store, sha))))
    return prompts


def traffic_prompts(store: FeedbackStore, limit: int = 1000, max_new_tokens: int = 96) -> list[PPOPrompt]:
    """The distinct recent single-image prompts in the feedback store (the online worker's PPO prompts), with the
    facts registered for each image; where those facts describe a ShapesWorld scene and the question is one the
    judge knows (a description, a presence probe), the scene and the true answer come along."""
    prompts = []
    for logged in logged_prompts(store, ShapesWorld(), limit):
        record, item = logged.record, logged.item
        data = store.get_image(record.image_hashes[0])
        if data is None:
            continue
        budget = (
            max_tokens_for(item)
            if item
            else min(int(record.sampling.get("max_tokens") or max_new_tokens), max_new_tokens)
        )
        prompt = Prompt(tuple(record.messages), Image.open(io.BytesIO(data)).convert("RGB"), budget)
        prompts.append(
            PPOPrompt(
                prompt,
                logged.facts,
                item.kind if item else "other",
                item.answer if item else None,
                (),
                logged.scene,
                item,
            )
        )
    return prompts
