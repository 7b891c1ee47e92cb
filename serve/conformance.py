"""vLLM's answers in the shape OpenAI's OpenAPI document gives them, read strictly: no `null` where the document
types an object or an array.

vLLM 0.32 writes `null` for every optional field it has no value for: a message's `annotations`, `function_call`
and `reasoning`, `usage.prompt_tokens_details` and `usage.completion_tokens_details`, a streamed choice's
`logprobs`, and its own extras (`token_ids`, `stop_reason`, `kv_transfer_params`, ...). A client that decodes
strictly against the document (a generated Go or Rust client, a schema validator) refuses those. The gateway drops
them, fills what the document requires, and keeps the nulls OpenAI itself sends, where the document requires a field
and lets it be null: a message's `content` and `refusal`, a choice's `logprobs` (unstreamed), `finish_reason` on a
chunk that does not end its choice, a log probability's `bytes`.

`tests/serve/test_openapi_conformance.py` checks every body and event against the document itself.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

# The nulls that stay, by object kind: fields OpenAI's document requires and allows to be null.
CHAT_COMPLETION_NULLS = frozenset({"content", "refusal", "logprobs", "finish_reason", "bytes"})
CHAT_CHUNK_NULLS = frozenset({"content", "refusal", "finish_reason", "bytes"})
TEXT_COMPLETION_NULLS = frozenset({"logprobs", "finish_reason"})
# What vLLM adds when the gateway itself asked it for token ids (to count each choice's tokens).
TOKEN_ID_FIELDS = frozenset({"token_ids", "prompt_token_ids"})


def without_nulls(value: Any, keep: Collection[str], drop: Collection[str] = ()) -> Any:
    """`value` with every `null` field removed except those named in `keep`, and the fields in `drop` removed."""
    if isinstance(value, dict):
        return {
            key: without_nulls(item, keep, drop)
            for key, item in value.items()
            if key not in drop and (item is not None or key in keep)
        }
    if isinstance(value, list):
        return [without_nulls(item, keep, drop) for item in value]
    return value


def chat_completion(body: dict, drop: Collection[str] = ()) -> dict:
    body = without_nulls(body, CHAT_COMPLETION_NULLS, drop)
    for choice in body.get("choices") or []:
        logprobs = choice.setdefault("logprobs", None)
        if isinstance(logprobs, dict):  # both lists are required (vLLM leaves `refusal` out)
            logprobs.setdefault("content", None)
            logprobs.setdefault("refusal", None)
        message = choice.setdefault("message", {"role": "assistant"})
        message.setdefault("content", None)
        message.setdefault("refusal", None)
    return body


def chat_chunk(chunk: dict, drop: Collection[str] = ()) -> dict:
    chunk = without_nulls(chunk, CHAT_CHUNK_NULLS, drop)
    for choice in chunk.get("choices") or []:
        choice.setdefault("finish_reason", None)
        choice.setdefault("delta", {})
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):  # in a chunk both lists are required and typed as arrays
            logprobs["content"] = logprobs.get("content") or []
            logprobs["refusal"] = logprobs.get("refusal") or []
    return chunk


def text_completion(body: dict, drop: Collection[str] = ()) -> dict:
    """A /v1/completions answer or one of its streamed chunks (the same object)."""
    body = without_nulls(body, TEXT_COMPLETION_NULLS, drop)
    for choice in body.get("choices") or []:
        choice.setdefault("logprobs", None)
        choice.setdefault("finish_reason", None)
        choice.setdefault("text", "")
    return body
