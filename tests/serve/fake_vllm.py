"""A fake vLLM OpenAI server for unit tests of the gateway's own logic (the real one runs in the integration tests).

It answers /health, /v1/models and /v1/chat/completions like vLLM does, deterministically: the answer names the
served model and counts the images it received, so a test can see which version answered and what was sent.
Switches on the instance make it fail the way a real server can (unhealthy, 500s, vLLM's own 400s).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

BASE = "shapes-llava"


class FakeVLLM:
    def __init__(self):
        self.healthy = True
        self.fail_with: int | None = None
        self.adapters: set[str] = set()  # names the resolver can load, like policy-v1
        self.requests: list[dict] = []
        self.token_delay_s = 0.0  # pause before each streamed word, like a real engine's decoding steps
        self.streams_cut: list[str] = []  # ids of streams whose reader went away before the end (vLLM aborts them)
        self.garbled_after_first_word = False  # then an event that is not JSON, as from a broken proxy in between
        self.app = self._build()

    def answer_for(self, body: dict) -> str:
        images = sum(
            1
            for m in body["messages"]
            if isinstance(m.get("content"), list)
            for p in m["content"]
            if p.get("type") == "image_url"
        )
        return f"{body['model']} saw {images} image(s)."

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health():
            return JSONResponse({}, status_code=200 if self.healthy else 503)

        @app.get("/v1/models")
        async def models():
            return {
                "object": "list",
                "data": [
                    {"id": BASE, "object": "model"},
                    *({"id": a, "object": "model"} for a in sorted(self.adapters)),
                ],
            }

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            if self.fail_with:
                return JSONResponse(
                    {
                        "error": {
                            "message": "engine exploded",
                            "type": "InternalServerError",
                            "param": None,
                            "code": self.fail_with,
                        }
                    },
                    status_code=self.fail_with,
                )
            if body["model"] != BASE and body["model"] not in self.adapters:
                return JSONResponse(
                    {
                        "error": {
                            "message": f"The model `{body['model']}` does not exist.",
                            "type": "NotFoundError",
                            "param": "model",
                            "code": 404,
                        }
                    },
                    status_code=404,
                )
            text = self.answer_for(body)
            words = text.split(" ")
            response_id = f"chatcmpl-{uuid.uuid4().hex}"
            usage = {"prompt_tokens": 40, "completion_tokens": len(words), "total_tokens": 40 + len(words)}
            if not body.get("stream"):
                return {
                    "id": response_id,
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                    ],
                    "usage": usage,
                    "system_fingerprint": None,
                }

            def chunk(delta, finish=None, with_usage=False):
                data = {
                    "id": response_id,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": body["model"],
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
                if with_usage:
                    data = {**data, "choices": [], "usage": usage}
                return f"data: {json.dumps(data)}\n\n"

            async def events():
                yield chunk({"role": "assistant", "content": ""})
                try:
                    for i, word in enumerate(words):
                        await asyncio.sleep(self.token_delay_s)
                        yield chunk({"content": word if i == 0 else " " + word})
                        if self.garbled_after_first_word:
                            yield "data: {not json\n\n"
                            return
                except (asyncio.CancelledError, GeneratorExit):
                    self.streams_cut.append(response_id)
                    raise
                yield chunk({}, finish="stop")
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield chunk({}, with_usage=True)
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        return app
