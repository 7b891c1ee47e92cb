"""The gateway's real upstream transport (aiohttp under httpx) against a fake vLLM served over real TCP:
- streamed answers keep the connection open for the next request: the relay reads each upstream response to its
  end, so the connection goes back to the pool instead of closing (a connection per request cost a TCP handshake
  and a vLLM accept on every stream);
- a server that refuses connections is skipped: the request goes to another one and nothing fails;
- a client that hangs up mid-stream ends the stream from vLLM at once and frees its concurrency slot;
- the client keeps no cookies from one upstream answer to the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from serve.app import create_app
from serve.upstream import CONNECT_FAILURES, upstream_client
from tests.conftest import free_port
from tests.serve.conftest import ALICE, auth, wait_until
from tests.serve.fake_vllm import FakeVLLM


class ClientPorts:
    """ASGI wrapper: the client ports that chat completions arrived from, i.e. the gateway's connections."""

    def __init__(self, app):
        self.app, self.ports = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/chat/completions":
            self.ports.append(scope["client"][1])
        await self.app(scope, receive, send)


@contextlib.contextmanager
def served(app):
    """Runs an ASGI app on a free local port in a thread; yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_streamed_requests_reuse_the_upstream_connection(settings):
    fake = ClientPorts(FakeVLLM().app)
    with served(fake) as url:
        app = create_app(settings.model_copy(update={"vllm_urls": [url]}))
        with TestClient(app) as client:
            wait_until(lambda: client.get("/ready").status_code == 200)
            for _ in range(6):
                body = {"model": "llava-rlhf", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
                with client.stream("POST", "/v1/chat/completions", headers=auth(ALICE), json=body) as response:
                    assert response.status_code == 200
                    assert list(response.iter_lines())[-2:] == ["data: [DONE]", ""]
    # Six streams, one after another: one connection (two when a health check's idle connection got picked up),
    # not a new one per stream.
    assert len(fake.ports) == 6 and len(set(fake.ports)) <= 2, fake.ports


def test_a_refused_connection_is_a_connect_failure_on_the_real_transport():
    async def post_to_closed_port():
        async with upstream_client(5.0) as client:
            await client.post(f"http://127.0.0.1:{free_port()}/v1/chat/completions", json={})

    with pytest.raises(CONNECT_FAILURES):
        asyncio.run(post_to_closed_port())


def test_requests_skip_a_server_that_refuses_connections(settings):
    dead_url = f"http://127.0.0.1:{free_port()}"
    with served(FakeVLLM().app) as live_url:
        # One health check at start-up and none during the requests: a check between the test marking the dead
        # server healthy and the request would mark it down again, and the request would never try it.
        app = create_app(settings.model_copy(update={"vllm_urls": [dead_url, live_url], "health_interval_s": 600}))
        with TestClient(app) as client:
            wait_until(lambda: client.get("/ready").status_code == 200)
            pool = app.state.pool
            for stream in (False, True, False, True):
                pool.upstreams[0].healthy = True  # as if it died after its last health check
                body = {"model": "llava-rlhf", "stream": stream, "messages": [{"role": "user", "content": "Hi"}]}
                response = client.post("/v1/chat/completions", headers=auth(ALICE), json=body)
                assert response.status_code == 200, response.text
                assert not pool.upstreams[0].healthy  # the refused connection took it out at once
            # Ties go round: each request tried the dead server first (its pick, then the retry's), then the live one.
            assert pool.upstreams[0].failures == 4
            assert pool.upstreams[1].failures == 0


def test_a_client_that_goes_away_mid_stream_cuts_the_upstream_stream_and_frees_its_slot(settings):
    """The client hangs up after the first word: the gateway closes its stream from vLLM (which aborts the
    generation there), records the answer so far as aborted, and the key's only concurrency slot is free again."""
    fake = FakeVLLM()
    fake.token_delay_s = 0.3
    with served(fake.app) as upstream_url:
        app = create_app(settings.model_copy(update={"vllm_urls": [upstream_url], "max_concurrent_per_key": 1}))
        with served(app) as gateway_url, httpx.Client(base_url=gateway_url, timeout=10) as client:
            wait_until(lambda: client.get("/ready").status_code == 200)
            body = {"model": "llava-rlhf", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
            with client.stream("POST", "/v1/chat/completions", headers=auth(ALICE), json=body) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
            started_cut = time.monotonic()
            wait_until(lambda: fake.streams_cut == [first["id"]])
            assert time.monotonic() - started_cut < 1.0  # at the next token, not at the end of the answer
            record = wait_until(lambda: app.state.store.get_generation(first["id"]))
            assert record.finish_reason == "abort"
            assert record.response == ""  # the role chunk only: no word had arrived
            fake.token_delay_s = 0.0
            again = client.post("/v1/chat/completions", headers=auth(ALICE), json={**body, "stream": False})
            assert again.status_code == 200, again.text  # the slot was released


def test_the_upstream_client_keeps_no_cookies_between_requests():
    """A Set-Cookie from one upstream answer must not ride along on the next request, which may be another user's."""
    seen_cookie_headers = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen_cookie_headers.append(request.headers.get("cookie"))
        return httpx.Response(200, json={}, headers={"set-cookie": "session=alice; Path=/"})

    async def two_requests():
        async with upstream_client(5.0, httpx.MockTransport(upstream)) as client:
            await client.post("http://vllm/v1/chat/completions", json={})
            await client.post("http://vllm/v1/chat/completions", json={})
            return dict(client.cookies)

    assert asyncio.run(two_requests()) == {}
    assert seen_cookie_headers == [None, None]
