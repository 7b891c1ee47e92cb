"""OpenAI's Responses API (`POST /v1/responses`), served by translating each request into a chat completion.

A Responses request becomes chat messages: `instructions` a system message first, then the conversation named by
`previous_response_id` (rebuilt from its generation record, images from the store), then `input` (`input_text` and
`input_image` parts become `text` and `image_url` parts). From there it takes the chat path (`ChatService`): the
same alias and version resolution, token cap, image checks (`serve.images`), upstream choice, metrics and record.
The answer comes back as a Response object, or streamed as the Responses API's events (`response.created`,
`response.in_progress`, `response.output_item.added`, `response.content_part.added`, `response.output_text.delta`
..., `response.output_text.done`, `response.content_part.done`, `response.output_item.done`, then
`response.completed`, or `response.incomplete` when `max_output_tokens` cut the answer, or `response.failed`).

Why not pass the request to vLLM's own /v1/responses (vLLM 0.32 serves it on CPU, text and images)?
- `previous_response_id` there resolves only from vLLM's in-memory store (off unless VLLM_ENABLE_RESPONSES_API_STORE
  is set, never freed, lost on restart, one per vLLM server); here it resolves from the generation records, which
  every gateway replica shares and which outlive any vLLM process;
- its answers do not read strictly as OpenAI's document types them (`logprobs: null` in output text, `text: null`,
  `usage: null` in the first events, extras such as `kv_transfer_params: null`), so every event would be rewritten;
- translated, a Responses answer is recorded with chat messages like any chat answer: the same prompt asked through
  either API has the same prompt hash, so thumbs and preferences pair them for the trainer.

The record id is the response id the client receives (`resp_...`), so feedback and preferences name it directly.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import re
import time
import uuid
from collections.abc import AsyncGenerator

import anyio
import httpx
import orjson
from pydantic import ValidationError

from online_rl.schema import IMAGE_REF_PREFIX, GenerationRecord
from online_rl.store import FeedbackStore
from serve.auth import Caller
from serve.protocol import APIError, ChatCompletionRequest, InputMessage, ResponsesRequest
from serve.serving import ChatService, Choice, PreparedChat, choice_text, sse_data
from serve.upstream import Upstream

# Chat fields the translation sets itself: a Responses request's extra fields with these names are not forwarded.
_CHAT_OWNED = frozenset(
    {
        "messages",
        "model",
        "n",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "user",
        "tools",
        "tool_choice",
        "response_format",
        "logprobs",
        "top_logprobs",
        "return_token_ids",
    }
)
_MESSAGE_PARAM = re.compile(r"^messages\.(\d+)(.*)$")


@dataclasses.dataclass
class PreparedResponse:
    request: ResponsesRequest
    chat: PreparedChat
    response_id: str
    message_id: str
    created_at: int

    def headers(self) -> dict[str, str]:
        return self.chat.headers()


class ResponsesService:
    def __init__(self, chat: ChatService, store: FeedbackStore):
        self.chat = chat
        self.store = store

    # ---- the request, as a chat completion ------------------------------------------------------------------------
    async def prepare(self, request: ResponsesRequest, caller: Caller, client: str = "api") -> PreparedResponse:
        messages: list[dict] = []
        origins: list[str] = []  # for each chat message, the Responses parameter it came from (for error params)
        if request.instructions is not None:
            messages.append({"role": "system", "content": request.instructions})
            origins.append("instructions")
        if request.previous_response_id is not None:
            history = await self._history(caller, request.previous_response_id)
            messages += history
            origins += ["previous_response_id"] * len(history)
        if isinstance(request.input, str):
            messages.append({"role": "user", "content": request.input})
            origins.append("input")
        else:
            for index, item in enumerate(request.input):
                messages.append(chat_message(item))
                origins.append(f"input.{index}")
        extra = {k: v for k, v in (request.model_extra or {}).items() if k not in _CHAT_OWNED}
        fields = {
            "model": request.model,
            "messages": messages,
            "max_completion_tokens": request.max_output_tokens,
            "stream": bool(request.stream),
            "temperature": request.temperature,
            "top_p": request.top_p,
            "user": request.user or request.safety_identifier,
        }
        try:
            chat_request = ChatCompletionRequest.model_validate(
                {**extra, **{k: v for k, v in fields.items() if v is not None}}
            )
        except ValidationError as error:
            first = error.errors()[0]
            param = ".".join(str(part) for part in first["loc"]) or None
            message = str(first["msg"]).removeprefix("Value error, ")
            invalid = APIError(400, message, param=param, code="invalid_value")
            raise renamed(invalid, origins) from None
        try:
            prepared = await self.chat.prepare(chat_request, caller, client)
        except APIError as error:
            raise renamed(error, origins) from None
        response_id = f"resp_{uuid.uuid4().hex}"
        prepared.instructions = request.instructions
        prepared.response_id = response_id
        return PreparedResponse(request, prepared, response_id, f"msg_{uuid.uuid4().hex}", int(time.time()))

    async def _history(self, caller: Caller, previous_id: str) -> list[dict]:
        """The conversation of an earlier answer of this key, its answer last, its images as data URLs again.
        That answer's own instructions are not carried over (as in OpenAI's API)."""
        await self.chat.recorder.wait_written(previous_id)
        record = await anyio.to_thread.run_sync(self.store.get_generation, previous_id)
        if record is None or record.prompt is not None or not (caller.is_admin or record.key_id == caller.key_id):
            raise APIError(
                404,
                f"No response with id '{previous_id}' was made with this API key.",
                param="previous_response_id",
                code="response_not_found",
            )
        messages = await anyio.to_thread.run_sync(self._with_images, record)
        if record.sampling.get("instructions") is not None and messages and messages[0].get("role") == "system":
            messages = messages[1:]
        return [*messages, {"role": "assistant", "content": record.response}]

    def _with_images(self, record: GenerationRecord) -> list[dict]:
        messages = []
        for message in record.messages:
            content = message.get("content")
            if not isinstance(content, list):
                messages.append(dict(message))
                continue
            parts = []
            for part in content:
                url = (part.get("image_url") or {}).get("url", "") if part.get("type") == "image_url" else ""
                if url.startswith(IMAGE_REF_PREFIX):
                    sha256 = url[len(IMAGE_REF_PREFIX) :]
                    data, info = self.store.get_image(sha256), self.store.image_info(sha256)
                    if data is None or info is None:
                        raise APIError(
                            404,
                            f"The image of response '{record.id}' is no longer stored; send the conversation again.",
                            param="previous_response_id",
                            code="image_not_found",
                        )
                    parts.append({"type": "image_url", "image_url": {"url": data_url(info.mime_type, data)}})
                    continue
                parts.append(part)
            messages.append({**message, "content": parts})
        return messages

    # ---- the answer ------------------------------------------------------------------------------------------------
    async def create(self, prepared: PreparedResponse) -> dict:
        body = await self.chat.complete(prepared.chat)
        choice = (body.get("choices") or [{}])[0]
        return self.response_object(
            prepared,
            status_of(choice.get("finish_reason")),
            choice_text(choice),
            usage_object(body.get("usage") or {}),
        )

    async def open_stream(self, prepared: PreparedResponse) -> AsyncGenerator[bytes, None]:
        """Starts the upstream stream (errors before the first byte raise APIError) and returns the relay."""
        response, upstream = await self.chat._send(prepared.chat, stream=True)
        return self._relay(prepared, response, upstream)

    async def _relay(
        self, prepared: PreparedResponse, response: httpx.Response, upstream: Upstream
    ) -> AsyncGenerator[bytes, None]:
        """vLLM's chat chunks as the Responses API's events; the record is written as for a streamed chat."""
        sequence = itertools.count()

        def event(kind: str, **fields) -> bytes:
            data = {"type": kind, "sequence_number": next(sequence), **fields}
            return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

        item_id = prepared.message_id
        at = {"item_id": item_id, "output_index": 0, "content_index": 0}
        parts: list[str] = []
        usage, finish_reason, failure, first_token_at, completed = {}, None, None, None, False
        try:
            yield b"".join(
                (
                    event("response.created", response=self.response_object(prepared, "in_progress")),
                    event("response.in_progress", response=self.response_object(prepared, "in_progress")),
                    event("response.output_item.added", output_index=0, item=message_item(item_id, "in_progress")),
                    event("response.content_part.added", **at, part=output_text("")),
                )
            )
            async for payloads in sse_data(response):
                out = []
                for data in payloads:
                    if data == b"[DONE]":
                        completed = True
                        continue
                    try:
                        chunk = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        if out:
                            yield b"".join(out)  # the events before it in the same read still reach the client
                        raise
                    if "error" in chunk:
                        detail = chunk["error"] if isinstance(chunk["error"], dict) else {}
                        failure = f"the model server failed mid-stream: {detail.get('message', 'unknown error')}"
                        continue
                    for choice in chunk.get("choices") or []:
                        content = choice_text(choice)
                        if content:
                            if first_token_at is None:
                                first_token_at = time.perf_counter()
                            parts.append(content)
                            out.append(event("response.output_text.delta", **at, delta=content, logprobs=[]))
                        finish_reason = choice.get("finish_reason") or finish_reason
                    usage = chunk.get("usage") or usage
                if out:
                    yield b"".join(out)
            if failure is None and not completed:
                failure = "the model server ended the stream before the answer was complete"
        except (httpx.HTTPError, orjson.JSONDecodeError) as error:
            cause = "an event that is not JSON" if isinstance(error, orjson.JSONDecodeError) else type(error).__name__
            failure = f"the model server failed mid-stream: {cause}"
        else:
            text = "".join(parts)
            if failure is None:
                status = status_of(finish_reason)
                item = message_item(item_id, "completed" if status == "completed" else "incomplete", text)
                final = self.response_object(prepared, status, text, usage_object(usage))
                yield b"".join(
                    (
                        event("response.output_text.done", **at, text=text, logprobs=[]),
                        event("response.content_part.done", **at, part=output_text(text)),
                        event("response.output_item.done", output_index=0, item=item),
                        event(f"response.{status}", response=final),
                    )
                )
        finally:
            upstream.in_flight -= 1
            with anyio.CancelScope(shield=True):
                await response.aclose()  # also aborts vLLM's generation if the client went away
            if failure is not None:
                outcome = "error"
            elif completed or finish_reason is not None:
                outcome = finish_reason
            else:
                outcome = "abort"
            ttft = None if first_token_at is None else first_token_at - prepared.chat.started
            choices = [Choice(0, "".join(parts), finish_reason)]
            self.chat._finish(prepared.chat, prepared.response_id, choices, outcome, usage, ttft, stream=True)
        if failure is not None:
            failed = self.response_object(prepared, "failed", "".join(parts), error=failure)
            yield event("response.failed", response=failed)

    def response_object(
        self,
        prepared: PreparedResponse,
        status: str,
        text: str | None = None,
        usage: dict | None = None,
        error: str | None = None,
    ) -> dict:
        """The Response object, in the order of OpenAI's API reference. `text` None: no output yet."""
        request = prepared.request
        output = []
        if text is not None:
            item_status = {"completed": "completed", "in_progress": "in_progress"}.get(status, "incomplete")
            output.append(message_item(prepared.message_id, item_status, text))
        body = {
            "id": prepared.response_id,
            "object": "response",
            "created_at": prepared.created_at,
            "status": status,
            "background": False,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": {"code": "server_error", "message": error} if error else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "max_tool_calls": None,
            "model": prepared.chat.public_model,
            "output": output,
            "parallel_tool_calls": request.parallel_tool_calls if request.parallel_tool_calls is not None else True,
            "previous_response_id": request.previous_response_id,
            "reasoning": None,
            "safety_identifier": request.safety_identifier,
            "service_tier": "default",
            "temperature": request.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": request.tool_choice or "auto",
            "tools": [],
            "top_logprobs": 0,
            "top_p": request.top_p,
            "truncation": request.truncation or "disabled",
        }
        if usage is not None:
            body["usage"] = usage
        if request.user is not None:
            body["user"] = request.user
        body["metadata"] = request.metadata or {}
        return body


