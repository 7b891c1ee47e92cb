"""The record writer: what waits for a queued record, on a real SQLite store whose writes are made slow."""

from __future__ import annotations

import asyncio
import time

from online_rl.schema import GenerationRecord, sha256_hex
from online_rl.store import open_store
from serve.metrics import GatewayMetrics
from serve.recorder import RecordWriter
from tests.online_rl.store_helpers import image_message, png_bytes


class SlowStore:
    """A real store whose generation writes take `delay` seconds, as under load."""

    def __init__(self, store, delay: float):
        self.store, self.delay = store, delay

    def add_generation(self, record):
        time.sleep(self.delay)
        self.store.add_generation(record)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_facts_for_an_image_wait_for_the_queued_records_that_carry_it(tmp_path):
    data = png_bytes()
    sha = sha256_hex(data)
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:

        async def scenario() -> tuple[list[str], list[str], list[str]]:
            writer = RecordWriter(SlowStore(store, 0.3), GatewayMetrics())
            runner = asyncio.create_task(writer.run())
            record = GenerationRecord(
                id="gen-1", alias="llava-rlhf", messages=image_message(sha, "Q?"), response="A.", user_id="u-1"
            )
            writer.submit(record, {sha: data})
            before = store.generations_using_image(sha)
            await writer.wait_image_written(sha)
            after = store.generations_using_image(sha)
            await writer.wait_image_written("0" * 64)  # an image nobody queued returns at once
            runner.cancel()
            return before, after, list(writer.pending_by_image)

        before, after, still_waiting = asyncio.run(scenario())
    assert before == [] and after == ["gen-1"] and still_waiting == []


class CountingStore(SlowStore):
    """A real store that counts image writes."""

    def __init__(self, store):
        super().__init__(store, 0.0)
        self.image_writes = 0

    def put_image(self, data):
        self.image_writes += 1
        return self.store.put_image(data)


def test_an_image_is_stored_once_and_again_after_it_was_deleted(tmp_path):
    data = png_bytes()
    sha = sha256_hex(data)
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        counting = CountingStore(store)

        def record(generation_id: str, user_id: str) -> GenerationRecord:
            return GenerationRecord(
                id=generation_id, alias="llava-rlhf", messages=image_message(sha, "Q?"), response="A.", user_id=user_id
            )

        async def write(writer: RecordWriter, *records: GenerationRecord) -> None:
            runner = asyncio.create_task(writer.run())
            for item in records:
                writer.submit(item, {sha: data})
                await writer.wait_written(item.id)
            runner.cancel()

        writer = RecordWriter(counting, GatewayMetrics())
        asyncio.run(write(writer, record("gen-1", "u-1"), record("gen-2", "u-1")))
        writes_for_two = counting.image_writes
        store.delete_user("u-1")  # the image goes with its last record; the writer still remembers it as stored
        assert store.image_info(sha) is None
        asyncio.run(write(writer, record("gen-3", "u-2")))
        assert writes_for_two == 1 and counting.image_writes == 2
        assert store.generations_using_image(sha) == ["gen-3"] and store.get_image(sha) == data


class FlakyStore(SlowStore):
    """A real store whose generation writes fail for the listed ids: `times` times each (forever when None)."""

    def __init__(self, store, failing: dict[str, int | None]):
        super().__init__(store, 0.0)
        self.failing = dict(failing)

    def add_generation(self, record):
        left = self.failing.get(record.id, 0)
        if left is None or left > 0:
            if left is not None:
                self.failing[record.id] = left - 1
            raise OSError("disk I/O error")
        self.store.add_generation(record)


class BatchCountingWriter(RecordWriter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[list[str]] = []

    def _write_batch(self, batch):
        self.batches.append([item.record.id for item in batch])
        return super()._write_batch(batch)


def test_queued_records_go_in_one_trip_and_a_failing_one_is_retried_then_counted(tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        metrics = GatewayMetrics()
        writer = BatchCountingWriter(FlakyStore(store, {"gen-2": 1, "gen-4": None}), metrics, retries=3)
        ids = [f"gen-{i}" for i in range(1, 6)]

        async def scenario() -> None:
            for generation_id in ids:  # all queued before the writer runs, as under load
                writer.submit(
                    GenerationRecord(
                        id=generation_id,
                        alias="llava-rlhf",
                        messages=[{"role": "user", "content": "Q?"}],
                        response="A.",
                        user_id="u-1",
                    ),
                    {},
                )
            runner = asyncio.create_task(writer.run())
            for generation_id in ids:
                await writer.wait_written(generation_id)
            runner.cancel()

        asyncio.run(scenario())
        stored = [generation_id for generation_id in ids if store.get_generation(generation_id) is not None]
    assert writer.batches == [ids]
    assert stored == ["gen-1", "gen-2", "gen-3", "gen-5"]  # gen-2 on its retry; gen-4 failed all three tries
    assert metrics.registry.get_sample_value("alignloop_record_write_failures_total", {"kind": "generation"}) == 1
    assert writer.pending == {} and writer.queue.empty()
