"""Integration fixtures: real gateway processes (`alignloop serve`) in front of the session's real vLLM server, and
real LoRA adapter versions for the bundled model, published the way the trainer publishes them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import free_port

ALICE = "sk-alice-integration-0123456789"
BOB = "sk-bob-integration-0123456789ab"
ADMIN = "admin-integration-0123456789abcd"
SERVICE = "service-integration-0123456789ab"  # the trainer's key: it gates and promotes through the gateway


class GatewayProcess:
    """One `alignloop serve` replica in external mode, as a child process with its own log."""

    def __init__(self, vllm_url: str, store_url: str, workdir: Path, name: str = "gateway", **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"
        env = dict(os.environ)
        env.update(
            {
                "ALIGNLOOP_PORT": str(self.port),
                "ALIGNLOOP_VLLM_URLS": vllm_url,
                "ALIGNLOOP_STORE_URL": store_url,
                "ALIGNLOOP_BASE_MODEL_NAME": "shapes-llava",
                "ALIGNLOOP_API_KEYS": f"alice:{ALICE},bob:{BOB}",
                "ALIGNLOOP_ADMIN_KEY": ADMIN,
                "ALIGNLOOP_SERVICE_KEY": SERVICE,
                "ALIGNLOOP_HEALTH_INTERVAL_S": "0.5",
                "ALIGNLOOP_RATE_LIMIT_PER_MINUTE": "100000",
                "ALIGNLOOP_LOG_LEVEL": "WARNING",
            }
        )
        env.update({f"ALIGNLOOP_{key.upper()}": str(value) for key, value in settings.items()})
        alignloop = Path(sys.executable).parent / "alignloop"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([str(alignloop), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"gateway exited: {self.log_path.read_text()[-2000:]}"
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"gateway not ready: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def gateway_store_url(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('gateway-store') / 'alignloop.db'}"


@pytest.fixture(scope="session")
def gateway(vllm_server, gateway_store_url, tmp_path_factory):
    """One gateway replica in front of the session's vLLM server, sharing its adapter directory."""
    replica = GatewayProcess(f"{vllm_server.base_url}", gateway_store_url, tmp_path_factory.mktemp("gateway"))
    try:
        replica.wait_ready()
        yield replica
    finally:
        replica.stop()


@pytest.fixture(scope="session")
def gateway_store(gateway, gateway_store_url):
    """The gateway's store, opened by the test process (SQLite in WAL mode allows both)."""
    from online_rl.store import open_store

    store = open_store(gateway_store_url)
    yield store
    store.close()


def random_lora(model_dir: Path, seed: int):
    """A PEFT model with a rank-8 LoRA of strong random weights on the language model: it changes every answer."""
    from peft import get_peft_model

    from training.lora import language_model_lora
    from training.tiny_llava import load_checkpoint

    model, _ = load_checkpoint(model_dir)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, language_model_lora(rank=8, init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    return peft_model


@pytest.fixture(scope="session")
def publish_random_adapter(vllm_server, bundled_model):
    """publish(store, seed) -> AdapterVersion: writes policy-vN into the vLLM server's adapter directory."""
    from online_rl.adapters import publish_adapter

    def publish(store, seed: int = 0):
        return publish_adapter(
            store,
            random_lora(bundled_model, seed),
            vllm_server.config.adapter_dir,
            vllm_server.config.model,
            algorithm="random-test",
        )

    return publish
