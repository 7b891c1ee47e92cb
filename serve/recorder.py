"""Writes generation records (and their images) to the store after the response has gone out.

A completion hands its record to `RecordWriter.submit` after its last byte; one background task writes records in
order, in a worker thread, so the write never delays a response; what queued up meanwhile goes in one trip. A write
that fails is retried with backoff; one that still fails is counted (`alignloop_record_write_failures`) and logged
with its id, never dropped silently.
Feedback that arrives before its record is written waits for that write (`wait_written`) instead of getting a 404,
and so do facts about an image whose records are still queued (`wait_image_written`).
On shutdown the queue is drained.

Most traffic repeats images (a conversation resends its image every turn), so the writer remembers the hashes of
the last images it stored and skips storing them again; if one was deleted meanwhile (a user's data erased), the
store refuses the record for its missing image and the writer stores the images and writes it again.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging

import anyio

from online_rl.schema import GenerationRecord
from online_rl.store import ConflictError, FeedbackStore, NotFoundError
from serve.metrics import GatewayMetrics

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PendingRecord:
    record: GenerationRecord
    images: dict[str, bytes]  # by sha256
    written: asyncio.Future


class RecordWriter:
    def __init__(
        self,
        store: FeedbackStore,
        metrics: GatewayMetrics,
        max_pending: int = 10_000,
        retries: int = 3,
        batch_size: int = 64,
    ):
        self.store = store
        self.metrics = metrics
        self.max_pending = max_pending
        self.retries = retries
        self.batch_size = batch_size
        self.queue: asyncio.Queue[PendingRecord] = asyncio.Queue()
        self.pending: dict[str, asyncio.Future] = {}
        self.pending_by_image: dict[str, set[str]] = {}  # image sha256 -> ids of queued records that carry it
        self.stored_images: collections.OrderedDict[str, None] = (
            collections.OrderedDict()
        )  # stored lately, oldest first
        self.remembered_images = 4096

    def submit(self, record: GenerationRecord, images: dict[str, bytes]) -> None:
        """Queues a record with its images' bytes, keyed by the sha256 the request already computed."""
        if len(self.pending) >= self.max_pending:
            self.metrics.record_failures.labels(kind="queue_full").inc()
            logger.error("record dropped: write queue full id=%s pending=%d", record.id, len(self.pending))
            return
        future = asyncio.get_running_loop().create_future()
        self.pending[record.id] = future
        for sha256 in record.image_hashes:
            self.pending_by_image.setdefault(sha256, set()).add(record.id)
        self.queue.put_nowait(PendingRecord(record, images, future))
        self.metrics.records_pending.set(len(self.pending))

    async def wait_written(self, generation_id: str, timeout: float = 10.0) -> None:
        """Waits until a submitted record is in the store (returns at once if it is not queued here)."""
        future = self.pending.get(generation_id)
        if future is not None:
            with anyio.move_on_after(timeout):
                await asyncio.shield(future)

    async def wait_image_written(self, image_sha256: str, timeout: float = 10.0) -> None:
        """Waits until every queued record that carries this image is in the store."""
        for generation_id in list(self.pending_by_image.get(image_sha256, ())):
            await self.wait_written(generation_id, timeout)

    def _write(self, item: PendingRecord) -> None:
        self._store_images(item.images)
        try:
            self.store.add_generation(item.record)
        except NotFoundError:  # an image remembered as stored was deleted since: store them all, then write again
            self.stored_images.clear()
            self._store_images(item.images)
            self.store.add_generation(item.record)
        except ConflictError:  # a retry after a write that succeeded but reported an error
            if self.store.get_generation(item.record.id) is None:
                raise

    def _store_images(self, images: dict[str, bytes]) -> None:
        for sha256, data in images.items():
            if sha256 in self.stored_images:
                self.stored_images.move_to_end(sha256)
                continue
            self.store.put_image(data)
            self.stored_images[sha256] = None
            if len(self.stored_images) > self.remembered_images:
                self.stored_images.popitem(last=False)

    async def run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.batch_size and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                failures = await anyio.to_thread.run_sync(self._write_batch, batch)
                for item, error in failures:
                    await self._retry(item, error)
            finally:
                for item in batch:
                    self._finished(item)

    def _write_batch(self, batch: list[PendingRecord]) -> list[tuple[PendingRecord, Exception]]:
        """Writes what is queued in one trip to the worker thread (one per record cost a thread hop each)."""
        failures = []
        for item in batch:
            try:
                self._write(item)
            except Exception as error:
                failures.append((item, error))
        return failures

    async def _retry(self, item: PendingRecord, error: Exception) -> None:
        delay = 0.05
        for _ in range(self.retries - 1):
            await asyncio.sleep(delay)
            delay *= 4
            try:
                await anyio.to_thread.run_sync(self._write, item)
                return
            except Exception as again:
                error = again
        self.metrics.record_failures.labels(kind="generation").inc()
        logger.error("generation record not written id=%s error=%s: %s", item.record.id, type(error).__name__, error)

    def _finished(self, item: PendingRecord) -> None:
        self.pending.pop(item.record.id, None)
        for sha256 in item.record.image_hashes:
            waiting = self.pending_by_image.get(sha256, set())
            waiting.discard(item.record.id)
            if not waiting:
                self.pending_by_image.pop(sha256, None)
        if not item.written.done():
            item.written.set_result(None)
        self.metrics.records_pending.set(len(self.pending))
        self.queue.task_done()

    async def drain(self, timeout: float = 30.0) -> None:
        with anyio.move_on_after(timeout):
            await self.queue.join()
        if self.pending:
            logger.error("shutdown with %d generation records unwritten", len(self.pending))
