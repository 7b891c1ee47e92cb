"""`alignloop up`, embedded mode: the gateway starts vLLM itself, answers 503 while vLLM is down, restarts it after
a crash, and takes it (and the trainer beside it) down on shutdown."""

from __future__ import annotations

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

pytestmark = pytest.mark.slow


def vllm_children(gateway: subprocess.Popen) -> list[psutil.Process]:
    """The vLLM server processes the gateway started itself (vLLM's own engine processes are their children, some
    forked with the same command line, so only direct children count)."""
    return [
        p
        for p in psutil.Process(gateway.pid).children(recursive=False)
        if "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline())
    ]


def chat(url: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        timeout=60,
        json={
            "model": "llava-rlhf",
            "messages": [{"role": "user", "content": "How many objects are there?"}],
            "max_tokens": 4,
        },
    )


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_up_supervises_its_vllm(bundled_model, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(
        os.environ,
        ALIGNLOOP_VLLM_PORT=str(free_port()),
        ALIGNLOOP_HEALTH_INTERVAL_S="0.5",
        ALIGNLOOP_VLLM_LOG=str(tmp_path / "vllm.log"),
    )
    command = [
        str(Path(sys.executable).parent / "alignloop"),
        "up",
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
        health = wait_for(lambda: _get(f"{url}/health"), 30, "the gateway process")
        assert health.json() == {"status": "ok"}  # up at once, before vLLM
        if not ready(url):
            early = chat(url)
            assert early.status_code == 503 and early.json()["error"]["code"] == "engine_unavailable"
        wait_for(lambda: ready(url), 240, "embedded vLLM")
        assert chat(url).status_code == 200
        (engine,) = vllm_children(gateway)
        (trainer,) = [p for p in psutil.Process(gateway.pid).children() if "trainer" in p.cmdline()]

        os.killpg(os.getpgid(engine.pid), signal.SIGKILL)  # vLLM crashes, with its workers
        down = wait_for(lambda: (r := chat(url)).status_code == 503 and r, 15, "503 while vLLM is down")
        assert down.json()["error"]["type"] == "service_unavailable" and down.headers["retry-after"]
        wait_for(lambda: ready(url), 240, "vLLM restarted")
        answer = chat(url)
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
        (restarted,) = vllm_children(gateway)
        assert restarted.pid != engine.pid
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(60)
        log.close()
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught: the exit status says "terminated".
    assert gateway.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in (tmp_path / "gateway.log").read_text()
    wait_for(
        lambda: not psutil.pid_exists(restarted.pid) or restarted.status() == psutil.STATUS_ZOMBIE,
        10,
        "vLLM to stop with the gateway",
    )
    assert not trainer.is_running() or trainer.status() == psutil.STATUS_ZOMBIE  # stopped in the graceful shutdown


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None
