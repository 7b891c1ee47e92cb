"""The whole loop as a user runs it: `alignloop up` with its default settings (gateway, embedded vLLM, the trainer
beside them; no limit or tolerance changed) and `alignloop simulate --events 300`. A version must be trained, gated
through the gateway, promoted and served, with no failed request, and its CHAIR_s on held-out test images must be
below the base model's. A second test kills the trainer in the middle of a gate and checks that the restarted trainer
gates that version.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import free_port
from tests.integration.test_embedded_mode import ready, wait_for

pytestmark = pytest.mark.slow
ALIGNLOOP = str(Path(sys.executable).parent / "alignloop")


def versions(url: str) -> dict:
    response = httpx.get(f"{url}/v1/versions", params={"recent": 10}, timeout=10)
    response.raise_for_status()
    return response.json()


def start_up(bundled_model, tmp_path, port: int, **env_overrides) -> subprocess.Popen:
    """`alignloop up --no-demo` on free ports and files under tmp_path; every other setting is the default."""
    env = dict(
        os.environ,
        ALIGNLOOP_VLLM_PORT=str(free_port()),
        ALIGNLOOP_VLLM_LOG=str(tmp_path / "vllm.log"),
        ALIGNLOOP_TRAINER_METRICS_PORT=str(free_port()),
        **env_overrides,
    )
    command = [
        ALIGNLOOP,
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
    log = (tmp_path / "gateway.log").open("ab")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def simulate(url: str, events: int, tmp_path) -> dict:
    simulated = subprocess.run(
        [ALIGNLOOP, "simulate", "--gateway-url", url, "--events", str(events), "--output", str(tmp_path / "sim.json")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert simulated.returncode == 0, simulated.stderr[-2000:]
    return json.loads((tmp_path / "sim.json").read_text())


def stop(gateway: subprocess.Popen) -> None:
    gateway.send_signal(signal.SIGTERM)
    gateway.wait(90)


def chair_s(model_dir, adapter_dir: Path | None) -> float:
    """CHAIR_s of a version on 100 held-out test scenes, scored in-process (transformers + PEFT)."""
    from peft import PeftModel

    from training.evaluation.models import TransformersChatModel
    from training.evaluation.shapes_bench import evaluate_shapes, gate_items
    from training.shapes_world import ShapesWorld
    from training.tiny_llava import load_checkpoint

    model, processor = load_checkpoint(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    chat = TransformersChatModel.from_loaded(model, processor, batch_size=32)
    return evaluate_shapes(chat, ShapesWorld(), "test", 100, progress=False, only=gate_items)["chair_s"]


def test_up_with_default_settings_and_300_simulated_events_promotes_a_better_version(bundled_model, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateway = start_up(bundled_model, tmp_path, port)
    try:
        wait_for(lambda: ready(url), 300, "the gateway and its vLLM")
        (trainer,) = [p for p in psutil.Process(gateway.pid).children() if "trainer" in p.cmdline()]
        assert versions(url)["current_version"] is None  # the base model answers at first

        report = simulate(url, 300, tmp_path)
        assert report["events"] == 300 and report["failed_requests"] == 0, report["errors"]

        promoted = wait_for(lambda: versions(url)["current_version"], 900, "a promoted version")
        overview = versions(url)
        version = next(v for v in overview["data"] if v["version"] == promoted)
        assert version["status"] == "promoted" and version["algorithm"] == "dense-dpo"
        assert version["gate"]["passed"] and version["gate"]["baseline"] == "base"
        assert set(version["gate"]["differences"]) == {"chair_s", "pope_adversarial_accuracy", "object_recall"}
        assert sum(version["pair_sources"].values()) >= 16  # the default round_min_pairs

        def serves_it() -> bool:
            answer = httpx.post(
                f"{url}/v1/chat/completions",
                timeout=60,
                json={"model": "llava-rlhf", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]},
            )
            assert answer.status_code == 200, answer.text
            return answer.json()["system_fingerprint"] == f"policy-v{promoted}"

        wait_for(serves_it, 30, "the gateway to serve the promoted version")
        # Nothing is left ungated once the trainer has caught up with the feedback.
        wait_for(
            lambda: all(v["status"] not in ("candidate", "gate_failed") for v in versions(url)["data"]),
            600,
            "every version gated",
        )
    finally:
        stop(gateway)
    trainer_log = (tmp_path / "trainer.log").read_text()
    assert "Traceback" not in trainer_log, trainer_log[-3000:]
    assert "phase=read" in trainer_log and "phase=train" in trainer_log and "decision=promoted" in trainer_log
    wait_for(lambda: not trainer.is_running() or trainer.status() == psutil.STATUS_ZOMBIE, 30, "the trainer to stop")
    # Held out: the promoted version hallucinates less than the base model on test images.
    assert chair_s(bundled_model, tmp_path / "adapters" / f"policy-v{promoted}") < chair_s(bundled_model, None)


def test_a_trainer_killed_during_a_gate_gates_that_version_after_its_restart(bundled_model, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateway = start_up(bundled_model, tmp_path, port)
    try:
        wait_for(lambda: ready(url), 300, "the gateway and its vLLM")
        simulate(url, 120, tmp_path)
        log = tmp_path / "trainer.log"
        wait_for(lambda: log.is_file() and "phase=publish" in log.read_text(), 600, "a published version")
        (trainer,) = [p for p in psutil.Process(gateway.pid).children() if "trainer" in p.cmdline()]
        published = versions(url)["data"][-1]
        assert published["status"] == "candidate"  # published, its gate under way
        trainer.send_signal(signal.SIGKILL)
        killed_at = time.time()
        # The supervisor starts a new trainer, which gates what the killed one left ungated.
        gated = wait_for(
            lambda: next(
                (
                    v
                    for v in versions(url)["data"]
                    if v["version"] == published["version"] and v["status"] != "candidate"
                ),
                None,
            ),
            600,
            "the restarted trainer to gate the version",
        )
        assert gated["status"] in ("promoted", "rejected") and gated["gate"]["differences"]
        assert all(v["status"] not in ("candidate", "gate_failed") for v in versions(url)["data"])
        restarts = [line for line in log.read_text().splitlines() if "phase=start" in line]
        assert len(restarts) == 2 and "pending=candidate" in log.read_text()
        assert time.time() - killed_at < 600
    finally:
        stop(gateway)
