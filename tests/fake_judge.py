"""A fake OpenAI-compatible judge server for tests: an httpx transport that answers GET /models and
POST /chat/completions with replies a test chooses from each request, and remembers every request."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx


class FakeJudge:
    """`reply(prompt_text, request_body) -> str` picks each answer; `requests` keeps every chat body asked."""

    def __init__(self, reply: Callable[[str, dict], str]):
        self.reply = reply
        self.requests: list[dict] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "judge", "object": "model"}]})
        body = json.loads(request.content)
        self.requests.append(body)
        content = body["messages"][-1]["content"]
        text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
        return httpx.Response(
            200,
            json={
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": self.reply(text, body)},
                        "finish_reason": "stop",
                    }
                ],
            },
        )

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self.handle))


def response_a(prompt: str) -> str:
    """The text of "Response A" in a pair judge prompt."""
    return prompt.split("### Response A\n", 1)[1].split("\n\n### Response B", 1)[0]
