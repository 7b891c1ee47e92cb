"""Online loop benchmark: `alignloop up` on the bundled model, simulated users sending feedback, and the trainer beside
the gateway turning it into gated versions. Prints JSON.

Everything runs with the default settings of `alignloop up` and `alignloop simulate`. The bench gives the gateway a
service key of its own (ALIGNLOOP_SERVICE_KEY, as a deployment does) and measures with it, so its own traffic is
neither rate-limited nor recorded as users'. It measures, in one run:
- feedback-to-served latency: for every feedback event a promoted version was trained on, the time from the event's
  arrival to the first answer the gateway's public alias gave with that version; p50 and p95 over events;
- what the gate decided for every version (metric differences with intervals, reasons, seconds);
- how the served model did: each version, and the base model, scored on ShapesWorld's held-out test split through
  the gateway pinned to it (`llava-rlhf@vN`), so "the served model did not get worse" is a measurement;
- the simulator's own report (events by rater kind, failed requests, answer accuracy per served version).

`--adversarial-share 0.3` runs it with 30% adversarial raters (thumbs reversed, corrupting corrections).

    .venv/bin/python bench/online_loop.py --events 300 --test-images 300
    .venv/bin/python bench/online_loop.py --events 300 --test-images 300 --adversarial-share 0.3
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/...`

from alignloop.client import GatewayClient
from online_rl.export import all_events
from online_rl.simulator import FeedbackSimulator, SimulatorSettings
from online_rl.store import open_store

REPO = Path(__file__).resolve().parents[1]

HEADLINE = (
    "chair_s",
    "chair_i",
    "object_recall",
    "pope_adversarial_accuracy",
    "pope_random_accuracy",
    "attribute_accuracy",
)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


class FingerprintWatcher(threading.Thread):
    """Asks the public alias a one-token question every `interval` s and notes when each version first answers."""

    def __init__(self, url: str, alias: str, key: str, interval: float = 0.5):
        super().__init__(daemon=True)
        self.url, self.alias, self.interval = url, alias, interval
        self.headers = {"Authorization": f"Bearer {key}"}
        self.first_seen: dict[str, float] = {}
        self.failures = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=60) as http:
            while not self.stopped.is_set():
                try:
                    answer = http.post(
                        f"{self.url}/v1/chat/completions",
                        json={"model": self.alias, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]},
                        headers=self.headers,
                    )
                    answer.raise_for_status()
                    self.first_seen.setdefault(answer.json()["system_fingerprint"], time.time())
                except httpx.HTTPError:
                    self.failures += 1
                self.stopped.wait(self.interval)


def score(url: str, key: str, model: str, images: int) -> dict:
    from training.evaluation.models import OpenAIChatModel
    from training.evaluation.shapes_bench import evaluate_shapes
    from training.shapes_world import ShapesWorld

    report = evaluate_shapes(
        OpenAIChatModel(f"{url}/v1", model, key, concurrency=8), ShapesWorld(), "test", images, progress=False
    )
    return {key: round(report[key], 4) for key in HEADLINE}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--adversarial-share", type=float, default=0.0)
    parser.add_argument("--noisy-share", type=float, default=0.0)
    parser.add_argument("--test-images", type=int, default=300, help="held-out test images per version")
    parser.add_argument("--settle-timeout", type=float, default=1800, help="seconds to wait for the last round")
    parser.add_argument("--quiet", type=float, default=300, help="seconds without any change that end the run")
    parser.add_argument("--model", default=str(REPO / "models" / "shapes-llava"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still stops the service it started

    workdir = Path(tempfile.mkdtemp(prefix="alignloop-online-bench-"))
    store_url = f"sqlite:///{workdir / 'store.db'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service_key = secrets.token_urlsafe(24)
    env = dict(
        os.environ,
        ALIGNLOOP_VLLM_PORT=str(free_port()),
        ALIGNLOOP_VLLM_LOG=str(workdir / "vllm.log"),
        ALIGNLOOP_SERVICE_KEY=service_key,  # the trainer gates with it; this bench measures with it
        ALIGNLOOP_TRAINER_METRICS_PORT=str(free_port()),
        ALIGNLOOP_TRAINER_SEED=str(args.seed),
    )
    command = [
        str(Path(sys.executable).parent / "alignloop"),
        "up",
        "--no-demo",
        "--port",
        str(port),
        "--model",
        args.model,
        "--store-url",
        store_url,
        "--adapter-dir",
        str(workdir / "adapters"),
    ]
    log = (workdir / "gateway.log").open("wb")
    gateway = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _ready(url), 300, "the gateway and its vLLM")
        watcher = FingerprintWatcher(url, "llava-rlhf", service_key)
        watcher.start()
        settings = SimulatorSettings(
            gateway_url=url,
            events=args.events,
            adversarial_share=args.adversarial_share,
            noisy_share=args.noisy_share,
            seed=args.seed,
        )
        client = GatewayClient(url, settings.api_key.get_secret_value(), rate_limit_attempts=10)  # as `simulate`
        started = time.monotonic()
        simulation = FeedbackSimulator(settings, client).run().to_dict()
        client.close()
        with open_store(store_url) as store:
            settle(store, quiet_s=args.quiet, timeout=args.settle_timeout)
            time.sleep(5)  # the watcher sees the last promotion
            watcher.stopped.set()
            adapters = store.list_adapters()
            event_times = {delivery_id: event.created for delivery_id, event in all_events(store)}
        loop_seconds = time.monotonic() - started
        ordered = list(event_times)  # stream order
        versions, latencies = [], []
        for adapter in adapters:
            served_at = watcher.first_seen.get(adapter.name)
            trained_on = []
            if adapter.feedback_range:
                first, last = adapter.feedback_range
                if first in event_times and last in event_times:
                    window = ordered[ordered.index(first) : ordered.index(last) + 1]
                    trained_on = [event_times[d] for d in window]
            waits = [served_at - created for created in trained_on] if served_at else []
            latencies += waits
            gate = adapter.gate or {}
            versions.append(
                {
                    "version": adapter.version,
                    "status": adapter.status,
                    "parent": adapter.parent_version,
                    "events": adapter.num_feedback_events,
                    "pair_sources": adapter.pair_sources,
                    "gate": {
                        "baseline": gate.get("baseline"),
                        "seconds": gate.get("seconds"),
                        "baseline_cached": gate.get("baseline_cached"),
                        "reasons": gate.get("reasons") or ([gate["error"]] if gate.get("error") else []),
                        "differences": gate.get("differences"),
                    },
                    "feedback_to_served_p50_s": percentile(waits, 0.5),
                    "test": score(url, service_key, f"llava-rlhf@v{adapter.version}", args.test_images),
                }
            )
        base = score(url, service_key, "base", args.test_images)
        final = next((v for v in reversed(versions) if v["status"] == "promoted"), None)
        served = final["test"] if final else base
        print(
            json.dumps(
                {
                    "events": args.events,
                    "adversarial_share": args.adversarial_share,
                    "noisy_share": args.noisy_share,
                    "test_images": args.test_images,
                    "loop_seconds": round(loop_seconds, 1),
                    "versions_trained": len(versions),
                    "versions_promoted": sum(v["status"] in ("promoted", "retired") for v in versions),
                    "feedback_to_served_p50_s": percentile(latencies, 0.5),
                    "feedback_to_served_p95_s": percentile(latencies, 0.95),
                    "gate_seconds": [v["gate"]["seconds"] for v in versions],
                    "base_test": base,
                    "served_test": served,
                    "served_minus_base": {key: round(served[key] - base[key], 4) for key in HEADLINE},
                    "chair_s_change": round(served["chair_s"] / base["chair_s"] - 1, 3) if base["chair_s"] else None,
                    "watcher_failures": watcher.failures,
                    "simulation": simulation,
                    "versions": versions,
                },
                indent=2,
            )
        )
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(120)
        log.close()
    return 0


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def settle(store, quiet_s: float, timeout: float) -> None:
    """Waits until the trainer has nothing left to do: no version waits for a gate, and either every event it read is
    acknowledged (trained on, or formed no pair) or nothing has changed for `quiet_s` (what is left supports no pair,
    so no round will come)."""
    time.sleep(10)  # the trainer reads new events every couple of seconds
    deadline, last_change, last_state = time.monotonic() + timeout, time.monotonic(), None
    while time.monotonic() < deadline:
        adapters = store.list_adapters()
        pending = store.pending_count("trainer")
        state = ([(a.version, a.status) for a in adapters], pending)
        if state != last_state:
            last_state, last_change = state, time.monotonic()
        ungated = any(a.status in ("candidate", "gate_failed", "canary") for a in adapters)
        if not ungated and (pending == 0 or time.monotonic() - last_change > quiet_s):
            return
        time.sleep(5)
    raise TimeoutError("timed out waiting for the trainer's last round")


if __name__ == "__main__":
    sys.exit(main())
