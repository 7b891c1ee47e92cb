"""Judged online pairs and Mixed-DPO: preference pairs sampled from the current policy and ranked by a judge.

For a logged prompt whose image has known facts (the simulator, or a user, registered them), the policy samples
`samples` answers; the rule judge (training/evaluation/judge.py) scores them against the scene those facts describe,
and the best- and worst-scored answers become a pair (source "online"). Answers the judge cannot tell apart give no
pair.

Mixed-DPO fills each training slot with an offline pair (from users' feedback, written by earlier versions) or, with
probability `online_share`, with a fresh online pair, so the policy learns from its own current mistakes as well as
from the logged ones.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Sequence

from PIL import Image

from online_rl.logged_prompts import JudgeablePrompt, judgeable_prompts
from online_rl.pairs import PreferencePair
from online_rl.store.base import FeedbackStore
from training.evaluation.judge import ShapesRuleJudge, best_and_worst
from training.rollouts import Prompt, generate
from training.shapes_world import ShapesWorld


def judged_pair(
    prompt: JudgeablePrompt, answers: Sequence[str], judge: ShapesRuleJudge, adapter_version: int | None = None
) -> PreferencePair | None:
    """The best against the worst of the sampled answers; None when every answer scores the same."""
    ranked = best_and_worst([judge.score(prompt.scene, prompt.item, answer) for answer in answers], answers)
    if ranked is None:
        return None
    best, worst = ranked
    return PreferencePair(
        messages=tuple(prompt.record.messages),
        chosen=answers[best].strip(),
        rejected=answers[worst].strip(),
        source="online",
        chosen_generation_id=None,
        rejected_generation_id=None,
        event_ids=(),
        adapter_version=adapter_version,
    )


def sample_answers(
    policy,
    processor,
    messages: Sequence[dict],
    image: Image.Image,
    samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
) -> list[str]:
    """`samples` answers from the policy (transformers, sampling at `temperature`) to the prompt."""
    prompt = Prompt(tuple(messages), image, max_new_tokens)
    return generate(policy, processor, [prompt] * samples, temperature).texts


def online_pairs(
    policy,
    processor,
    store: FeedbackStore,
    count: int,
    rng: random.Random,
    samples: int = 2,
    max_new_tokens: int = 96,
    adapter_version: int | None = None,
    prompts: list[JudgeablePrompt] | None = None,
) -> list[PreferencePair]:
    """Up to `count` judged pairs from the policy, on logged prompts drawn at random (each at most once)."""
    world, judge = ShapesWorld(), ShapesRuleJudge()
    prompts = judgeable_prompts(store, world) if prompts is None else prompts
    pairs = []
    for prompt in rng.sample(prompts, len(prompts)):
        if len(pairs) >= count:
            break
        data = store.get_image(prompt.record.image_hashes[0])
        if data is None:
            continue
        image = Image.open(io.BytesIO(data)).convert("RGB")
        answers = sample_answers(
            policy,
            processor,
            prompt.record.messages,
            image,
            samples,
            max_new_tokens if prompt.item.kind == "description" else 8,
        )
        pair = judged_pair(prompt, answers, judge, adapter_version)
        if pair is not None:
            pairs.append(pair)
    return pairs


def mixed_pairs(
    offline: Sequence[PreferencePair],
    make_online: Callable[[int], list[PreferencePair]],
    rng: random.Random,
    online_share: float = 0.5,
) -> list[PreferencePair]:
    """Mixed-DPO: each of len(offline) slots holds its offline pair, or with probability `online_share` an online
    pair (`make_online(n)` returns up to n of them); a slot whose online pair could not be made keeps its offline
    one."""
    online_slots = [index for index in range(len(offline)) if rng.random() < online_share]
    online = make_online(len(online_slots)) if online_slots else []
    mixed = list(offline)
    for index, pair in zip(online_slots, online):
        mixed[index] = pair
    return mixed
