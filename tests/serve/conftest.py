"""Gateway fixtures: the real app on a fake vLLM upstream (unit tier) and helpers to build requests."""

from __future__ import annotations

import base64
import io
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve.app import create_app
from serve.settings import GatewaySettings
from tests.serve.fake_vllm import FakeVLLM

ALICE = "sk-alice-0123456789abcdef"
BOB = "sk-bob-0123456789abcdef0"
ADMIN = "admin-0123456789abcdef"


def png_data_url(color=(220, 30, 30), size=(16, 16), fmt="PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def image_question(url: str, question: str = "What color is the square?") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def wait_until(condition, timeout: float = 5.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


@pytest.fixture
def fake_vllm() -> FakeVLLM:
    return FakeVLLM()


@pytest.fixture
def settings(tmp_path) -> GatewaySettings:
    return GatewaySettings(
        store_url=f"sqlite:///{tmp_path / 'store.db'}",
        vllm_urls=["http://fake-vllm"],
        api_keys=[f"alice:{ALICE}", f"bob:{BOB}"],
        admin_key=ADMIN,
        rate_limit_per_minute=100_000,
        health_interval_s=0.05,
        alias_poll_interval_s=0.05,
        max_tokens_cap=256,
        image_url_allowlist=["images.example.com"],
    )


def make_client(settings: GatewaySettings, fake_vllm: FakeVLLM, image_transport=None) -> TestClient:
    app = create_app(settings, upstream_transport=httpx.ASGITransport(fake_vllm.app), image_transport=image_transport)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def client(settings, fake_vllm):
    with make_client(settings, fake_vllm) as test_client:
        wait_until(lambda: test_client.get("/ready").status_code == 200)
        yield test_client


@pytest.fixture
def store(client):
    return client.app.state.store
