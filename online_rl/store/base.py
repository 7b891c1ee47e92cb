"""The feedback store interface: what every backend keeps, and the validation they share.

A backend implements the small `_`-prefixed primitives (one atomic operation each); the public methods here check
input and turn it into those primitives, so SQLite and Redis behave identically and pass one contract test suite.

Delivery to the trainer follows Redis Streams' consumer-group model on both backends:
- `read_events` hands a consumer events in stream order and marks them pending for it;
- `ack_events` (or `register_adapter(..., ack=...)`, atomically with the registry record of the training step that
  used them) acknowledges them;
- events a crashed consumer left pending go out again: to the same consumer when it restarts
  (`include_own_pending`), or to any consumer of the group once they have been idle for `min_idle_ms`.
"""

from __future__ import annotations

import abc
import dataclasses
import io
import logging
import time
from collections.abc import Iterable

from online_rl.schema import (
    LIMITS,
    AdapterStatus,
    AdapterVersion,
    AliasChange,
    Delivery,
    FactsRecord,
    FeedbackEvent,
    GenerationRecord,
    ImageBlob,
    PreferenceEvent,
    StoreLimits,
    event_fingerprint,
    sha256_hex,
)

logger = logging.getLogger(__name__)

# Pillow format name -> MIME type of the image formats the store accepts.
IMAGE_FORMATS: dict[str, str] = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
}
DEFAULT_MIN_IDLE_MS = 10 * 60 * 1000
UNSET = object()


class StoreError(ValueError):
    """Base of the errors a store raises on bad input or state; the message is safe to show to a user."""


class NotFoundError(StoreError, LookupError):
    pass


class ConflictError(StoreError):
    """A compare-and-set lost, an id is taken, or an idempotency key was reused with different content."""


class InvalidInputError(StoreError):
    pass


@dataclasses.dataclass(frozen=True)
class StoreOptions:
    """Options every backend takes (from the store URL's query string or from code)."""

    retention_seconds: float | None = None  # generation records older than this are purged; None keeps them
    limits: StoreLimits = LIMITS


