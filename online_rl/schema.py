"""The records alignloop keeps, as pydantic models: the one schema both store backends and every caller share.

- `GenerationRecord`: an answer the service gave, with its request (images replaced by their content hashes),
  the adapter version that produced it, token counts and latency.
- `ImageBlob`: image bytes, content-addressed by sha256, stored once however many records use them.
- `FactsRecord`: captions or ground-truth facts about an image; Fact-RLHF's reward model reads them.
- `FeedbackEvent`: a user's judgement of one generation (thumbs, a correction, a comment, facts).
- `PreferenceEvent`: an arena-style comparison of two generations for the same prompt.
- `AdapterVersion` and `AliasChange`: the adapter registry and the history of which version each alias served.

Feedback and preference events travel to the trainer on one ordered stream (`StreamEvent`). Limits on sizes live
in `StoreLimits`; the models validate everything a user can send, so bad input fails before anything is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

IMAGE_REF_PREFIX = "sha256:"
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
ADAPTER_NAME_PATTERN = re.compile(r"^policy-v(\d+)$")
BASE_VERSION_NAME = "base"

Rating = Literal[-1, 1]
Client = Literal["api", "demo", "simulator", "eval"]
FactsSource = Literal["shapesworld", "user", "correction"]
# candidate: published, not yet gated; gate_failed: its gate could not finish (retried later); canary: passed the gate
# and serves a share of the alias's traffic; promoted; rejected; retired: promoted once, replaced since.
AdapterStatus = Literal["candidate", "gate_failed", "canary", "promoted", "rejected", "retired"]
# promote_refused: a promotion that did not happen (a vLLM replica could not stage the version); the alias stayed.
AliasAction = Literal["promote", "rollback", "canary_start", "canary_stop", "promote_refused"]


@dataclasses.dataclass(frozen=True)
class StoreLimits:
    """Size limits the store enforces on what users send (the gateway enforces its own, tighter, on requests)."""

    max_image_bytes: int = 10 * 1024 * 1024
    max_correction_chars: int = 4000
    max_comment_chars: int = 2000
    max_facts: int = 64
    max_fact_chars: int = 500
    max_idempotency_key_chars: int = 200


LIMITS = StoreLimits()


def now() -> float:
    return time.time()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_user_id(raw_user_id: str, salt: str) -> str:
    """The pseudonymous user id the store keeps: a salted sha256, so raw identities never reach the store."""
    return "u-" + hashlib.sha256(f"{salt}:{raw_user_id}".encode()).hexdigest()[:32]


def adapter_name(version: int) -> str:
    """The immutable name of adapter version N: its directory under the adapter dir and its vLLM model name."""
    return f"policy-v{version}"


def choice_record_id(response_id: str, index: int) -> str:
    """The generation record id of choice `index` of an answer: the response id itself for choice 0 (so every n = 1
    answer is recorded under the id the client received), `<id>-<index>` for the others."""
    return response_id if index == 0 else f"{response_id}-{index}"


def image_refs(messages: list[dict]) -> list[str]:
    """The sha256 of every image a stored message list refers to (`image_url.url == "sha256:<hex>"`), in order."""
    refs: list[str] = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                if url.startswith(IMAGE_REF_PREFIX) and url[len(IMAGE_REF_PREFIX) :] not in refs:
                    refs.append(url[len(IMAGE_REF_PREFIX) :])
    return refs


def prompt_hash(messages: list[dict]) -> str:
    """Identifies a prompt (conversation prefix plus images) independent of which model answered it."""
    canonical = json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Record(BaseModel):
    """Base of every stored record: unknown fields are refused, so a typo never becomes silent data loss."""

    model_config = ConfigDict(extra="forbid")

    def to_json(self) -> str:
        return self.model_dump_json()


class GenerationRecord(Record):
    """An answer the service gave. `id` is the OpenAI response id the client received; with `n > 1`, choice 0 keeps
    that id and choice i is `<id>-<i>` (`choice_record_id`)."""

    id: str = Field(min_length=1, max_length=200)
    created: float = Field(default_factory=now)
    alias: str = Field(description="the model name the client asked for, e.g. llava-rlhf or llava-rlhf@v3")
    adapter_version: int | None = Field(default=None, ge=1, description="None: the base model answered")
    messages: list[dict[str, Any]] = Field(description="OpenAI messages; image URLs replaced by sha256:<hex>")
    prompt: str | None = Field(
        default=None,
        description="the raw text prompt of a /v1/completions request (no chat template, `messages` empty); such "
        "records are kept and may be rated, but never become training pairs",
    )
    sampling: dict[str, Any] = Field(default_factory=dict, description="temperature, max_tokens, ...")
    response: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    latency_ms: float = Field(default=0.0, ge=0)
    time_to_first_token_ms: float | None = Field(default=None, ge=0)
    user_id: str = Field(min_length=1, max_length=100, description="hashed; see hash_user_id")
    key_id: str | None = Field(default=None, max_length=100, description="hashed id of the API key that asked")
    client: Client = "api"
    prompt_hash: str = ""

    @model_validator(mode="after")
    def _fill_prompt_hash(self) -> GenerationRecord:
        if not self.prompt_hash:
            self.prompt_hash = prompt_hash(self.messages if self.prompt is None else [{"prompt": self.prompt}])
        for ref in self.image_hashes:
            if not SHA256_PATTERN.match(ref):
                raise ValueError(f"image reference sha256:{ref[:16]}... is not a sha256 hex digest")
        return self

    @property
    def image_hashes(self) -> list[str]:
        return image_refs(self.messages)

    @property
    def adapter_name(self) -> str:
        return BASE_VERSION_NAME if self.adapter_version is None else adapter_name(self.adapter_version)

    @property
    def question(self) -> str:
        """The text of the last user turn (a raw completion's whole prompt)."""
        if self.prompt is not None:
            return self.prompt
        for message in reversed(self.messages):
            if message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    return content
                return "".join(
                    p.get("text", "") for p in content or [] if isinstance(p, dict) and p.get("type") == "text"
                )
        return ""


class ImageBlob(Record):
    sha256: str
    mime_type: str
    size: int = Field(ge=1)
    created: float = Field(default_factory=now)


FactText = Annotated[str, Field(min_length=1, max_length=LIMITS.max_fact_chars)]


class FactsRecord(Record):
    """Facts about one image: a caption and/or short factual sentences, from ShapesWorld, a user or a correction."""

    id: str = Field(default_factory=lambda: new_id("facts"))
    image_sha256: str
    caption: str | None = Field(default=None, max_length=LIMITS.max_fact_chars)
    facts: list[FactText] = Field(default_factory=list, max_length=LIMITS.max_facts)
    source: FactsSource = "user"
    user_id: str | None = None
    created: float = Field(default_factory=now)

    @field_validator("image_sha256")
    @classmethod
    def _is_sha256(cls, value: str) -> str:
        if not SHA256_PATTERN.match(value):
            raise ValueError("image_sha256 must be 64 lowercase hex digits")
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> FactsRecord:
        if not self.caption and not self.facts:
            raise ValueError("facts need a caption or at least one fact")
        return self


class FeedbackEvent(Record):
    """A user's judgement of one generation. At least one of rating, correction, comment or facts is given."""

    kind: Literal["feedback"] = "feedback"
    id: str = Field(default_factory=lambda: new_id("fb"))
    generation_id: str = Field(min_length=1, max_length=200)
    created: float = Field(default_factory=now)
    rating: Rating | None = None
    correction: str | None = Field(default=None, min_length=1, max_length=LIMITS.max_correction_chars)
    comment: str | None = Field(default=None, max_length=LIMITS.max_comment_chars)
    facts: list[FactText] | None = Field(default=None, max_length=LIMITS.max_facts)
    user_id: str = Field(min_length=1, max_length=100)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=LIMITS.max_idempotency_key_chars)
    # Copied from the generation record when the event is written, so consumers need no lookup.
    adapter_version: int | None = None

    @field_validator("rating", mode="before")
    @classmethod
    def _strict_rating(cls, value: Any) -> Any:
        if value is not None and (isinstance(value, bool) or value not in (-1, 1)):
            raise ValueError("rating must be 1 (thumbs up), -1 (thumbs down) or null")
        return value

    @model_validator(mode="after")
    def _says_something(self) -> FeedbackEvent:
        if self.rating is None and not self.correction and not self.comment and not self.facts:
            raise ValueError("feedback needs a rating, a correction, a comment or facts")
        return self


