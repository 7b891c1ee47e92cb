"""The feedback simulator behind `alignloop simulate`: simulated users ask the gateway about ShapesWorld images and
rate the answers by ground truth, so the whole online loop can run, and be measured, without people.

Each interaction: a user draws a scene, sends its image with a question (a detailed description, or a short question
from the benchmark's kinds, POPE-adversarial presence probes included), reads the streamed answer, registers the
image's facts once, and sends one feedback event: a thumb, and for some wrong answers an RLHF-V-style correction
written by the rule judge (training/evaluation/judge.py). In a share of interactions (`preference_share`) the user
instead asks for two answers at once (n=2, the demo's "two answers" tab) and sends a preference for the better one,
by the judge's score; the demo has no tie button, so between two equally good answers the user picks either.

Raters come in three kinds, in configurable shares:
- honest: thumbs up exactly when the judge finds the answer correct; corrections are true; prefers the better answer;
- noisy: like honest, but each thumb and each preference is flipped with probability `noise_rate`;
- adversarial: thumbs and preferences reversed, and their "corrections" of right answers put a hallucination in (an
  absent object in a description, a wrong short answer).

The report counts the events sent by kind, every failed request, and how often the answers of each served version
were correct, so a run shows both the load on the loop and whether the served model got better.

    alignloop simulate --gateway-url http://127.0.0.1:8000 --events 300 --adversarial-share 0.3
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import logging
import random
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from alignloop.client import TWO_ANSWERS_TEMPERATURE, Answer, GatewayClient, GatewayError, image_data_url
from alignloop.settings import ClientSettings
from training.evaluation.judge import ShapesRuleJudge, count_sentence
from training.evaluation.shapes_bench import max_tokens_for
from training.shapes_world import (
    COLORS,
    NUMBER_WORDS,
    PARTNER,
    SHAPES,
    SIZES,
    QAItem,
    Scene,
    ShapesWorld,
    object_sentence,
)

logger = logging.getLogger(__name__)
RaterKind = Literal["honest", "noisy", "adversarial"]
TWO_ANSWER_TRIES = 4  # a user whose two answers came out the same asks again, this many times in all


class SimulatorSettings(ClientSettings):
    """The simulated users' settings, besides the gateway, its key and the alias they ask for (ALIGNLOOP_SIMULATE_*)."""

    model_config = SettingsConfigDict(env_prefix="ALIGNLOOP_SIMULATE_")

    events: int = Field(default=300, ge=1, description="feedback events to send")
    users: int = Field(default=20, ge=1, description="simulated users")
    noisy_share: float = Field(default=0.0, ge=0, le=1, description="share of users who are noisy raters")
    adversarial_share: float = Field(default=0.0, ge=0, le=1, description="share of users who rate adversarially")
    noise_rate: float = Field(default=0.3, ge=0, le=1, description="a noisy rater's chance to flip a thumb")
    correction_share: float = Field(default=0.5, ge=0, le=1, description="wrong answers that get a correction")
    correction_style: Literal["complete", "delete"] = Field(
        default="complete",
        description=(
            "complete: a sentence about an absent object is replaced by one about an object the answer left out, and "
            "the correction describes every object its count sentence counts; delete: such sentences are deleted"
        ),
    )
    description_share: float = Field(default=0.5, ge=0, le=1, description="questions that ask for a description")
    split: Literal["train", "validation", "test"] = Field(default="validation", description="where scenes come from")
    start: int = Field(default=10_000, ge=0, description="first scene index (keep clear of the gate's images)")
    concurrency: int = Field(default=4, ge=1, le=64, description="interactions in flight")
    temperature: float = Field(default=0.0, ge=0, le=2, description="sampling temperature of the answers")
    regenerations: int = Field(
        default=0,
        ge=0,
        le=4,
        description=(
            "extra answers a user asks for to the same question (the demo's Regenerate), each rated on its own; with "
            "temperature > 0 they differ, and an up-rated and a down-rated answer to one prompt make a thumbs pair"
        ),
    )
    preference_share: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description=(
            "interactions in which the user asks for two answers at once (n=2, sampled at a temperature of at least "
            f"{TWO_ANSWERS_TEMPERATURE}) and sends a preference for the better one instead of thumbs"
        ),
    )
    seed: int = Field(default=0, description="seeds users, scenes and questions")

    @model_validator(mode="after")
    def _shares_fit(self) -> SimulatorSettings:
        if self.noisy_share + self.adversarial_share > 1:
            raise ValueError("noisy_share + adversarial_share must be at most 1")
        return self


