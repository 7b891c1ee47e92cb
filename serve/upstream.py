"""The vLLM servers behind the gateway: health-checked, picked per request, and (embedded mode) supervised.

`UpstreamPool` holds one or more vLLM OpenAI servers. A background loop checks each one's /health and whether it
has loaded the base model (/v1/models); requests go to the healthy server with the fewest requests in flight.
With none healthy, requests get a 503 at once instead of waiting.

`upstream_client` is the HTTP client to those servers: httpx's API over aiohttp's transport (httpx-aiohttp, as the
`openai` SDK offers it). A streamed answer reaches the gateway one token per read, and aiohttp parses each read in C
where httpcore and h11 parse it in Python (bench/README.md has the measured difference).

The client keeps no cookies: vLLM sets none, and a jar shared by every user's requests would carry one user's
cookie into the next user's request if an upstream ever did.

`EmbeddedEngine` (the default mode) starts vLLM as a child process on the bundled model, with LoRA and the
filesystem resolver pointed at the adapter directory, and restarts it if it dies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging

import anyio
import httpx
from httpx_aiohttp import AiohttpTransport

from serve.protocol import APIError
from serve.vllm_process import VLLMServer, VLLMServerConfig

logger = logging.getLogger(__name__)
# What "the server could not be reached" raises: httpx's own transport says ConnectError; the aiohttp transport
# maps a refused connection to ConnectTimeout. Either way the request never started, so another server may take it.
CONNECT_FAILURES = (httpx.ConnectError, httpx.ConnectTimeout)


class _NoCookies(httpx.Cookies):
    """An always-empty jar: `Set-Cookie` in a response is ignored."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def set(self, name: str, value: str, domain: str = "", path: str = "/") -> None:
        raise TypeError("the upstream client keeps no cookies")


class UpstreamClient(httpx.AsyncClient):
    """httpx's client without a cookie jar (see the module's docstring)."""

    _no_cookies = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies) -> None:
        raise TypeError("the upstream client keeps no cookies")


def upstream_client(timeout_s: float, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """The client for vLLM requests and health checks; tests pass an in-process `transport` instead of aiohttp."""
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    return UpstreamClient(
        transport=transport or AiohttpTransport(limits=limits, trust_env=False),
        timeout=httpx.Timeout(timeout_s, connect=5.0),
        limits=limits,
        trust_env=False,
    )


@dataclasses.dataclass
class Upstream:
    base_url: str
    healthy: bool = False
    in_flight: int = 0
    failures: int = 0


class UpstreamPool:
    def __init__(self, urls: list[str], client: httpx.AsyncClient, base_model_name: str):
        self.upstreams = [Upstream(url.rstrip("/")) for url in urls]
        self.client = client
        self.base_model_name = base_model_name
        self._ties = itertools.count()

    @property
    def any_healthy(self) -> bool:
        return any(u.healthy for u in self.upstreams)

    def pick(self) -> Upstream:
        healthy = [u for u in self.upstreams if u.healthy]
        if not healthy:
            raise APIError(
                503,
                "The model server is not ready; retry shortly.",
                code="engine_unavailable",
                headers={"Retry-After": "5"},
            )
        start = next(self._ties) % len(healthy)
        rotated = healthy[start:] + healthy[:start]
        return min(rotated, key=lambda u: u.in_flight)

    def mark_failed(self, upstream: Upstream) -> None:
        """A connection error on a request: take the server out until the next health check passes."""
        upstream.healthy = False
        upstream.failures += 1

    async def check(self, upstream: Upstream) -> bool:
        try:
            health = await self.client.get(f"{upstream.base_url}/health", timeout=5.0)
            if health.status_code != 200:
                return False
            models = await self.client.get(f"{upstream.base_url}/v1/models", timeout=5.0)
            return models.status_code == 200 and any(
                m.get("id") == self.base_model_name for m in models.json().get("data", [])
            )
        except (httpx.HTTPError, ValueError):
            return False

    async def check_all(self) -> None:
        results = await asyncio.gather(*(self.check(u) for u in self.upstreams))
        for upstream, healthy in zip(self.upstreams, results, strict=True):
            if healthy != upstream.healthy:
                logger.info("upstream %s %s", upstream.base_url, "healthy" if healthy else "unhealthy")
            upstream.healthy = healthy


class EmbeddedEngine:
    """Runs vLLM as a child process and keeps it running: on exit it is restarted, and the pool answers 503."""

    def __init__(self, config: VLLMServerConfig, pool: UpstreamPool, log_path=None, startup_timeout_s: float = 600.0):
        self.server = VLLMServer(config, log_path=log_path)
        self.pool = pool
        self.startup_timeout_s = startup_timeout_s
        self.restarts = 0

    async def run(self) -> None:
        backoff = 1.0
        while True:
            await anyio.to_thread.run_sync(self.server.start)
            try:
                await anyio.to_thread.run_sync(self.server.wait_ready, self.startup_timeout_s)
                await self.pool.check_all()
                backoff = 1.0
                while self.server.process is not None and self.server.process.poll() is None:
                    await asyncio.sleep(0.5)
                code = self.server.process.returncode if self.server.process else None
                logger.error("vLLM exited with code %s; restarting", code)
            except (RuntimeError, TimeoutError) as error:
                logger.error("vLLM failed to start: %s; retrying in %.0f s", error, backoff)
                await anyio.to_thread.run_sync(self.server.stop)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
            for upstream in self.pool.upstreams:
                upstream.healthy = False
            self.restarts += 1

    def stop(self) -> None:
        self.server.stop()
