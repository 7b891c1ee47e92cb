"""The whole loop, end to end: `alignloop up` (gateway, embedded vLLM, the trainer beside them) and `alignloop simulate`
with a few hundred feedback events. A new version must be trained, gated, promoted and served, with no failed request.

The gate's tolerances are opened wide here: this test is about the loop's mechanics (pairs, a round, publication,
the gate's run through the gateway, promotion, the swap); whether the versions get better is what
bench/online_loop.py measures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import free_port
from tests.integration.test_embedded_mode import ready, wait_for

pytestmark = pytest.mark.slow
EVENTS = 240


def versions(url: str) -> dict:
    response = httpx.get(f"{url}/v1/versions", params={"recent": 10}, timeout=10)
    response.raise_for_status()
    return response.json()


def test_up_and_the_simulator_train_gate_promote_and_serve_a_version(bundled_model, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    alignloop = str(Path(sys.executable).parent / "alignloop")
    env = dict(
        os.environ,
        ALIGNLOOP_VLLM_PORT=str(free_port()),
        ALIGNLOOP_VLLM_LOG=str(tmp_path / "vllm.log"),
        ALIGNLOOP_TRAINER_ROUND_MIN_PAIRS="24",
        ALIGNLOOP_TRAINER_EPOCHS="1",
        ALIGNLOOP_TRAINER_EVAL_IMAGES="8",
        ALIGNLOOP_TRAINER_POLL_INTERVAL_S="1",
        ALIGNLOOP_TRAINER_CHAIR_TOLERANCE="1",
        ALIGNLOOP_TRAINER_POPE_TOLERANCE="1",
        ALIGNLOOP_TRAINER_RECALL_TOLERANCE="1",
        # The simulator (3 calls per event) and this test's polling share the dev key: no rate limit here.
        ALIGNLOOP_RATE_LIMIT_PER_MINUTE="1000000",
    )
    command = [
        alignloop,
        "up",
        "--no-demo",
        "--port",
        str(port),
        "--model",
        str(bundled_model),
        "--store-url",
        f"sqlite:///{tmp_path / 'store.db'}",
        "--adapter-dir",
        str(tmp_path / "adapters"),
    ]
    log = (tmp_path / "gateway.log").open("wb")
    gateway = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: ready(url), 300, "the gateway and its vLLM")
        (trainer,) = [p for p in psutil.Process(gateway.pid).children() if "trainer" in p.cmdline()]
        assert versions(url)["current_version"] is None  # the base model answers at first

        simulated = subprocess.run(
            [
                alignloop,
                "simulate",
                "--gateway-url",
                url,
                "--events",
                str(EVENTS),
                "--concurrency",
                "4",
                "--output",
                str(tmp_path / "sim.json"),
            ],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert simulated.returncode == 0, simulated.stderr[-2000:]
        report = json.loads((tmp_path / "sim.json").read_text())
        assert report["events"] == EVENTS and report["failed_requests"] == 0, report["errors"]

        promoted = wait_for(lambda: versions(url)["current_version"], 900, "a promoted version")
        overview = versions(url)
        version = next(v for v in overview["data"] if v["version"] == promoted)
        assert version["status"] == "promoted" and version["algorithm"] == "dense-dpo"
        assert set(version["metrics"]) >= {"chair_s", "pope_adversarial_accuracy", "object_recall"}
        assert (tmp_path / "adapters" / f"policy-v{promoted}" / "adapter_config.json").is_file()

        def serves_it() -> bool:
            answer = httpx.post(
                f"{url}/v1/chat/completions",
                timeout=60,
                json={
                    "model": "llava-rlhf",
                    "max_tokens": 4,
                    "messages": [{"role": "user", "content": "How many objects?"}],
                },
            )
            assert answer.status_code == 200, answer.text
            return answer.json()["system_fingerprint"] == f"policy-v{promoted}"

        wait_for(serves_it, 30, "the gateway to serve the promoted version")
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(90)
        log.close()
    trainer_log = (tmp_path / "trainer.log").read_text()
    assert "Traceback" not in trainer_log, trainer_log[-3000:]
    wait_for(
        lambda: not trainer.is_running() or trainer.status() == psutil.STATUS_ZOMBIE,
        30,
        "the trainer to stop with the gateway",
    )