class PreferenceEvent(Record):
    """Two generations for the same prompt, and the one the user preferred (an arena-style comparison)."""

    kind: Literal["preference"] = "preference"
    id: str = Field(default_factory=lambda: new_id("pref"))
    generation_ids: tuple[str, str]
    preferred_id: str
    created: float = Field(default_factory=now)
    user_id: str = Field(min_length=1, max_length=100)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=LIMITS.max_idempotency_key_chars)
    adapter_versions: tuple[int | None, int | None] = (None, None)  # filled from the generation records

    @model_validator(mode="after")
    def _consistent(self) -> PreferenceEvent:
        if self.generation_ids[0] == self.generation_ids[1]:
            raise ValueError("a preference compares two different generations")
        if self.preferred_id not in self.generation_ids:
            raise ValueError("preferred_id must be one of generation_ids")
        return self

    @property
    def rejected_id(self) -> str:
        return self.generation_ids[1] if self.preferred_id == self.generation_ids[0] else self.generation_ids[0]


StreamEvent = Annotated[FeedbackEvent | PreferenceEvent, Field(discriminator="kind")]


class Delivery(BaseModel):
    """One stream event handed to a consumer. Acknowledge `delivery_id` once the work that used it is saved."""

    delivery_id: str
    event: StreamEvent
    delivery_count: int = 1


