"""The gateway app factory: `create_app(settings)` builds the FastAPI app; its lifespan owns every resource.

Start-up opens the store, reads the registry, starts the record writer, the registry watcher, the vLLM health
checks and (embedded mode) vLLM itself; `/health` answers at once, `/ready` and chat requests wait for vLLM.
Shutdown drains the record queue, then stops vLLM. Nothing is built at import time.

On a Redis store the gateway is one of several replicas: the per-key rate and concurrency limits are kept in Redis
(`serve.shared_limits`), and feedback waits a little for a generation record another replica may still be writing.
On SQLite (one gateway) both stay in the process.

Every error leaves in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: validation errors as 400,
bodies over the size limit as 413, unknown routes as 404, and unexpected failures as a 500 that names no internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from online_rl.schema import BASE_VERSION_NAME, adapter_name
from online_rl.store import open_store
from online_rl.store.redis import RedisStore
from serve.admin import AdminService
from serve.auth import Authenticator, ConcurrencyLimiter, RateLimiter
from serve.feedback import FeedbackService
from serve.images import ImageResolver
from serve.metrics import GatewayMetrics
from serve.protocol import APIError
from serve.recorder import RecordWriter
from serve.responses import ResponsesService
from serve.routes import api
from serve.routing import AliasTable, RegistrySnapshot, RegistryWatcher
from serve.serving import ChatService
from serve.settings import GatewaySettings
from serve.shared_limits import SharedConcurrencyLimiter, SharedRateLimiter
from serve.staging import StagingService
from serve.upstream import EmbeddedEngine, UpstreamPool, upstream_client
from serve.vllm_process import VLLMServerConfig

logger = logging.getLogger(__name__)


def vllm_config(settings: GatewaySettings) -> VLLMServerConfig:
    return VLLMServerConfig(
        model=settings.model,
        served_model_name=settings.base_model_name,
        host=settings.vllm_host,
        port=settings.vllm_port,
        adapter_dir=str(settings.adapter_dir),
        max_model_len=settings.vllm_max_model_len,
        max_lora_rank=settings.vllm_max_lora_rank,
        max_loras=settings.vllm_max_loras,
        dtype=settings.vllm_dtype,
        enforce_eager=settings.vllm_enforce_eager,
        cpu_kv_cache_gib=settings.vllm_cpu_kv_cache_gib,
        engine_cpus=settings.vllm_cpus,
        extra_args=tuple(settings.vllm_extra_args),
    )


def create_app(
    settings: GatewaySettings,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
    image_transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """The gateway. Tests may replace the HTTP transports to vLLM and to image hosts with in-process fakes."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state = app.state
        logger.info("gateway starting %s", " ".join(f"{k}={v}" for k, v in settings.redacted().items()))
        store = open_store(settings.store_url)
        upstream = upstream_client(settings.upstream_timeout_s, upstream_transport)
        image_client = httpx.AsyncClient(transport=image_transport, trust_env=False)
        metrics = GatewayMetrics()
        urls = settings.vllm_urls or [f"http://{settings.vllm_host}:{settings.vllm_port}"]
        pool = UpstreamPool(urls, upstream, settings.base_model_name)
        table = AliasTable(settings.public_alias, settings.base_model_name)
        watcher = RegistryWatcher(
            store,
            table,
            settings.alias_poll_interval_s,
            on_change=lambda old, new, initial: _on_registry_change(metrics, settings.public_alias, old, new, initial),
        )
        await watcher.refresh(force=True)
        recorder = RecordWriter(store, metrics, max_pending=settings.max_pending_records)
        salt = settings.user_id_salt.get_secret_value()
        state.settings, state.store, state.metrics, state.pool, state.table = settings, store, metrics, pool, table
        state.auth = Authenticator(settings)
        shared = isinstance(store, RedisStore)
        limits_pool = store.async_connection_pool() if shared else None
        if shared:
            state.rate_limiter = SharedRateLimiter(limits_pool, store.prefix, settings.rate_limit_per_minute)
            state.concurrency = SharedConcurrencyLimiter(
                limits_pool, store.prefix, settings.max_concurrent_per_key, settings.concurrency_lease_s
            )
        else:
            state.rate_limiter = RateLimiter(settings.rate_limit_per_minute)
            state.concurrency = ConcurrencyLimiter(settings.max_concurrent_per_key)
        images = ImageResolver(
            image_client,
            settings.image_url_allowlist,
            settings.max_image_bytes,
            settings.max_image_pixels,
            settings.image_fetch_timeout_s,
        )
        state.chat = ChatService(
            table,
            watcher,
            pool,
            images,
            recorder,
            metrics,
            salt,
            settings.max_tokens_cap,
            settings.default_max_tokens,
            settings.max_images_per_request,
            settings.upstream_timeout_s,
        )
        state.responses = ResponsesService(state.chat, store)
        state.feedback = FeedbackService(
            store, recorder, metrics, salt, other_replicas_wait_s=settings.feedback_wait_s if shared else 0.0
        )
        state.staging = StagingService(pool, settings.base_model_name, timeout_s=settings.staging_timeout_s)
        state.admin = AdminService(store, watcher, settings.public_alias, state.staging, metrics)
        engine = None
        if settings.embedded and upstream_transport is None:
            engine = EmbeddedEngine(
                vllm_config(settings),
                pool,
                log_path=settings.vllm_log,
                startup_timeout_s=settings.vllm_startup_timeout_s,
            )
        state.engine = engine
        tasks = [
            asyncio.create_task(recorder.run(), name="record-writer"),
            asyncio.create_task(watcher.run(), name="registry-watcher"),
            asyncio.create_task(_health_loop(pool, metrics, settings.health_interval_s), name="health-checks"),
            asyncio.create_task(_retention_loop(store, settings.retention_purge_interval_s), name="retention"),
        ]
        if engine is not None:
            tasks.append(asyncio.create_task(engine.run(), name="vllm-engine"))
        if shared:
            tasks.append(asyncio.create_task(state.concurrency.renew_forever(), name="concurrency-leases"))
        try:
            yield
        finally:
            for task in tasks:
                if task.get_name() != "record-writer":
                    task.cancel()
            await recorder.drain()
            tasks[0].cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if engine is not None:
                await asyncio.to_thread(engine.stop)
            await upstream.aclose()
            await image_client.aclose()
            if shared:
                await state.concurrency.aclose()
                await limits_pool.aclose()
            store.close()
            logger.info("gateway stopped")

    app = FastAPI(
        title="alignloop gateway",
        summary="OpenAI-compatible chat with versioned LoRA adapters, feedback and hot-swap.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.include_router(api)
    _add_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app


def reserve_api_paths(app: FastAPI) -> None:
    """Answers every unknown `/v1/...` path with OpenAI's 404 shape, so a page mounted at `/` (the demo) never
    answers an API path. Register it after every API route."""

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def unknown_api_route(path: str):
        raise APIError(404, f"Not found: /v1/{path}", code="not_found")


def _on_registry_change(
    metrics: GatewayMetrics, public_alias: str, old: RegistrySnapshot, new: RegistrySnapshot, initial: bool
) -> None:
    metrics.registry_revision.set(new.revision)
    for alias, version in new.promoted.items():
        metrics.current_version.labels(alias=alias).set(version or 0)
        metrics.serve_alias(alias, BASE_VERSION_NAME if version is None else adapter_name(version))
        if old.promoted.get(alias) != version and not initial:
            metrics.swaps.labels(alias=alias, action="move").inc()
            logger.info(
                "alias moved alias=%s from=%s to=%s revision=%d", alias, old.promoted.get(alias), version, new.revision
            )
    if public_alias not in new.promoted:
        metrics.current_version.labels(alias=public_alias).set(0)
        metrics.serve_alias(public_alias, BASE_VERSION_NAME)


async def _health_loop(pool: UpstreamPool, metrics: GatewayMetrics, interval_s: float) -> None:
    while True:
        await pool.check_all()
        metrics.upstreams_healthy.set(sum(u.healthy for u in pool.upstreams))
        await asyncio.sleep(interval_s if pool.any_healthy else min(interval_s, 0.5))


async def _retention_loop(store, interval_s: float) -> None:
    while True:
        try:
            await asyncio.to_thread(store.purge_expired)
        except Exception:
            logger.exception("retention purge failed")
        await asyncio.sleep(interval_s)


def _add_error_handlers(app: FastAPI) -> None:
    def count(request: Request, status: int, code: str | None) -> None:
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.errors.labels(status=str(status), code=code or "").inc()

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        count(request, error.status, error.code)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        if first.get("type") == "json_invalid":
            failure = APIError(400, "We could not parse the JSON body of your request.", code="invalid_json")
        else:
            # A union (text or a list of parts) fails in each of its branches; the deepest error is about what
            # the client meant.
            deepest = max(error.errors(), key=lambda e: len(e.get("loc", ())))
            message = str(deepest.get("msg", "invalid request")).removeprefix("Value error, ")
            param = error_param(deepest.get("loc", ()), error.body)
            failure = APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")
        return JSONResponse(failure.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = "Not found" if error.status_code == 404 else str(error.detail)
        return JSONResponse(
            APIError(error.status_code, message).body(),
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.error("unhandled error path=%s error=%s", request.url.path, type(error).__name__, exc_info=error)
        count(request, 500, "internal_error")
        return JSONResponse(
            APIError(500, "The server had an error while processing your request.").body(), status_code=500
        )


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def error_param(loc: tuple, body) -> str | None:
    """The parameter a validation error is about, as the client sent it: pydantic's location less the parts it
    adds itself (`body`, the union branch it tried such as `str` or `list[...]`, a discriminator's tag)."""
    parts, value = [], body
    for position, part in enumerate(loc):
        if position == 0 and part in ("body", "query", "path", "header"):
            continue
        present = isinstance(value, dict) and part in value
        if present or (isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value)):
            value = value[part]
        elif isinstance(value, dict) and part == value.get("type"):
            continue  # the tag of a discriminated union
        elif isinstance(part, str) and ("[" in part or part in _TYPE_NAMES):
            continue  # the branch of a union
        else:
            value = None  # a field that is missing or unknown
        parts.append(str(part))
    return ".".join(parts) or None


class BodySizeLimit:
    """Refuses request bodies over `max_bytes` with a 413, by Content-Length or while reading a chunked body."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_large = APIError(
            413, f"The request body is over the limit of {self.max_bytes} bytes.", code="body_too_large"
        )
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse(too_large.body(), status_code=413)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise APIError(413, too_large.message, code="body_too_large")
            return message

        return await self.app(scope, limited_receive, send)
