"""Several gateways and several vLLM servers. A promotion made through one gateway replica (or by the trainer,
straight in the store) moves every replica's alias within a second: on SQLite the replicas poll; on Redis they are
woken by the registry's pub/sub channel, so they move at once even with a long poll interval. One gateway in front
of several vLLM servers spreads requests over the healthy ones."""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient

from online_rl.schema import AdapterVersion, adapter_name
from serve.app import create_app
from tests.serve.conftest import ADMIN, ALICE, auth, make_client, wait_until
from tests.serve.fake_vllm import FakeVLLM


def served_version(client) -> str:
    response = client.post(
        "/v1/chat/completions",
        headers=auth(ALICE),
        json={"model": "llava-rlhf", "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert response.status_code == 200, response.text
    return response.headers["x-alignloop-adapter"]


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_promotion_reaches_every_replica_within_a_second(backend, settings, fake_vllm, redis_store_url, tmp_path):
    if backend == "redis":
        # A poll interval far longer than the deadline: only the pub/sub notification can move replica B in time.
        settings = settings.model_copy(update={"store_url": redis_store_url, "alias_poll_interval_s": 30.0})
    replica_b_settings = settings.model_copy()
    with make_client(settings, fake_vllm) as replica_a, make_client(replica_b_settings, fake_vllm) as replica_b:
        for replica in (replica_a, replica_b):
            wait_until(lambda replica=replica: replica.get("/ready").status_code == 200)
        store = replica_a.app.state.store
        version = store.allocate_adapter_version()
        store.register_adapter(AdapterVersion(version=version, name=adapter_name(version), path="p", algorithm="dpo"))
        fake_vllm.adapters.add(adapter_name(version))
        assert served_version(replica_b) == "base"

        promoted_at = time.monotonic()
        response = replica_a.post(
            "/v1/admin/aliases/llava-rlhf/promote", headers=auth(ADMIN), json={"version": version}
        )
        assert response.status_code == 200, response.text
        assert served_version(replica_a) == adapter_name(version)  # the replica that took the call: at once
        wait_until(lambda: served_version(replica_b) == adapter_name(version), timeout=1.0, interval=0.01)
        moved_after = time.monotonic() - promoted_at
        assert moved_after < 1.0

        store.rollback("llava-rlhf", actor="trainer")  # a change made in the store, by no replica
        for replica in (replica_a, replica_b):
            wait_until(lambda replica=replica: served_version(replica) == "base", timeout=1.0, interval=0.01)


class RouteByHost(httpx.AsyncBaseTransport):
    """Sends each request to the fake vLLM named by its host, like several vLLM pods behind the gateway."""

    def __init__(self, servers: dict[str, FakeVLLM]):
        self.transports = {host: httpx.ASGITransport(server.app) for host, server in servers.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.transports[request.url.host].handle_async_request(request)


def test_external_mode_spreads_requests_over_the_healthy_servers(settings):
    servers = {"vllm-0": FakeVLLM(), "vllm-1": FakeVLLM()}
    settings = settings.model_copy(update={"vllm_urls": ["http://vllm-0:8000", "http://vllm-1:8000"]})
    app = create_app(settings, upstream_transport=RouteByHost(servers))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_until(lambda: len(client.get("/ready").json().get("upstreams", [])) == 2)
        for _ in range(20):
            assert served_version(client) == "base"
        assert len(servers["vllm-0"].requests) == len(servers["vllm-1"].requests) == 10  # idle servers take turns

        servers["vllm-1"].healthy = False
        wait_until(lambda: client.get("/ready").json()["upstreams"] == ["http://vllm-0:8000"])
        before = len(servers["vllm-1"].requests)
        for _ in range(10):
            assert served_version(client) == "base"  # nothing fails while one server is down
        assert len(servers["vllm-1"].requests) == before
