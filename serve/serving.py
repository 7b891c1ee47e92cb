"""Chat completions through vLLM: the serving logic, which knows nothing about FastAPI.

For one request `ChatService`:
1. resolves the model name to an adapter version (once, at the start: a swap never changes a request mid-way),
   checks max_tokens against the cap, and turns every image into checked bytes (`serve.images`);
2. forwards the request to a healthy vLLM server with `model` rewritten to the version's served name, images as
   data URLs, and every other field as the client sent it;
3. relays the answer, streamed or not, with `model` set to the version's public name (`llava-rlhf@v3`, `base`)
   and `system_fingerprint` to the adapter (`policy-v3`, `base`);
4. after the last byte, hands a generation record (images as sha256 references) to the record writer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator

import anyio
import httpx
import orjson

from online_rl.schema import IMAGE_REF_PREFIX, GenerationRecord, hash_user_id
from serve.auth import Caller
from serve.images import ImageResolver, ResolvedImage
from serve.metrics import GatewayMetrics
from serve.protocol import APIError, ChatCompletionRequest
from serve.recorder import RecordWriter
from serve.routing import AliasTable, RegistryWatcher, Target
from serve.upstream import CONNECT_FAILURES, Upstream, UpstreamPool

logger = logging.getLogger(__name__)
RECORDED_CLIENTS = ("api", "demo", "simulator", "eval")
# Request fields that are not sampling parameters (kept out of the record's `sampling`).
_NOT_SAMPLING = {"messages", "model", "stream", "stream_options", "user"}


@dataclasses.dataclass
class PreparedChat:
    request: ChatCompletionRequest
    caller: Caller
    target: Target
    payload: dict
    stored_messages: list[dict]
    images: list[ResolvedImage]
    client: str
    started: float

    @property
    def public_model(self) -> str:
        if self.target.version is None:
            return "base"
        alias = self.target.requested.split("@")[0]
        return f"{alias}@v{self.target.version}"

    def headers(self) -> dict[str, str]:
        headers = {"x-alignloop-adapter": self.target.label, "x-alignloop-revision": str(self.target.revision)}
        if self.images:
            headers["x-alignloop-images"] = ",".join(image.sha256 for image in self.images)
        return headers


class ChatService:
    def __init__(
        self,
        table: AliasTable,
        watcher: RegistryWatcher | None,
        pool: UpstreamPool,
        images: ImageResolver,
        recorder: RecordWriter,
        metrics: GatewayMetrics,
        user_id_salt: str,
        max_tokens_cap: int,
        default_max_tokens: int,
        max_images: int,
        timeout_s: float,
    ):
        self.table = table
        self.watcher = watcher
        self.pool = pool
        self.images = images
        self.recorder = recorder
        self.metrics = metrics
        self.user_id_salt = user_id_salt
        self.max_tokens_cap = max_tokens_cap
        self.default_max_tokens = default_max_tokens
        self.max_images = max_images
        self.timeout_s = timeout_s

    # ---- preparing a request ---------------------------------------------------------------------------------
    async def prepare(self, request: ChatCompletionRequest, caller: Caller, client: str = "api") -> PreparedChat:
        started = time.perf_counter()
        max_tokens = request.max_completion_tokens or request.max_tokens or self.default_max_tokens
        if max_tokens > self.max_tokens_cap:
            param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
            raise APIError(
                400,
                f"{param} is {max_tokens}; this server allows at most {self.max_tokens_cap}",
                param=param,
                code="max_tokens_exceeded",
            )
        target = await self._resolve(request.model)
        upstream_messages, stored_messages, images = await self._messages(request)
        payload = request.model_dump(exclude_none=True)
        payload.pop("user", None)  # an end-user id stays here (hashed into the record), never goes upstream
        payload.pop("max_completion_tokens", None)
        payload |= {"model": target.served_name, "messages": upstream_messages, "max_tokens": max_tokens}
        if request.stream:
            payload["stream_options"] = {**payload.get("stream_options", {}), "include_usage": True}
        return PreparedChat(
            request,
            caller,
            target,
            payload,
            stored_messages,
            images,
            client if client in RECORDED_CLIENTS else "api",
            started,
        )

    async def _resolve(self, model: str) -> Target:
        try:
            return self.table.resolve(model)
        except APIError:
            if self.watcher is None or "@v" not in model:
                raise
            await self.watcher.refresh(force=True)  # a version registered a moment ago
            return self.table.resolve(model)

    async def _messages(self, request: ChatCompletionRequest) -> tuple[list[dict], list[dict], list[ResolvedImage]]:
        upstream, stored, images = [], [], []
        for i, message in enumerate(request.messages):
            data = message.model_dump(exclude_none=True)
            if not isinstance(message.content, list):
                upstream.append(data)
                stored.append(data)
                continue
            upstream_parts, stored_parts = [], []
            for j, part in enumerate(message.content):
                if part.type == "text":
                    upstream_parts.append({"type": "text", "text": part.text})
                    stored_parts.append({"type": "text", "text": part.text})
                    continue
                if len(images) == self.max_images:
                    raise APIError(
                        400,
                        f"at most {self.max_images} images per request",
                        param=f"messages.{i}.content",
                        code="too_many_images",
                    )
                image = await self.images.resolve(part.image_url.url, param=f"messages.{i}.content.{j}.image_url.url")
                images.append(image)
                upstream_parts.append({"type": "image_url", "image_url": {"url": image.data_url()}})
                stored_parts.append({"type": "image_url", "image_url": {"url": IMAGE_REF_PREFIX + image.sha256}})
            upstream.append({**data, "content": upstream_parts})
            stored.append({**data, "content": stored_parts})
        return upstream, stored, images

    # ---- forwarding --------------------------------------------------------------------------------------------
    async def _send(self, prepared: PreparedChat, stream: bool) -> tuple[httpx.Response, Upstream]:
        """Sends the request to a healthy server (a second one if the first refuses the connection)."""
        last_error: Exception | None = None
        for _ in range(2):
            upstream = self.pool.pick()
            upstream.in_flight += 1
            try:
                request = self.pool.client.build_request(
                    "POST",
                    f"{upstream.base_url}/v1/chat/completions",
                    content=encode_json(prepared.payload),
                    headers=_UPSTREAM_HEADERS,
                    timeout=self.timeout_s,
                )
                response = await self.pool.client.send(request, stream=stream)
            except CONNECT_FAILURES as error:
                upstream.in_flight -= 1
                self.pool.mark_failed(upstream)
                last_error = error
                continue
            except httpx.HTTPError as error:
                upstream.in_flight -= 1
                raise APIError(
                    502, f"the model server failed: {type(error).__name__}", code="upstream_error"
                ) from error
            if response.status_code >= 400:
                upstream.in_flight -= 1
                body = await response.aread()
                await response.aclose()
                raise upstream_error(response.status_code, body)
            return response, upstream
        raise APIError(
            503,
            "The model server is not reachable; retry shortly.",
            code="engine_unavailable",
            headers={"Retry-After": "5"},
        ) from last_error

    async def complete(self, prepared: PreparedChat) -> dict:
        response, upstream = await self._send(prepared, stream=False)
        try:
            body = orjson.loads(response.content)
        finally:
            upstream.in_flight -= 1
        body["model"] = prepared.public_model
        body["system_fingerprint"] = prepared.target.label
        choice = (body.get("choices") or [{}])[0]
        usage = body.get("usage") or {}
        self._finish(
            prepared,
            body.get("id"),
            (choice.get("message") or {}).get("content") or "",
            choice.get("finish_reason"),
            usage,
            None,
            stream=False,
        )
        return body

    async def open_stream(self, prepared: PreparedChat) -> AsyncGenerator[bytes, None]:
        """Starts the upstream stream (errors before the first byte raise APIError) and returns the relay."""
        response, upstream = await self._send(prepared, stream=True)
        return self._relay(prepared, response, upstream)

    async def _relay(
        self, prepared: PreparedChat, response: httpx.Response, upstream: Upstream
    ) -> AsyncGenerator[bytes, None]:
        """vLLM's events, rewritten (`model`, `system_fingerprint`, usage as asked); what arrived in one read leaves
        in one write. The events are parsed to keep the answer's text, id and usage for the record."""
        wants_usage = bool(prepared.request.stream_options and prepared.request.stream_options.include_usage)
        response_id, text, finish_reason, usage, first_token_at = None, [], None, {}, None
        completed = False
        try:
            async for payloads in sse_data(response):
                out = []
                for data in payloads:
                    if data == b"[DONE]":
                        completed = True
                        continue  # read on to the body's end: a half-read response closes its connection to vLLM
                    try:
                        chunk = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        if out:
                            yield b"".join(out)  # the events before it in the same read still reach the client
                        raise
                    if "error" in chunk:
                        finish_reason = "error"
                        out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
                        continue
                    response_id = chunk.get("id", response_id)
                    chunk["model"] = prepared.public_model
                    chunk["system_fingerprint"] = prepared.target.label
                    for choice in chunk.get("choices") or []:
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            if first_token_at is None:
                                first_token_at = time.perf_counter()
                            text.append(content)
                        finish_reason = choice.get("finish_reason") or finish_reason
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                        if not chunk.get("choices") and not wants_usage:
                            continue  # the usage-only chunk the client did not ask for
                        if not wants_usage:
                            chunk.pop("usage")
                    out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
                if out:
                    yield b"".join(out)
            if completed:
                yield b"data: [DONE]\n\n"
        except (httpx.HTTPError, orjson.JSONDecodeError) as error:
            finish_reason = "error"
            cause = "an event that is not JSON" if isinstance(error, orjson.JSONDecodeError) else type(error).__name__
            failure = APIError(502, f"the model server failed mid-stream: {cause}", code="upstream_error")
            yield b"data: " + orjson.dumps(failure.body()) + b"\n\n"
        finally:
            upstream.in_flight -= 1
            with anyio.CancelScope(shield=True):
                await response.aclose()  # also aborts vLLM's generation if the client went away
            if not completed and finish_reason is None:
                finish_reason = "abort"
            ttft = None if first_token_at is None else first_token_at - prepared.started
            self._finish(prepared, response_id, "".join(text), finish_reason, usage, ttft, stream=True)

    # ---- after the last byte -------------------------------------------------------------------------------------
    def _finish(
        self,
        prepared: PreparedChat,
        response_id: str | None,
        text: str,
        finish_reason: str | None,
        usage: dict,
        ttft: float | None,
        stream: bool,
    ) -> None:
        latency = time.perf_counter() - prepared.started
        label = prepared.target.label
        self.metrics.requests.labels(
            status="200" if finish_reason not in ("error", "abort") else finish_reason, adapter=label
        ).inc()
        self.metrics.latency.labels(adapter=label, stream=str(stream).lower()).observe(latency)
        if ttft is not None:
            self.metrics.time_to_first_token.labels(adapter=label).observe(ttft)
        self.metrics.prompt_tokens.labels(adapter=label).inc(usage.get("prompt_tokens", 0))
        self.metrics.completion_tokens.labels(adapter=label).inc(usage.get("completion_tokens", 0))
        if response_id is None:
            return
        sampling = {k: v for k, v in prepared.payload.items() if k not in _NOT_SAMPLING}
        record = GenerationRecord(
            id=response_id,
            alias=prepared.request.model,
            adapter_version=prepared.target.version,
            messages=prepared.stored_messages,
            sampling=sampling,
            response=text,
            finish_reason=finish_reason,
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            latency_ms=round(latency * 1000, 3),
            time_to_first_token_ms=None if ttft is None else round(ttft * 1000, 3),
            user_id=hash_user_id(f"{prepared.caller.key_id}:{prepared.request.user or ''}", self.user_id_salt),
            key_id=prepared.caller.key_id,
            client=prepared.client,
        )
        self.recorder.submit(record, {image.sha256: image.data for image in prepared.images})


