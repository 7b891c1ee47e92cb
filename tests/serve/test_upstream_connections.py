"""Streamed answers keep the gateway's connection to vLLM open for the next request: the relay reads each upstream
response to its end, so httpx puts the connection back in its pool instead of closing it (a connection per request
cost a TCP handshake and a vLLM accept on every stream). The fake vLLM is served over real TCP here."""

from __future__ import annotations

import threading

import uvicorn
from fastapi.testclient import TestClient

from serve.app import create_app
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


def test_streamed_requests_reuse_the_upstream_connection(settings):
    port, fake = free_port(), ClientPorts(FakeVLLM().app)
    server = uvicorn.Server(uvicorn.Config(fake, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started)
        app = create_app(settings.model_copy(update={"vllm_urls": [f"http://127.0.0.1:{port}"]}))
        with TestClient(app) as client:
            wait_until(lambda: client.get("/ready").status_code == 200)
            for _ in range(6):
                body = {"model": "llava-rlhf", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
                with client.stream("POST", "/v1/chat/completions", headers=auth(ALICE), json=body) as response:
                    assert response.status_code == 200
                    assert list(response.iter_lines())[-2:] == ["data: [DONE]", ""]
    finally:
        server.should_exit = True
        thread.join(10)
    # Six streams, one after another: one connection (two when a health check's idle connection got picked up),
    # not a new one per stream.
    assert len(fake.ports) == 6 and len(set(fake.ports)) <= 2, fake.ports
