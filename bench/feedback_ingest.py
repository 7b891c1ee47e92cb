"""Feedback ingestion benchmark: throughput and p50/p99 latency of `add_feedback` on each store backend.

For each backend it writes thumbs events for one stored generation, first from one process (latency of a single
writer), then from `--writers` processes at once (throughput under contention). In the same run it measures the
ceiling: `redis-benchmark`'s raw XADD rate against the same Redis with the same number of clients. Prints JSON.

    .venv/bin/python bench/feedback_ingest.py --events 2000 --writers 4
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from online_rl.schema import FeedbackEvent, GenerationRecord
from online_rl.store import open_store


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def write_events(url: str, count: int, tag: str) -> list[float]:
    """Adds `count` events; returns each call's latency in milliseconds."""
    store = open_store(url)
    latencies = []
    for i in range(count):
        event = FeedbackEvent(
            generation_id="chatcmpl-bench",
            rating=1 if i % 2 else -1,
            user_id="u-bench",
            idempotency_key=f"{tag}-{i}",
            comment="benchmark",
        )
        started = time.perf_counter()
        store.add_feedback(event)
        latencies.append((time.perf_counter() - started) * 1000)
    store.close()
    return latencies


def _worker(args: tuple[str, int, str]) -> list[float]:
    return write_events(*args)


def bench_backend(url: str, events: int, writers: int) -> dict:
    with open_store(url) as store:
        store.add_generation(
            GenerationRecord(
                id="chatcmpl-bench", alias="llava-rlhf", messages=[{"role": "user", "content": "Hi"}], user_id="u-bench"
            )
        )
    started = time.perf_counter()
    latencies = write_events(url, events, "seq")
    sequential_s = time.perf_counter() - started
    per_writer = events // writers
    with multiprocessing.get_context("spawn").Pool(writers) as pool:
        pool.map(_worker, [(url, 10, f"warm{n}") for n in range(writers)])  # imports and connections, not timed
        started = time.perf_counter()
        concurrent = pool.map(_worker, [(url, per_writer, f"w{n}") for n in range(writers)])
        concurrent_s = time.perf_counter() - started
    merged = [ms for chunk in concurrent for ms in chunk]
    return {
        "sequential": {
            "events": events,
            "events_per_s": round(events / sequential_s, 1),
            "p50_ms": round(statistics.median(latencies), 3),
            "p99_ms": round(percentile(latencies, 0.99), 3),
        },
        "concurrent": {
            "writers": writers,
            "events": per_writer * writers,
            "events_per_s": round(per_writer * writers / concurrent_s, 1),
            "p50_ms": round(statistics.median(merged), 3),
            "p99_ms": round(percentile(merged, 0.99), 3),
        },
    }


def redis_benchmark_xadd(redis_url: str, requests: int, clients: int) -> dict:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return {"error": "redis-benchmark is not installed"}
    parts = urlsplit(redis_url)
    key = f"alignloop-bench-{uuid.uuid4().hex[:8]}"
    command = [
        binary,
        "-h",
        parts.hostname or "127.0.0.1",
        "-p",
        str(parts.port or 6379),
        "--dbnum",
        (parts.path.strip("/") or "0"),
        "-n",
        str(requests),
        "-c",
        str(clients),
        "--csv",
        "XADD",
        key,
        "*",
        "event",
        "x" * 300,
    ]
    output = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout
    subprocess.run(
        [
            shutil.which("redis-cli") or "redis-cli",
            "-h",
            parts.hostname or "127.0.0.1",
            "-p",
            str(parts.port or 6379),
            "-n",
            parts.path.strip("/") or "0",
            "DEL",
            key,
        ],
        capture_output=True,
        timeout=30,
    )
    row = next(csv.DictReader(io.StringIO(output)))
    return {
        "clients": clients,
        "requests": requests,
        "requests_per_s": float(row["rps"]),
        "p50_ms": float(row["p50_latency_ms"]),
        "p99_ms": float(row["p99_latency_ms"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = bench_backend(f"sqlite:///{tmp}/bench.db", args.events, args.writers)
    prefix = f"alignloop-bench-{uuid.uuid4().hex[:8]}"
    redis_store = bench_backend(f"{args.redis_url}?prefix={prefix}", args.events, args.writers)
    import redis

    client = redis.Redis.from_url(args.redis_url)
    for keys in iter(lambda: list(client.scan_iter(match=f"{prefix}:*", count=1000))[:1000], []):
        client.delete(*keys)
    xadd = redis_benchmark_xadd(args.redis_url, max(20000, args.events * 5), args.writers)
    report = {
        "benchmark": "feedback_ingest",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "sqlite": sqlite,
        "redis": redis_store,
        "redis_benchmark_xadd": xadd,
        "ratios": {
            "redis_store_vs_raw_xadd_throughput": round(
                redis_store["concurrent"]["events_per_s"] / xadd["requests_per_s"], 4
            )
            if "requests_per_s" in xadd
            else None,
            "sqlite_vs_redis_store_throughput": round(
                sqlite["concurrent"]["events_per_s"] / redis_store["concurrent"]["events_per_s"], 3
            ),
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