def chat_message(item: InputMessage) -> dict:
    """One `input` message as a chat message: input_text/output_text -> text, input_image -> image_url."""
    if isinstance(item.content, str):
        return {"role": item.role, "content": item.content}
    parts = []
    for part in item.content:
        if part.type == "input_image":
            parts.append({"type": "image_url", "image_url": {"url": part.image_url}})
        else:
            parts.append({"type": "text", "text": part.text})
    if item.role == "assistant":  # an earlier answer replayed: its text, as chat keeps assistant turns
        return {"role": "assistant", "content": "".join(part["text"] for part in parts)}
    return {"role": item.role, "content": parts}


def renamed(error: APIError, origins: list[str]) -> APIError:
    """An error of the translated chat request, naming the Responses parameter it came from."""
    message, param = error.message, error.param
    if param in ("max_completion_tokens", "max_tokens"):
        message, param = message.replace(param, "max_output_tokens"), "max_output_tokens"
    match = _MESSAGE_PARAM.match(param or "")
    if match and int(match.group(1)) < len(origins):
        origin, rest = origins[int(match.group(1))], match.group(2)
        param = origin if origin in ("instructions", "previous_response_id", "input") else origin + rest
        param = param.removesuffix(".url")  # input_image carries image_url as a string
    return APIError(error.status, message, param=param, code=error.code, headers=error.headers)


def status_of(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def message_item(item_id: str, status: str, text: str | None = None) -> dict:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "content": [] if text is None else [output_text(text)],
        "role": "assistant",
    }


def output_text(text: str) -> dict:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def usage_object(usage: dict) -> dict:
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.get("total_tokens", prompt + completion),
    }


def data_url(mime_type: str, data: bytes) -> str:
    return f"data:{mime_type};base64," + base64.b64encode(data).decode("ascii")