class AdapterVersion(Record):
    """One immutable adapter version: `adapters/policy-vN/`, served by vLLM under the name policy-vN."""

    version: int = Field(ge=1)
    name: str
    parent_version: int | None = None
    path: str
    algorithm: str
    base_model: str = ""
    feedback_range: tuple[str, str] | None = Field(
        default=None, description="first and last stream delivery ids of the events it was trained on"
    )
    num_feedback_events: int = 0
    metrics: dict[str, float] = Field(default_factory=dict)
    pair_sources: dict[str, int] = Field(default_factory=dict, description="training pairs by source")
    gate: dict[str, Any] = Field(
        default_factory=dict, description="the gate's decision: baseline, metric differences with intervals, reasons"
    )
    status: AdapterStatus = "candidate"
    created: float = Field(default_factory=now)
    updated: float = Field(default_factory=now)
    notes: str = ""

    @model_validator(mode="after")
    def _name_matches(self) -> AdapterVersion:
        if self.name != adapter_name(self.version):
            raise ValueError(f"adapter version {self.version} must be named {adapter_name(self.version)}")
        return self


class AliasChange(Record):
    """One move of an alias: which version it served before and after (None is the base model)."""

    seq: int = 0
    alias: str
    from_version: int | None
    to_version: int | None
    action: AliasAction
    actor: str = "system"
    reason: str = ""
    created: float = Field(default_factory=now)


def parse_stream_event(payload: str) -> FeedbackEvent | PreferenceEvent:
    data = json.loads(payload)
    return (
        PreferenceEvent.model_validate(data) if data.get("kind") == "preference" else FeedbackEvent.model_validate(data)
    )


def event_fingerprint(event: FeedbackEvent | PreferenceEvent) -> str:
    """What an idempotency key promises: the same key with the same content is the same event."""
    content = event.model_dump(exclude={"id", "created", "adapter_version", "adapter_versions"})
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]
