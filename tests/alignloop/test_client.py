"""The API client: transient failures of an endpoint are retried with backoff, a 429 waits for its Retry-After, and
what is not transient fails at once."""

from __future__ import annotations

import httpx
import openai
import pytest

from alignloop.client import ChatEndpoint, GatewayClient, GatewayError

COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "llava-rlhf@v1",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "A red star."}, "finish_reason": "stop"}],
}


def scripted(*responses):
    """A transport that answers each request with the next (status, body, headers) and records what it was asked."""
    asked = []

    def handle(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        status, body, headers = responses[min(len(asked), len(responses)) - 1]
        return httpx.Response(status, json=body, headers=headers)

    return httpx.MockTransport(handle), asked


def error(message: str) -> dict:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


def test_transient_failures_are_retried_until_an_answer(monkeypatch):
    monkeypatch.setattr("alignloop.client.retry_wait", lambda state: 0.0)
    transport, asked = scripted(
        (503, error("engine restarting"), {}),
        (429, error("Rate limit reached"), {"retry-after": "0"}),
        (502, error("upstream failed"), {}),
        (200, COMPLETION, {}),
    )
    endpoint = ChatEndpoint("http://gateway/v1", "k", http_client=httpx.Client(transport=transport))
    assert endpoint.chat("llava-rlhf@v1", [{"role": "user", "content": "x"}], 8) == "A red star."
    assert asked == ["/v1/chat/completions"] * 4


def test_retries_end_and_non_transient_errors_fail_at_once(monkeypatch):
    monkeypatch.setattr("alignloop.client.retry_wait", lambda state: 0.0)
    transport, asked = scripted((503, error("down"), {}))
    endpoint = ChatEndpoint("http://gateway/v1", "k", attempts=3, http_client=httpx.Client(transport=transport))
    with pytest.raises(openai.InternalServerError):
        endpoint.chat("m", [{"role": "user", "content": "x"}], 8)
    assert len(asked) == 3
    transport, asked = scripted((400, error("bad image"), {}))
    endpoint = ChatEndpoint("http://gateway/v1", "k", http_client=httpx.Client(transport=transport))
    with pytest.raises(openai.BadRequestError):
        endpoint.chat("m", [{"role": "user", "content": "x"}], 8)
    assert len(asked) == 1


def test_a_rate_limited_client_waits_for_retry_after_when_it_may():
    feedback = {"id": "fb-1", "object": "feedback"}
    limited = (429, error("Rate limit reached: 600 requests per minute for this key."), {"retry-after": "0"})
    transport, asked = scripted(limited, limited, (200, feedback, {}))
    patient = GatewayClient(
        "http://gateway",
        "k",
        http_client=httpx.Client(transport=transport, base_url="http://gateway"),
        rate_limit_attempts=5,
    )
    assert patient.feedback("chatcmpl-1", rating=1) == feedback and len(asked) == 3
    transport, asked = scripted(limited)
    demo = GatewayClient(
        "http://gateway", "k", http_client=httpx.Client(transport=transport, base_url="http://gateway")
    )
    with pytest.raises(GatewayError, match=r"refused the request \(429\): Rate limit reached"):
        demo.feedback("chatcmpl-1", rating=1)
    assert len(asked) == 1  # the demo page shows the refusal at once
