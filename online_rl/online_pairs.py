"""Judged online pairs and Mixed-DPO: preference pairs sampled from the current policy and ranked by a judge.

For a logged prompt whose image has known facts (the simulator, or a user, registered them), the policy samples
`samples` answers; the rule judge (training/evaluation/judge.py) scores them against the scene those facts describe,
and the best- and worst-scored answers become a pair (source "online"). Answers the judge cannot tell apart give no
pair.

For a prompt about an image without ShapesWorld facts (a real image), an LLM judge, when one is configured
(`training.evaluation.pair_judge`), ranks the first two different samples, given the image, the question, and the
image's facts and corrections; only a verdict that holds with the answers swapped makes a pair. Ties, disagreements,
refusals and malformed replies make none (the judge logs each), and a judge that cannot be reached makes none for
the round (one log line). Without a judge such prompts make no online pairs.

Mixed-DPO fills each training slot with an offline pair (from users' feedback, written by earlier versions) or, with
probability `online_share`, with a fresh online pair, so the policy learns from its own current mistakes as well as
from the logged ones.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Callable, Sequence

from PIL import Image

from online_rl.logged_prompts import JudgeablePrompt, OpenPrompt, judgeable_prompts
from online_rl.pairs import PreferencePair
from online_rl.store.base import FeedbackStore
from training.evaluation.judge import ShapesRuleJudge, best_and_worst
from training.evaluation.pair_judge import LLMPairJudge
from training.rollouts import Prompt, generate
from training.shapes_world import ShapesWorld

logger = logging.getLogger(__name__)


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


def llm_judged_pair(
    prompt: OpenPrompt,
    image: Image.Image,
    answers: Sequence[str],
    judge: LLMPairJudge,
    adapter_version: int | None = None,
) -> PreferencePair | None:
    """The first two different answers, ranked by the LLM judge; None when there are not two, or no answer won."""
    distinct = list(dict.fromkeys(answer.strip() for answer in answers if answer.strip()))
    if len(distinct) < 2:
        return None
    first, second = distinct[:2]
    verdict = judge.compare(image, prompt.record.question, prompt.facts, prompt.corrections, first, second)
    if verdict.winner is None:
        return None
    chosen, rejected = (first, second) if verdict.winner == 0 else (second, first)
    return PreferencePair(
        messages=tuple(prompt.record.messages),
        chosen=chosen,
        rejected=rejected,
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
    judge: LLMPairJudge | None = None,
    llm_prompts: list[OpenPrompt] | None = None,
) -> list[PreferencePair]:
    """Up to `count` judged pairs from the policy, on logged prompts drawn at random (each at most once): those the
    rule judge grades and, with an LLM `judge`, those about images without ShapesWorld facts (`llm_prompts`; by
    default the store's `open_prompts`)."""
    from alignloop.client import CALL_ERRORS
    from online_rl.logged_prompts import open_prompts

    world, rule = ShapesWorld(), ShapesRuleJudge()
    prompts = judgeable_prompts(store, world) if prompts is None else prompts
    candidates: list[JudgeablePrompt | OpenPrompt] = list(prompts)
    if judge is not None:
        llm_prompts = open_prompts(store, world) if llm_prompts is None else llm_prompts
        if llm_prompts:
            try:
                judge.check()
                candidates += llm_prompts
            except CALL_ERRORS as error:
                logger.warning("online pairs judge=unreachable prompts=%d error=%r", len(llm_prompts), str(error)[:300])
    pairs = []
    for prompt in rng.sample(candidates, len(candidates)):
        if len(pairs) >= count:
            break
        if isinstance(prompt, OpenPrompt) and judge is None:
            continue
        data = store.get_image(prompt.record.image_hashes[0])
        if data is None:
            continue
        image = Image.open(io.BytesIO(data)).convert("RGB")
        if isinstance(prompt, OpenPrompt):
            budget = min(int(prompt.record.sampling.get("max_tokens") or max_new_tokens), max_new_tokens)
            answers = sample_answers(policy, processor, prompt.record.messages, image, samples, budget)
            try:
                pair = llm_judged_pair(prompt, image, answers, judge, adapter_version)
            except CALL_ERRORS as error:  # down after its retries: no more LLM-judged pairs this round
                logger.warning("online pairs judge=failed error=%r", str(error)[:300])
                judge = None
                continue
        else:
            answers = sample_answers(
                policy,
                processor,
                prompt.record.messages,
                image,
                samples,
                max_new_tokens if prompt.item.kind == "description" else 8,
            )
            pair = judged_pair(prompt, answers, rule, adapter_version)
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
