"""Chat completions (and plain-text completions) through vLLM: the serving logic, which knows nothing about FastAPI.

For one request `ChatService`:
1. resolves the model name to an adapter version (once, at the start: a swap never changes a request mid-way),
   checks max_tokens against the cap, and turns every image into checked bytes (`serve.images`);
2. forwards the request to a healthy vLLM server with `model` rewritten to the version's served name, images as
   data URLs, and every other field as the client sent it;
3. relays the answer, streamed or not, with `model` set to the version's public name (`llava-rlhf@v3`, `base`)
   and `system_fingerprint` to the adapter (`policy-v3`, `base`);
4. after the last byte, hands a generation record (images as sha256 references) to the record writer; requests
   of the service identity (the trainer's gate) are not recorded and count only in the service metrics.

With `n > 1` every choice is recorded, choice 0 under the response id and choice i as `<id>-<i>`
(`online_rl.schema.choice_record_id`), so feedback can name each one and a preference can compare two of them.
Answers are made to read strictly as OpenAI's OpenAPI document types them (`serve.conformance`).
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

from online_rl.schema import IMAGE_REF_PREFIX, GenerationRecord, choice_record_id, hash_user_id
from serve import conformance
from serve.auth import Caller
from serve.images import ImageResolver, ResolvedImage
from serve.metrics import GatewayMetrics
from serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from serve.recorder import RecordWriter
from serve.routing import AliasTable, RegistryWatcher, Target
from serve.upstream import CONNECT_FAILURES, Upstream, UpstreamPool

logger = logging.getLogger(__name__)
RECORDED_CLIENTS = ("api", "demo", "simulator", "eval")
# Request fields that are not sampling parameters (kept out of the record's `sampling`).
_NOT_SAMPLING = {"messages", "prompt", "model", "stream", "stream_options", "user", "return_token_ids"}


@dataclasses.dataclass
class Choice:
    """One choice of an answer, as the record keeps it."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None  # known per choice only when vLLM returned its token ids