@dataclasses.dataclass(frozen=True)
class SimulatedUser:
    user_id: str
    kind: RaterKind


def make_users(settings: SimulatorSettings) -> list[SimulatedUser]:
    """`users` users, the first shares adversarial and noisy (rounded to whole users), the rest honest."""
    adversarial = round(settings.users * settings.adversarial_share)
    noisy = min(round(settings.users * settings.noisy_share), settings.users - adversarial)
    kinds = ["adversarial"] * adversarial + ["noisy"] * noisy + ["honest"] * (settings.users - adversarial - noisy)
    return [SimulatedUser(f"sim-{kind}-{i:03d}", kind) for i, kind in enumerate(kinds)]


def corrupt(scene: Scene, item: QAItem, rng: random.Random) -> str:
    """An adversarial 'correction': a wrong answer that looks like a right one."""
    if item.kind == "description":
        absent = [s for s in SHAPES if s not in scene.shapes]
        partners = [PARTNER[s] for s in scene.shapes if s in PARTNER and PARTNER[s] in absent]
        ghost_shape = rng.choice(partners or absent)
        ghost = dataclasses.replace(scene.objects[0], shape=ghost_shape, color=rng.choice(list(COLORS)))
        sentences = [object_sentence(obj) for obj in scene.objects] + [object_sentence(ghost)]
        fake = dataclasses.replace(scene, objects=(*scene.objects, ghost))
        return " ".join([count_sentence(fake), *sentences])
    truth = item.answer.rstrip(".").lower()
    if item.kind == "presence":
        return "No." if truth == "yes" else "Yes."
    pools = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES), "count": list(NUMBER_WORDS[:6])}
    pool = [value for value in pools.get(item.kind, []) if value != truth]
    if item.kind == "multiple_choice":
        pool = [letter for letter in "ABCD" if letter != item.answer]
        return rng.choice(pool)
    return f"{rng.choice(pool).capitalize()}." if pool else "I don't know."


def user_message(image_url: str, question: str) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


@dataclasses.dataclass
class SimulationReport:
    events: int = 0
    interactions: int = 0
    failed_requests: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    events_by_kind: Counter = dataclasses.field(default_factory=Counter)
    answers_by_version: dict = dataclasses.field(default_factory=lambda: defaultdict(Counter))
    seconds: float = 0.0

    def to_dict(self) -> dict:
        versions = {
            version: {
                "answers": c["answers"],
                "correct": round(c["correct"] / c["answers"], 4) if c["answers"] else None,
                "descriptions": c["descriptions"],
                "hallucinating_descriptions": (
                    round(c["hallucinating"] / c["descriptions"], 4) if c["descriptions"] else None
                ),
            }
            for version, c in sorted(self.answers_by_version.items())
        }
        return {
            "events": self.events,
            "interactions": self.interactions,
            "failed_requests": self.failed_requests,
            "errors": self.errors[:20],
            "events_by_kind": dict(self.events_by_kind),
            "answers_by_version": versions,
            "seconds": round(self.seconds, 1),
            "events_per_second": round(self.events / self.seconds, 2) if self.seconds else None,
        }


