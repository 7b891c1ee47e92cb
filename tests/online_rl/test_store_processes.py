"""Crash and concurrency tests with real processes, on SQLite and on real Redis.

- A writer killed with SIGKILL mid-stream: every event whose write had returned is in the store afterwards.
- A consumer killed before acknowledging: its events are delivered again.
- Several writers at once: no event lost or duplicated, and a shared idempotency key yields one event.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from online_rl.store import open_store
from tests.online_rl.store_helpers import make_generation, thumbs

WORKER = Path(__file__).with_name("store_worker.py")


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *args], stdout=subprocess.PIPE, text=True)


def test_a_writer_killed_mid_write_loses_nothing_it_acknowledged(store_url):
    with open_store(store_url) as store:
        make_generation(store, "chatcmpl-1")
    writer = start("write", store_url, "chatcmpl-1", "100000", "k")
    acknowledged: list[str] = []
    for line in writer.stdout:
        acknowledged.append(line.split()[2])
        if len(acknowledged) == 300:
            writer.send_signal(signal.SIGKILL)
            break
    acknowledged += [line.split()[2] for line in writer.stdout]  # lines printed before the kill landed
    writer.wait(30)
    assert writer.returncode == -signal.SIGKILL
    with open_store(store_url) as store:
        stored = [event.id for _, event in store.list_events(limit=100_000)]
        assert set(acknowledged) <= set(stored)
        assert len(stored) - len(acknowledged) in (0, 1)  # at most the write in flight when it died
        assert len(stored) == len(set(stored))
        assert [store.get_event(event_id) is not None for event_id in acknowledged[-3:]] == [True] * 3


def test_a_consumer_killed_before_acknowledging_gets_its_events_again(store_url):
    with open_store(store_url) as store:
        make_generation(store, "chatcmpl-1")
        ids = [store.add_feedback(thumbs("chatcmpl-1", 1, comment=str(i))).id for i in range(8)]
    consumer = start("consume", store_url, "trainer", "worker-1", "5")
    got = []
    for line in consumer.stdout:
        if line.startswith("holding"):
            break
        got.append(line.split()[1])
    consumer.send_signal(signal.SIGKILL)
    consumer.wait(30)
    assert got == ids[:5]
    with open_store(store_url) as store:
        assert store.pending_count("trainer") == 5
        # The restarted consumer gets its unacknowledged events back, then the rest.
        again = store.read_events("trainer", "worker-1", count=10, include_own_pending=True)
        assert [d.event.id for d in again] == ids
        store.ack_events("trainer", [d.delivery_id for d in again])
        assert store.read_events("trainer", "worker-1", count=10, include_own_pending=True, min_idle_ms=0) == []


def test_concurrent_writers_lose_nothing_and_honour_idempotency_keys(store_url):
    writers, unique, shared = 4, 40, 20
    with open_store(store_url) as store:
        make_generation(store, "chatcmpl-1")
    processes = [start("write", store_url, "chatcmpl-1", str(unique), f"p{n}", str(shared)) for n in range(writers)]
    results: list[tuple[str, str]] = []
    for process in processes:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        results += [tuple(line.split()[1:]) for line in out.splitlines()]
    assert len(results) == writers * (unique + shared)
    by_key: dict[str, set[str]] = {}
    for key, event_id in results:
        by_key.setdefault(key, set()).add(event_id)
    assert all(len(ids) == 1 for ids in by_key.values())  # every writer got the same event for a shared key
    with open_store(store_url) as store:
        stored = [event for _, event in store.list_events(limit=10_000)]
        assert len(stored) == writers * unique + shared
        assert sorted(e.idempotency_key for e in stored) == sorted(by_key)
        assert {e.id for e in stored} == {next(iter(ids)) for ids in by_key.values()}