def sniff_image(data: bytes, limits: StoreLimits = LIMITS) -> str:
    """The MIME type of an image's bytes; raises InvalidInputError for oversized data or a non-image."""
    if not data:
        raise InvalidInputError("the image is empty")
    if len(data) > limits.max_image_bytes:
        raise InvalidInputError(f"the image is {len(data)} bytes; the limit is {limits.max_image_bytes}")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            fmt = image.format
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InvalidInputError("the data is not an image Pillow can read") from error
    if fmt not in IMAGE_FORMATS:
        raise InvalidInputError(f"image format {fmt} is not accepted; use one of {', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[fmt]


class FeedbackStore(abc.ABC):
    """Generation records, images, facts, the feedback stream and the adapter registry, behind one interface."""

    url: str
    options: StoreOptions

    # ---- images --------------------------------------------------------------------------------------------
    def put_image(self, data: bytes) -> str:
        """Stores image bytes once, under their sha256, and returns the hash."""
        mime_type = sniff_image(data, self.options.limits)
        blob = ImageBlob(sha256=sha256_hex(data), mime_type=mime_type, size=len(data))
        self._put_image(blob, data)
        return blob.sha256

    @abc.abstractmethod
    def _put_image(self, blob: ImageBlob, data: bytes) -> None: ...

    @abc.abstractmethod
    def get_image(self, sha256: str) -> bytes | None: ...

    @abc.abstractmethod
    def image_info(self, sha256: str) -> ImageBlob | None: ...

    # ---- generation records ----------------------------------------------------------------------------------
    def add_generation(self, record: GenerationRecord) -> None:
        """Stores an answer. Its images must be stored first; an id can be written only once."""
        missing = [ref for ref in record.image_hashes if self.image_info(ref) is None]
        if missing:
            raise NotFoundError(f"image sha256:{missing[0]} is not in the store")
        self._add_generation(record)

    @abc.abstractmethod
    def _add_generation(self, record: GenerationRecord) -> None:
        """Writes the record and its indexes atomically; ConflictError if the id exists."""

    @abc.abstractmethod
    def get_generation(self, generation_id: str) -> GenerationRecord | None: ...

    @abc.abstractmethod
    def generations_for_prompt(self, prompt_hash: str) -> list[GenerationRecord]:
        """Every stored answer to this prompt (same messages and images), oldest first."""

    @abc.abstractmethod
    def list_generations(self, user_id: str | None = None, limit: int = 1000) -> list[GenerationRecord]:
        """Generation records, newest first, optionally of one user."""

    @abc.abstractmethod
    def generations_using_image(self, sha256: str) -> list[str]:
        """Ids of the generation records whose messages include this image."""

    # ---- facts ---------------------------------------------------------------------------------------------
    def add_facts(self, record: FactsRecord) -> FactsRecord:
        if self.image_info(record.image_sha256) is None:
            raise NotFoundError(f"image sha256:{record.image_sha256} is not in the store")
        self._add_facts(record)
        return record

    @abc.abstractmethod
    def _add_facts(self, record: FactsRecord) -> None: ...

    @abc.abstractmethod
    def get_facts(self, image_sha256: str) -> list[FactsRecord]:
        """Facts about an image, oldest first."""

    # ---- the event stream ------------------------------------------------------------------------------------
    def add_feedback(self, event: FeedbackEvent) -> FeedbackEvent:
        """Appends a feedback event to the stream and returns it as stored.

        The generation must exist. With an idempotency key already used by the same user, the stored event is
        returned and nothing is written; reusing a key for different content raises ConflictError. Facts sent with
        the event are attached to the generation's images (source "user"), and a correction of an answer about
        one image is attached to it as a caption (source "correction").
        """
        generation = self.get_generation(event.generation_id)
        if generation is None:
            raise NotFoundError(f"no generation with id {event.generation_id!r}")
        event = event.model_copy(update={"adapter_version": generation.adapter_version})
        facts = self._facts_from_feedback(event, generation)
        return self._append_event(event, event_fingerprint(event), [event.generation_id], facts)

    def _facts_from_feedback(self, event: FeedbackEvent, generation: GenerationRecord) -> list[FactsRecord]:
        images = generation.image_hashes
        facts = []
        if event.facts:
            facts += [
                FactsRecord(image_sha256=sha, facts=event.facts, source="user", user_id=event.user_id) for sha in images
            ]
        if event.correction and len(images) == 1:
            caption = event.correction[: self.options.limits.max_fact_chars]
            facts.append(
                FactsRecord(image_sha256=images[0], caption=caption, source="correction", user_id=event.user_id)
            )
        return facts

    def add_preference(self, event: PreferenceEvent) -> PreferenceEvent:
        """Appends a preference event; both generations must exist and answer the same prompt."""
        generations = []
        for generation_id in event.generation_ids:
            generation = self.get_generation(generation_id)
            if generation is None:
                raise NotFoundError(f"no generation with id {generation_id!r}")
            generations.append(generation)
        if generations[0].prompt_hash != generations[1].prompt_hash:
            raise InvalidInputError(
                "the two generations answer different prompts; a preference compares answers to one"
            )
        versions = (generations[0].adapter_version, generations[1].adapter_version)
        event = event.model_copy(update={"adapter_versions": versions})
        return self._append_event(event, event_fingerprint(event), list(event.generation_ids), [])

    @abc.abstractmethod
    def _append_event(
        self,
        event: FeedbackEvent | PreferenceEvent,
        fingerprint: str,
        generation_ids: list[str],
        facts: list[FactsRecord],
    ) -> FeedbackEvent | PreferenceEvent:
        """Atomically: unless (user, idempotency key) exists, append to the stream, index it and store `facts`.

        Returns the stored event: `event` itself, or the earlier one with the same key. Raises ConflictError when
        the key was used with another fingerprint, NotFoundError when a generation vanished meanwhile.
        """

    @abc.abstractmethod
    def get_event(self, event_id: str) -> FeedbackEvent | PreferenceEvent | None: ...

    @abc.abstractmethod
    def events_for_generation(self, generation_id: str) -> list[FeedbackEvent | PreferenceEvent]:
        """The events that concern a generation, in stream order."""

    @abc.abstractmethod
    def list_events(
        self, after: str | None = None, limit: int = 1000
    ) -> list[tuple[str, FeedbackEvent | PreferenceEvent]]:
        """(delivery id, event) pairs in stream order, starting after delivery id `after`."""

    @abc.abstractmethod
    def count_events(self, since: float | None = None) -> int:
        """How many events are in the stream, optionally only those created at or after `since`."""

    def read_events(
        self,
        group: str,
        consumer: str,
        count: int = 100,
        block_ms: int = 0,
        include_own_pending: bool = False,
        min_idle_ms: int = DEFAULT_MIN_IDLE_MS,
    ) -> list[Delivery]:
        """Up to `count` events for `consumer` of `group`, in stream order, marked pending until acknowledged.

        First (with `include_own_pending`, as a restarted consumer does once) the events this consumer was given
        and never acknowledged; then events another consumer left pending for over `min_idle_ms`; then new events,
        waiting up to `block_ms` for some. The group is created at the start of the stream on first use.
        """
        if count <= 0:
            raise InvalidInputError("count must be positive")
        deliveries = self._read_events(group, consumer, count, include_own_pending, min_idle_ms)
        deadline = time.monotonic() + block_ms / 1000
        while not deliveries and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            deliveries = self._read_events(group, consumer, count, False, min_idle_ms)
        return deliveries

    @abc.abstractmethod
    def _read_events(
        self, group: str, consumer: str, count: int, include_own_pending: bool, min_idle_ms: int
    ) -> list[Delivery]: ...

    @abc.abstractmethod
    def ack_events(self, group: str, delivery_ids: Iterable[str]) -> int:
        """Acknowledges deliveries; returns how many were pending."""

    @abc.abstractmethod
    def pending_count(self, group: str) -> int: ...

    # ---- adapter registry ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def allocate_adapter_version(self) -> int:
        """A new, never used version number (1, 2, ...), for the trainer to write `adapters/policy-vN/`."""

    def register_adapter(self, adapter: AdapterVersion, ack: tuple[str, list[str]] | None = None) -> AdapterVersion:
        """Adds a version to the registry; with `ack=(group, delivery_ids)` it acknowledges, in the same atomic
        step, the events the version was trained on, so a crash never leaves them both trained and pending."""
        if adapter.version > self.last_allocated_version():
            raise InvalidInputError(f"adapter version {adapter.version} was never allocated")
        self._register_adapter(adapter, ack)
        return adapter

    @abc.abstractmethod
    def last_allocated_version(self) -> int: ...

    @abc.abstractmethod
    def _register_adapter(self, adapter: AdapterVersion, ack: tuple[str, list[str]] | None) -> None:
        """Atomic: write the record (ConflictError if the version exists) and acknowledge `ack`."""

    @abc.abstractmethod
    def get_adapter(self, version: int) -> AdapterVersion | None: ...

    @abc.abstractmethod
    def list_adapters(self) -> list[AdapterVersion]:
        """Every registered version, oldest first."""

    def update_adapter(
        self,
        version: int,
        status: AdapterStatus | None = None,
        metrics: dict[str, float] | None = None,
        notes: str | None = None,
        gate: dict | None = None,
    ) -> AdapterVersion:
        """Sets a version's status, merges eval metrics into it, replaces its notes or its gate decision."""

        def change(adapter: AdapterVersion) -> AdapterVersion:
            update: dict = {"updated": time.time()}
            if status is not None:
                update["status"] = status
            if metrics is not None:
                update["metrics"] = {**adapter.metrics, **{k: float(v) for k, v in metrics.items()}}
            if notes is not None:
                update["notes"] = notes
            if gate is not None:
                update["gate"] = gate
            return AdapterVersion.model_validate({**adapter.model_dump(), **update})

        return self._update_adapter(version, change)

    @abc.abstractmethod
    def _update_adapter(self, version: int, change) -> AdapterVersion:
        """Atomic read-modify-write of one adapter record; NotFoundError if it does not exist."""

    @abc.abstractmethod
    def promoted_version(self, alias: str) -> int | None:
        """The version an alias serves; None means the base model (also for an alias never promoted)."""

    @abc.abstractmethod
    def aliases(self) -> dict[str, int | None]: ...

    def promote(
        self,
        alias: str,
        version: int | None,
        expected: int | object | None = UNSET,
        actor: str = "system",
        reason: str = "",
    ) -> AliasChange:
        """Points `alias` at `version` (None: the base model). With `expected`, only if the alias still serves
        that version (compare-and-set); ConflictError otherwise. The new version's status becomes promoted and
        the one it replaces retired."""
        if version is not None and self.get_adapter(version) is None:
            raise NotFoundError(f"adapter version {version} is not registered")
        return self._move_alias(alias, version, expected, "promote", actor, reason)

    def rollback(self, alias: str, actor: str = "system", reason: str = "") -> AliasChange:
        """Moves `alias` back to the version it served before its current version was promoted."""
        current = self.promoted_version(alias)
        history = self.alias_history(alias)
        promotion = next((c for c in reversed(history) if c.action == "promote" and c.to_version == current), None)
        if promotion is None:
            raise ConflictError(f"alias {alias!r} has no earlier version to roll back to")
        return self._move_alias(alias, promotion.from_version, current, "rollback", actor, reason)

    @abc.abstractmethod
    def _move_alias(
        self, alias: str, version: int | None, expected: int | object | None, action: str, actor: str, reason: str
    ) -> AliasChange:
        """Atomic compare-and-set of the alias, status updates, a history entry and a registry revision bump."""

    @abc.abstractmethod
    def alias_history(self, alias: str) -> list[AliasChange]:
        """Every move of the alias (and every refused promotion), oldest first."""

    def record_refusal(self, alias: str, version: int | None, actor: str = "system", reason: str = "") -> AliasChange:
        """Records in the alias history that moving `alias` to `version` was refused (a `promote_refused` entry,
        e.g. a vLLM replica could not stage the version). The alias, the versions' statuses and the registry
        revision stay as they are; the entry's `seq` is the revision the refusal saw."""
        if not reason.strip():
            raise InvalidInputError("a refused promotion needs its reason")
        change = AliasChange(
            seq=self.registry_revision(),
            alias=alias,
            from_version=self.promoted_version(alias),
            to_version=version,
            action="promote_refused",
            actor=actor,
            reason=reason,
        )
        self._append_history(change)
        return change

    @abc.abstractmethod
    def _append_history(self, change: AliasChange) -> None:
        """Appends one entry to the alias's history, changing nothing else."""

    def set_canary(
        self, alias: str, version: int | None, fraction: float, actor: str = "system", reason: str = ""
    ) -> AliasChange:
        """Sends `fraction` of the alias's unpinned traffic to `version` (a candidate under observation).
        `version=None` or `fraction=0` ends the canary. Records a `canary_start` or `canary_stop` entry in the
        alias history (with `reason`, e.g. the numbers behind the decision) and bumps the registry revision, so
        gateways pick it up, in one atomic write."""
        if not 0.0 <= fraction <= 1.0:
            raise InvalidInputError("the canary fraction must be between 0 and 1")
        if version is not None and self.get_adapter(version) is None:
            raise NotFoundError(f"adapter version {version} is not registered")
        if version is None or fraction == 0.0:
            version, fraction = None, 0.0
        previous = self.canaries().get(alias)
        change = AliasChange(
            alias=alias,
            from_version=previous[0] if previous else None,
            to_version=version,
            action="canary_start" if version is not None else "canary_stop",
            actor=actor,
            reason=reason or (f"{fraction:.0%} of unpinned traffic" if version is not None else ""),
        )
        return self._set_canary(alias, version, fraction, change)

    @abc.abstractmethod
    def _set_canary(self, alias: str, version: int | None, fraction: float, change: AliasChange) -> AliasChange:
        """Atomic: the canary row, the history entry (its `seq` set to the new revision) and the revision bump."""

    @abc.abstractmethod
    def canaries(self) -> dict[str, tuple[int, float]]:
        """Active canaries: alias -> (version, fraction)."""

    @abc.abstractmethod
    def registry_revision(self) -> int:
        """A counter that grows with every registration, alias move and canary change; gateways poll it (or
        subscribe, on Redis) to hot-swap."""

    # ---- retention and privacy -------------------------------------------------------------------------------
    @abc.abstractmethod
    def delete_user(self, user_id: str) -> dict[str, int]:
        """Removes the user's generation records, the events about them, the user's own events and facts, and
        every image no longer referenced. Returns how many of each were deleted."""

    def purge_expired(self, now: float | None = None) -> dict[str, int]:
        """Deletes generation records older than the retention period (with the events about them and images no
        longer referenced). Does nothing when no retention period is set."""
        if self.options.retention_seconds is None:
            return {"generations": 0, "events": 0, "images": 0, "facts": 0}
        cutoff = (time.time() if now is None else now) - self.options.retention_seconds
        counts = self._delete_generations_before(cutoff)
        if counts["generations"]:
            logger.info("retention purge cutoff=%.0f %s", cutoff, " ".join(f"{k}={v}" for k, v in counts.items()))
        return counts

    @abc.abstractmethod
    def _delete_generations_before(self, cutoff: float) -> dict[str, int]: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