@dataclasses.dataclass
class PreparedChat:
    request: ChatCompletionRequest | CompletionRequest
    caller: Caller
    target: Target
    payload: dict
    stored_messages: list[dict]
    images: list[ResolvedImage]
    client: str
    started: float
    path: str = "/v1/chat/completions"  # vLLM's endpoint: /v1/completions for a raw text prompt
    prompt: str | None = None  # a raw text prompt (then `stored_messages` is empty)
    instructions: str | None = None  # a Responses request's instructions, kept in the record's `sampling`
    token_ids_added: bool = False  # the gateway asked vLLM for token ids (n > 1) and removes them from the answer
    response_id: str | None = None  # the id the client receives, where the gateway makes it (a Responses answer)

    @property
    def n(self) -> int:
        return self.request.n or 1

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

    async def prepare_completion(self, request: CompletionRequest, caller: Caller, client: str = "api") -> PreparedChat:
        """A /v1/completions request: the same version resolution and token cap as chat, the prompt as text."""
        started = time.perf_counter()
        max_tokens = request.max_tokens or self.default_max_tokens
        if max_tokens > self.max_tokens_cap:
            raise APIError(
                400,
                f"max_tokens is {max_tokens}; this server allows at most {self.max_tokens_cap}",
                param="max_tokens",
                code="max_tokens_exceeded",
            )
        target = await self._resolve(request.model)
        payload = request.model_dump(exclude_none=True)
        payload.pop("user", None)
        payload |= {"model": target.served_name, "max_tokens": max_tokens}
        if request.stream:
            payload["stream_options"] = {**payload.get("stream_options", {}), "include_usage": True}
        return PreparedChat(
            request,
            caller,
            target,
            payload,
            [],
            [],
            client if client in RECORDED_CLIENTS else "api",
            started,
            path="/v1/completions",
            prompt=request.prompt,
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
                    f"{upstream.base_url}{prepared.path}",
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
        self._ask_choice_tokens(prepared)
        response, upstream = await self._send(prepared, stream=False)
        try:
            body = orjson.loads(response.content)
        finally:
            upstream.in_flight -= 1
        choices = [
            Choice(choice.get("index", i), choice_text(choice), choice.get("finish_reason"), token_count(choice))
            for i, choice in enumerate(body.get("choices") or [])
        ] or [Choice(0)]
        drop = conformance.TOKEN_ID_FIELDS if prepared.token_ids_added else ()
        if prepared.prompt is not None:
            body = conformance.text_completion(body, drop)
        else:
            body = conformance.chat_completion(body, drop)
        body["model"] = prepared.public_model
        body["system_fingerprint"] = prepared.target.label
        usage = body.get("usage") or {}
        response_id = prepared.response_id or body.get("id")
        self._finish(prepared, response_id, choices, choices[0].finish_reason, usage, None, stream=False)
        return body

    async def open_stream(self, prepared: PreparedChat) -> AsyncGenerator[bytes, None]:
        """Starts the upstream stream (errors before the first byte raise APIError) and returns the relay."""
        self._ask_choice_tokens(prepared)
        response, upstream = await self._send(prepared, stream=True)
        return self._relay(prepared, response, upstream)

    @staticmethod
    def _ask_choice_tokens(prepared: PreparedChat) -> None:
        """With n > 1, vLLM reports only the total of completion tokens; asked for the token ids, it gives each
        choice's, and each choice's record gets its own count (the ids are removed from the answer again)."""
        if prepared.n > 1 and "return_token_ids" not in prepared.payload:
            prepared.payload["return_token_ids"] = True
            prepared.token_ids_added = True

    async def _relay(
        self, prepared: PreparedChat, response: httpx.Response, upstream: Upstream
    ) -> AsyncGenerator[bytes, None]:
        """vLLM's events, rewritten (`model`, `system_fingerprint`, usage as asked, nulls as OpenAI's document
        types them); what arrived in one read leaves in one write. The events are parsed to keep each choice's
        text, the id and the usage for the records."""
        wants_usage = bool(prepared.request.stream_options and prepared.request.stream_options.include_usage)
        conform = conformance.text_completion if prepared.prompt is not None else conformance.chat_chunk
        drop = conformance.TOKEN_ID_FIELDS if prepared.token_ids_added else ()
        choices = {index: Choice(index) for index in range(prepared.n)}
        texts: dict[int, list[str]] = {index: [] for index in choices}
        response_id, usage, first_token_at = None, {}, None
        completed = failed = False
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
                        failed = True
                        out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
                        continue
                    response_id = chunk.get("id", response_id)
                    for choice in chunk.get("choices") or []:
                        index = choice.get("index", 0)
                        seen = choices.setdefault(index, Choice(index))
                        content = choice_text(choice)
                        if content:
                            if first_token_at is None:
                                first_token_at = time.perf_counter()
                            texts.setdefault(index, []).append(content)
                        seen.finish_reason = choice.get("finish_reason") or seen.finish_reason
                        tokens = token_count(choice)
                        if tokens is not None:
                            seen.completion_tokens = (seen.completion_tokens or 0) + tokens
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                        if not chunk.get("choices") and not wants_usage:
                            continue  # the usage-only chunk the client did not ask for
                        if not wants_usage:
                            chunk.pop("usage")
                    chunk = conform(chunk, drop)
                    chunk["model"] = prepared.public_model
                    chunk["system_fingerprint"] = prepared.target.label
                    out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
                if out:
                    yield b"".join(out)
            if completed:
                yield b"data: [DONE]\n\n"
        except (httpx.HTTPError, orjson.JSONDecodeError) as error:
            failed = True
            cause = "an event that is not JSON" if isinstance(error, orjson.JSONDecodeError) else type(error).__name__
            failure = APIError(502, f"the model server failed mid-stream: {cause}", code="upstream_error")
            yield b"data: " + orjson.dumps(failure.body()) + b"\n\n"
        finally:
            upstream.in_flight -= 1
            with anyio.CancelScope(shield=True):
                await response.aclose()  # also aborts vLLM's generation if the client went away
            ordered = [choices[index] for index in sorted(choices)]
            for choice in ordered:
                choice.text = "".join(texts.get(choice.index, ()))
            if failed:
                finish_reason = "error"
            elif not completed and not all(choice.finish_reason for choice in ordered):
                finish_reason = "abort"
            else:
                finish_reason = ordered[0].finish_reason
            ttft = None if first_token_at is None else first_token_at - prepared.started
            self._finish(prepared, response_id, ordered, finish_reason, usage, ttft, stream=True)

    # ---- after the last byte -------------------------------------------------------------------------------------
    def _finish(
        self,
        prepared: PreparedChat,
        response_id: str | None,
        choices: list[Choice],
        finish_reason: str | None,
        usage: dict,
        ttft: float | None,
        stream: bool,
    ) -> None:
        """Metrics once per request, and one generation record per choice. `finish_reason` is how the request
        ended: "error", "abort", or choice 0's own finish reason."""
        latency = time.perf_counter() - prepared.started
        label = prepared.target.label
        status = "200" if finish_reason not in ("error", "abort") else finish_reason
        if prepared.caller.is_service:  # the gate's evaluation: neither a user's generation nor user metrics
            self.metrics.service_requests.labels(status=status, adapter=label).inc()
            return
        self.metrics.requests.labels(status=status, adapter=label).inc()
        self.metrics.latency.labels(adapter=label, stream=str(stream).lower()).observe(latency)
        if ttft is not None:
            self.metrics.time_to_first_token.labels(adapter=label).observe(ttft)
        self.metrics.prompt_tokens.labels(adapter=label).inc(usage.get("prompt_tokens", 0))
        self.metrics.completion_tokens.labels(adapter=label).inc(usage.get("completion_tokens", 0))
        if response_id is None:
            return
        sampling = {k: v for k, v in prepared.payload.items() if k not in _NOT_SAMPLING}
        if prepared.instructions is not None:
            sampling["instructions"] = prepared.instructions
        user_id = hash_user_id(f"{prepared.caller.key_id}:{prepared.request.user or ''}", self.user_id_salt)
        images = {image.sha256: image.data for image in prepared.images}
        for choice in choices:
            record = GenerationRecord(
                id=choice_record_id(response_id, choice.index),
                alias=prepared.request.model,
                adapter_version=prepared.target.version,
                messages=prepared.stored_messages,
                prompt=prepared.prompt,
                sampling=sampling,
                response=choice.text,
                finish_reason=choice.finish_reason or finish_reason,
                prompt_tokens=usage.get("prompt_tokens", 0),
                completion_tokens=(
                    usage.get("completion_tokens", 0) if choice.completion_tokens is None else choice.completion_tokens
                ),
                latency_ms=round(latency * 1000, 3),
                time_to_first_token_ms=None if ttft is None else round(ttft * 1000, 3),
                user_id=user_id,
                key_id=prepared.caller.key_id,
                client=prepared.client,
            )
            self.recorder.submit(record, images)


# The request goes up as compact JSON (orjson) and the answer is asked for uncompressed, so the relay can read raw
# bytes as they arrive (`aiter_raw`: no decoder or re-chunker per read).
_UPSTREAM_HEADERS = {"content-type": "application/json", "accept-encoding": "identity"}


def choice_text(choice: dict) -> str:
    """The text of a choice, an answer's or a chunk's, of a chat or a plain-text completion."""
    if "text" in choice:
        return choice["text"] or ""
    return (choice.get("message") or choice.get("delta") or {}).get("content") or ""


def token_count(choice: dict) -> int | None:
    tokens = choice.get("token_ids")
    return len(tokens) if isinstance(tokens, list) else None


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
