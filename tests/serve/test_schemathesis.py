"""Property-based API test: schemathesis generates requests from the gateway's OpenAPI document and sends them to a
live gateway (uvicorn, real HTTP) whose vLLM upstream is a fake. No request may produce a 5xx."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings

from serve.app import create_app
from tests.conftest import free_port
from tests.serve.conftest import ADMIN, ALICE
from tests.serve.fake_vllm import FakeVLLM


@pytest.fixture(scope="module")
def live_gateway(tmp_path_factory):
    from serve.settings import GatewaySettings

    tmp = tmp_path_factory.mktemp("schemathesis")
    settings = GatewaySettings(
        store_url=f"sqlite:///{tmp / 'store.db'}",
        vllm_urls=["http://fake-vllm"],
        api_keys=[f"alice:{ALICE}"],
        admin_key=ADMIN,
        rate_limit_per_minute=1_000_000,
        health_interval_s=0.1,
        max_concurrent_per_key=1000,
    )
    app = create_app(settings, upstream_transport=httpx.ASGITransport(FakeVLLM().app))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/ready").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    yield base, app.openapi()
    server.should_exit = True
    thread.join(30)


def check_operation(operation, base_url: str) -> None:
    """Sends the operation's generated requests (as the admin on /v1/admin, as a user elsewhere) and checks each
    answer: never a 5xx, and an error in JSON has the OpenAI error shape. Half of the generated chat, completions and
    responses requests are given a model the gateway serves, so they get past the model check."""
    key = ADMIN if operation.path.startswith("/v1/admin") else ALICE

    @given(case=operation.as_strategy())
    @hypothesis_settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        body = case.body
        if isinstance(body, dict) and isinstance(body.get("model"), str) and len(body["model"]) % 2 == 0:
            body["model"] = "base"  # half of the generated requests name a served model and reach the fake vLLM
        response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}"
        content_type = " ".join(response.headers.get("content-type", []))  # schemathesis 4: header -> list
        if response.status_code >= 400 and content_type.startswith("application/json"):
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()


def test_no_request_makes_the_gateway_fail(live_gateway):
    base_url, document = live_gateway
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    for operation in operations:
        check_operation(operation, base_url)