# The request goes up as compact JSON (orjson) and the answer is asked for uncompressed, so the relay can read raw
# bytes as they arrive (`aiter_raw`: no decoder or re-chunker per read).
_UPSTREAM_HEADERS = {"content-type": "application/json", "accept-encoding": "identity"}


def encode_json(payload: dict) -> bytes:
    """Compact JSON; orjson, or the standard library for what orjson refuses (integers over 64 bits, which a
    client may send in a passed-through field and vLLM then judges)."""
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError:
        return json.dumps(payload, separators=(",", ":")).encode()


async def sse_data(response: httpx.Response) -> AsyncIterator[list[bytes]]:
    """The `data:` fields of a server-sent-event body, grouped by the network read they completed in."""
    pending = b""
    async for received in response.aiter_raw():
        lines = (pending + received).split(b"\n")
        pending = lines.pop()
        payloads = [line[5:].strip() for line in lines if line.startswith(b"data:")]
        if payloads:
            yield payloads
    if pending.startswith(b"data:"):
        yield [pending[5:].strip()]


def upstream_error(status: int, body: bytes) -> APIError:
    """vLLM's error as an APIError in OpenAI's shape (its message kept, its status kept for 4xx)."""
    message, param = f"the model server answered HTTP {status}", None
    try:
        data = json.loads(body)
        detail = data.get("error", data) if isinstance(data, dict) else {}
        if isinstance(detail, dict):
            message = str(detail.get("message") or message)
            param = detail.get("param")
    except ValueError:
        pass
    if status >= 500:
        return APIError(502, f"the model server failed: {message}", code="upstream_error")
    return APIError(status, message, param=param if isinstance(param, str) else None, code="upstream_rejected")
