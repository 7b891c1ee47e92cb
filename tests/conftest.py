"""Shared fixtures: the bundled model, one real vLLM CPU server per test session, and a real Redis."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = REPO / "models" / "shapes-llava"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    assert (BUNDLED_MODEL / "model.safetensors").is_file(), "the bundled checkpoint is missing"
    return BUNDLED_MODEL


@pytest.fixture(scope="session")
def vllm_server(bundled_model, tmp_path_factory):
    """A real vLLM OpenAI server on the bundled model, with LoRA and the filesystem resolver enabled."""
    from serve.vllm_process import VLLMServer, VLLMServerConfig

    workdir = tmp_path_factory.mktemp("vllm")
    config = VLLMServerConfig(
        model=str(bundled_model),
        served_model_name="shapes-llava",
        port=free_port(),
        adapter_dir=str(workdir / "adapters"),
    )
    server = VLLMServer(config, log_path=workdir / "vllm.log")
    server.start()
    try:
        server.wait_ready(timeout=300)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real Redis: the one on 127.0.0.1:6379 when it answers, else a `redis-server` started for the session.

    Tests use database 15 and a key prefix of their own, so they never touch other data on a shared server.
    """
    import shutil
    import subprocess
    import time

    import redis

    url = os.environ.get("ALIGNLOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        yield url
        return
    except redis.RedisError:
        pass
    binary = shutil.which("redis-server")
    assert binary, f"no Redis answers at {url} and no redis-server binary is installed (apt install redis-server)"
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/15"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url, socket_connect_timeout=1).ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def redis_store_url(redis_url):
    """A Redis store URL with a fresh key prefix; the keys are deleted after the test."""
    import uuid

    import redis

    prefix = f"alignloop-test-{uuid.uuid4().hex[:12]}"
    yield f"{redis_url}?prefix={prefix}"
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def anyio_backend():
    """Async tests (marked `anyio`) run on asyncio, the loop the gateway runs on."""
    return "asyncio"