class FeedbackSimulator:
    def __init__(self, settings: SimulatorSettings, client: GatewayClient, world: ShapesWorld | None = None):
        self.settings = settings
        self.client = client
        self.world = world or ShapesWorld()
        self.judge = ShapesRuleJudge(complete_corrections=settings.correction_style == "complete")
        self.users = make_users(settings)
        self.popular = self.world.popular_shapes()
        self.report = SimulationReport()
        self._lock = threading.Lock()
        self._facts_sent: set[str] = set()
        self._reserved = 0  # events sent or being sent: a run sends exactly `events`

    def plan(self, number: int) -> tuple[SimulatedUser, Scene, QAItem, random.Random]:
        """Interaction `number`: its user, scene and question, all drawn from a seeded stream of its own."""
        rng = random.Random(f"{self.settings.seed}-{number}")
        user = rng.choice(self.users)
        scene = self.world.scene(self.settings.split, self.settings.start + number)
        items = self.world.benchmark_items(scene, self.popular)
        if rng.random() < self.settings.description_share:
            item = items[0]
        else:
            item = rng.choice([item for item in items if item.kind != "description"])
        return user, scene, item, rng

    def rate(self, user: SimulatedUser, scene: Scene, item: QAItem, response: str, rng: random.Random):
        """(rating, correction or None, the judge's verdict) as this user would give them."""
        judgement = self.judge.judge(scene, item, response)
        rating = 1 if judgement.correct else -1
        correction = None
        wants_to_correct = rng.random() < self.settings.correction_share
        if user.kind == "adversarial":
            rating = -rating
            if judgement.correct and wants_to_correct:
                correction = corrupt(scene, item, rng)
        else:
            if user.kind == "noisy" and rng.random() < self.settings.noise_rate:
                rating = -rating
            if not judgement.correct and wants_to_correct:
                correction = judgement.correction
        return rating, correction, judgement

    def prefer(self, user: SimulatedUser, scene: Scene, item: QAItem, responses: list[str], rng: random.Random) -> int:
        """Which of two answers (0 or 1) this user prefers: the one the judge scores higher, either one on a tie;
        reversed by an adversarial user, flipped with probability `noise_rate` by a noisy one."""
        first, second = (self.judge.score(scene, item, response) for response in responses)
        better = rng.randrange(2) if first == second else int(second > first)
        if user.kind == "adversarial" or (user.kind == "noisy" and rng.random() < self.settings.noise_rate):
            better = 1 - better
        return better

    def interact(self, number: int) -> None:
        user, scene, item, rng = self.plan(number)
        image_url = image_data_url(self.world.render(scene))
        messages = user_message(image_url, item.question)
        with self._lock:
            self.report.interactions += 1
        if self.settings.preference_share:  # its own stream, so runs without preferences draw as they always did
            arena = random.Random(f"{self.settings.seed}-{number}-two-answers")
            if arena.random() < self.settings.preference_share:
                if self._reserve_event() and not self._ask_twice_and_prefer(
                    number, user, scene, item, messages, image_url, arena
                ):
                    with self._lock:
                        self._reserved -= 1
                return
        for _ in range(1 + self.settings.regenerations):
            if not self._reserve_event():  # the run's events are all sent or on their way
                return
            if not self._ask_and_rate(number, user, scene, item, messages, image_url, rng):
                with self._lock:
                    self._reserved -= 1
                return

    def _reserve_event(self) -> bool:
        with self._lock:
            if self._reserved >= self.settings.events:
                return False
            self._reserved += 1
            return True

    def _ask_and_rate(
        self,
        number: int,
        user: SimulatedUser,
        scene: Scene,
        item: QAItem,
        messages: list[dict],
        image_url: str,
        rng: random.Random,
    ) -> bool:
        """One answer and its feedback event; False (and a failed request counted) when the gateway failed."""
        try:
            stream = self.client.stream_chat(
                self.settings.public_alias, messages, max_tokens_for(item), self.settings.temperature, user=user.user_id
            )
            answer = collections.deque(stream, maxlen=1).pop()  # the same Answer object, complete after the last chunk
            response = answer.text.strip()
            rating, correction, judgement = self.rate(user, scene, item, response, rng)
            self.client.feedback(answer.response_id, rating=rating, correction=correction, user=user.user_id)
            self._send_facts(scene, image_url)
        except GatewayError as error:
            self._count_failure(number, error)
            return False
        self._count_answers([answer], [judgement], item)
        with self._lock:
            self.report.events += 1
            self.report.events_by_kind[f"{user.kind}:{'up' if rating > 0 else 'down'}"] += 1
            if correction is not None:
                self.report.events_by_kind[f"{user.kind}:correction"] += 1
        return True

    def _ask_twice_and_prefer(
        self,
        number: int,
        user: SimulatedUser,
        scene: Scene,
        item: QAItem,
        messages: list[dict],
        image_url: str,
        rng: random.Random,
    ) -> bool:
        """Two answers in one request, and a preference for the better one; as in the demo, a user whose two answers
        came out the same asks again, up to `TWO_ANSWER_TRIES` times. False when no preference was sent."""
        temperature = max(self.settings.temperature, TWO_ANSWERS_TEMPERATURE)
        try:
            for _ in range(TWO_ANSWER_TRIES):
                answers: list[Answer] = collections.deque(
                    self.client.stream_choices(
                        self.settings.public_alias, messages, max_tokens_for(item), temperature, user=user.user_id, n=2
                    ),
                    maxlen=1,
                ).pop()
                responses = [answer.text.strip() for answer in answers]
                self._count_answers(answers, [self.judge.judge(scene, item, text) for text in responses], item)
                if responses[0] != responses[1]:
                    break
            else:
                return False
            better = self.prefer(user, scene, item, responses, rng)
            self.client.preference(
                answers[0].response_id, answers[1].response_id, answers[better].response_id, user=user.user_id
            )
            self._send_facts(scene, image_url)
        except GatewayError as error:
            self._count_failure(number, error)
            return False
        with self._lock:
            self.report.events += 1
            self.report.events_by_kind[f"{user.kind}:preference"] += 1
        return True

    def _count_failure(self, number: int, error: GatewayError) -> None:
        with self._lock:
            self.report.failed_requests += 1
            self.report.errors.append(f"interaction {number}: {error}")

    def _count_answers(self, answers: list[Answer], judgements: list, item: QAItem) -> None:
        with self._lock:
            for answer, judgement in zip(answers, judgements, strict=True):
                counts = self.report.answers_by_version[answer.version or "unknown"]
                counts["answers"] += 1
                counts["correct"] += judgement.correct
                if item.kind == "description":
                    counts["descriptions"] += 1
                    counts["hallucinating"] += bool(judgement.hallucinated)

    def _send_facts(self, scene: Scene, image_url: str) -> None:
        """Registers the scene's ground truth for its image once, so judges and BDHS can use it later."""
        sha256 = hashlib.sha256(base64.b64decode(image_url.partition(",")[2])).hexdigest()
        with self._lock:
            if sha256 in self._facts_sent:
                return
            self._facts_sent.add(sha256)
        facts = self.world.facts(scene)
        self.client.facts(sha256, caption=self.world.caption(scene), facts=facts)

    def run(self) -> SimulationReport:
        """Runs interactions until `events` feedback events were sent and returns the report. Failed interactions,
        and two-answer ones whose answers never differed, are replaced by new ones: at most 2 x `events`
        interactions in all (4 x with preferences)."""
        started = time.monotonic()
        self.client.models()  # fails fast, with one line, when the gateway is down or the key is wrong
        number, limit = 0, (4 if self.settings.preference_share else 2) * self.settings.events
        with ThreadPoolExecutor(self.settings.concurrency) as pool:
            while self.report.events < self.settings.events and number < limit:
                missing = self.settings.events - self.report.events
                interactions = -(-missing // (1 + self.settings.regenerations))  # each sends up to 1 + r events
                batch = range(number, number + min(interactions, self.settings.concurrency * 4))
                list(pool.map(self.interact, batch))
                number = batch.stop
        self.report.seconds = time.monotonic() - started
        return self.report
