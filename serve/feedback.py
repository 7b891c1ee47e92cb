"""Feedback, preferences and facts from API clients: checked, linked to the version that answered, stored.

A caller may judge only answers made with its own API key (the admin key may judge any). Answers of other keys
are reported as not found, so ids do not leak across keys. Store errors become OpenAI-shaped API errors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import anyio

from online_rl.schema import (
    BASE_VERSION_NAME,
    FactsRecord,
    FeedbackEvent,
    GenerationRecord,
    PreferenceEvent,
    adapter_name,
    hash_user_id,
)
from online_rl.store import ConflictError, FeedbackStore, InvalidInputError, NotFoundError
from serve.auth import Caller
from serve.metrics import GatewayMetrics
from serve.protocol import (
    APIError,
    FactsObject,
    FactsRequest,
    FeedbackObject,
    FeedbackRequest,
    PreferenceObject,
    PreferenceRequest,
)
from serve.recorder import RecordWriter


def version_label(version: int | None) -> str:
    return BASE_VERSION_NAME if version is None else adapter_name(version)


@contextlib.contextmanager
def store_errors(param: str | None = None) -> Iterator[None]:
    try:
        yield
    except NotFoundError as error:
        raise APIError(404, str(error), param=param, code="not_found") from error
    except ConflictError as error:
        raise APIError(
            409, str(error), param="idempotency_key" if "idempotency" in str(error) else None, code="conflict"
        ) from error
    except InvalidInputError as error:
        raise APIError(400, str(error), param=param, code="invalid_input") from error


class FeedbackService:
    def __init__(
        self,
        store: FeedbackStore,
        recorder: RecordWriter,
        metrics: GatewayMetrics,
        user_id_salt: str,
        other_replicas_wait_s: float = 0.0,
    ):
        """`other_replicas_wait_s` (replicas sharing a Redis store): how long a generation record that is not in the
        store may still be on its way from another replica's record writer; 0 with one gateway."""
        self.store = store
        self.recorder = recorder
        self.metrics = metrics
        self.user_id_salt = user_id_salt
        self.other_replicas_wait_s = other_replicas_wait_s

    def user_id(self, caller: Caller, user: str | None) -> str:
        return hash_user_id(f"{caller.key_id}:{user or ''}", self.user_id_salt)

    async def generation(self, caller: Caller, response_id: str, param: str) -> GenerationRecord:
        """The caller's own generation record; 404 for unknown ids and for other keys' answers."""
        await self.recorder.wait_written(response_id)
        record = await anyio.to_thread.run_sync(self.store.get_generation, response_id)
        if record is None and self.other_replicas_wait_s > 0:
            record = await self._wait_for_other_replica(response_id)
        if record is None or not (caller.is_admin or record.key_id == caller.key_id):
            raise APIError(
                404,
                f"No response with id '{response_id}' was made with this API key.",
                param=param,
                code="response_not_found",
            )
        return record

    async def _sent_image(self, caller: Caller, image_sha256: str) -> bool:
        """Whether a generation record of the caller's key uses the image; with other replicas, waits as
        `_wait_for_other_replica` does for a record one of them may still be writing."""

        def sent() -> bool:
            ids = self.store.generations_using_image(image_sha256)
            return any(
                record is not None and record.key_id == caller.key_id
                for record in (self.store.get_generation(i) for i in ids)
            )

        deadline = anyio.current_time() + self.other_replicas_wait_s
        delay = 0.01
        while not await anyio.to_thread.run_sync(sent):
            if anyio.current_time() >= deadline:
                return False
            await anyio.sleep(min(delay, max(0.0, deadline - anyio.current_time())))
            delay = min(delay * 2, 0.25)
        return True

    async def _wait_for_other_replica(self, response_id: str) -> GenerationRecord | None:
        """Another replica may have given the answer and not written its record yet (records are written after the
        last byte, in the background): reads the store again, more and more slowly, for `other_replicas_wait_s`."""
        deadline = anyio.current_time() + self.other_replicas_wait_s
        delay = 0.01
        while anyio.current_time() < deadline:
            await anyio.sleep(min(delay, max(0.0, deadline - anyio.current_time())))
            record = await anyio.to_thread.run_sync(self.store.get_generation, response_id)
            if record is not None:
                return record
            delay = min(delay * 2, 0.25)
        return None

    async def add_feedback(self, caller: Caller, body: FeedbackRequest, idempotency_key: str | None) -> FeedbackObject:
        await self.generation(caller, body.response_id, "response_id")
        event = FeedbackEvent(
            generation_id=body.response_id,
            rating=body.rating,
            correction=body.correction,
            comment=body.comment,
            facts=body.facts,
            user_id=self.user_id(caller, body.user),
            idempotency_key=body.idempotency_key or idempotency_key,
        )
        with store_errors("response_id"):
            stored = await anyio.to_thread.run_sync(self.store.add_feedback, event)
        if stored.id == event.id:  # not an idempotent replay
            label = version_label(stored.adapter_version)
            for kind in ("rating", "correction", "comment", "facts"):
                if getattr(stored, kind):
                    self.metrics.feedback.labels(kind=kind, adapter=label).inc()
            if stored.rating is not None:
                self.metrics.observe_thumbs(label, stored.rating)
        return feedback_object(stored)

    async def get_feedback(self, caller: Caller, feedback_id: str) -> FeedbackObject:
        event = await anyio.to_thread.run_sync(self.store.get_event, feedback_id)
        if isinstance(event, FeedbackEvent):
            record = await anyio.to_thread.run_sync(self.store.get_generation, event.generation_id)
            if caller.is_admin or (record is not None and record.key_id == caller.key_id):
                return feedback_object(event)
        raise APIError(404, f"No feedback with id '{feedback_id}'.", param="feedback_id", code="feedback_not_found")

    async def add_preference(
        self, caller: Caller, body: PreferenceRequest, idempotency_key: str | None
    ) -> PreferenceObject:
        for index, response_id in enumerate(body.response_ids):
            await self.generation(caller, response_id, f"response_ids.{index}")
        event = PreferenceEvent(
            generation_ids=body.response_ids,
            preferred_id=body.preferred_id,
            user_id=self.user_id(caller, body.user),
            idempotency_key=body.idempotency_key or idempotency_key,
        )
        with store_errors("response_ids"):
            stored = await anyio.to_thread.run_sync(self.store.add_preference, event)
        if stored.id == event.id:
            self.metrics.feedback.labels(kind="preference", adapter=version_label(stored.adapter_versions[0])).inc()
        return PreferenceObject(
            id=stored.id,
            created=int(stored.created),
            response_ids=stored.generation_ids,
            preferred_id=stored.preferred_id,
            adapter_versions=tuple(version_label(v) for v in stored.adapter_versions),
        )

    async def add_facts(self, caller: Caller, image_sha256: str, body: FactsRequest) -> FactsObject:
        """Facts about an image the caller has sent (any image, for the admin key)."""
        await self.recorder.wait_image_written(
            image_sha256
        )  # an answer just given may still be on its way to the store
        if not caller.is_admin and not await self._sent_image(caller, image_sha256):
            raise APIError(
                404,
                f"No image sha256:{image_sha256} was sent with this API key.",
                param="sha256",
                code="image_not_found",
            )
        record = FactsRecord(
            image_sha256=image_sha256,
            caption=body.caption,
            facts=body.facts,
            source="user",
            user_id=self.user_id(caller, None),
        )
        with store_errors("sha256"):
            await anyio.to_thread.run_sync(self.store.add_facts, record)
        return FactsObject(
            id=record.id,
            image_sha256=image_sha256,
            caption=record.caption,
            facts=record.facts,
            source=record.source,
            created=int(record.created),
        )


def feedback_object(event: FeedbackEvent) -> FeedbackObject:
    return FeedbackObject(
        id=event.id,
        created=int(event.created),
        response_id=event.generation_id,
        rating=event.rating,
        correction=event.correction,
        comment=event.comment,
        facts=event.facts,
        adapter_version=version_label(event.adapter_version),
    )
