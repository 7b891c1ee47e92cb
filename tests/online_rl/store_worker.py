"""A separate process that writes or consumes feedback, for the crash and concurrency tests.

python tests/online_rl/store_worker.py write URL GENERATION_ID COUNT KEY_PREFIX [SHARED_KEYS]
    adds COUNT thumbs events, then SHARED_KEYS events whose idempotency keys every writer shares; prints
    "ok KEY EVENT_ID" after each add_feedback returned, so the parent knows exactly what was acknowledged.
python tests/online_rl/store_worker.py consume URL GROUP CONSUMER COUNT
    reads COUNT events, prints "got EVENT_ID" for each, then waits to be killed without acknowledging.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from online_rl.schema import FeedbackEvent
from online_rl.store import open_store


def write(url: str, generation_id: str, count: int, key_prefix: str, shared: int = 0) -> None:
    store = open_store(url)
    keys = [f"{key_prefix}-{i}" for i in range(count)] + [f"shared-{i}" for i in range(shared)]
    for key in keys:
        rating = -1 if key.startswith("shared") else 1
        event = store.add_feedback(
            FeedbackEvent(generation_id=generation_id, rating=rating, user_id="u-writer", idempotency_key=key)
        )
        print(f"ok {key} {event.id}", flush=True)


def consume(url: str, group: str, consumer: str, count: int) -> None:
    store = open_store(url)
    deliveries = []
    while len(deliveries) < count:
        deliveries += store.read_events(group, consumer, count=count - len(deliveries), block_ms=1000)
    for delivery in deliveries:
        print(f"got {delivery.event.id}", flush=True)
    print("holding", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "write":
        write(args[0], args[1], int(args[2]), args[3], int(args[4]) if len(args) > 4 else 0)
    else:
        consume(args[0], args[1], args[2], int(args[3]))
