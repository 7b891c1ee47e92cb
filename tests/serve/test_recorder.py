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
            record = GenerationRecord(id="gen-1", alias="llava-rlhf", messages=image_message(sha, "Q?"), response="A.",
                                      user_id="u-1")  # fmt: skip
            writer.submit(record, [data])
            before = store.generations_using_image(sha)
            await writer.wait_image_written(sha)
            after = store.generations_using_image(sha)
            await writer.wait_image_written("0" * 64)  # an image nobody queued returns at once
            runner.cancel()
            return before, after, list(writer.pending_by_image)

        before, after, still_waiting = asyncio.run(scenario())
    assert before == [] and after == ["gen-1"] and still_waiting == []
