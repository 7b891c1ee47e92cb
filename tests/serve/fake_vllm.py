"""A fake vLLM OpenAI server for unit tests of the gateway's own logic (the real one runs in the integration tests).

It answers /health, /v1/models, /v1/chat/completions and /v1/completions like vLLM 0.32 does (with the nulls and
extras the real server sends, and `n` choices), deterministically: the answer names the served model and counts the
images it received, so a test can see which version answered and what was sent.
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
        self.finish_reason = "stop"  # "length": every answer ends as if max_tokens had cut it
        self.inert_adapters: set[str] = set()  # adapters that load but change nothing (all-zero LoRA weights)
        self.app = self._build()

    def effective_model(self, model: str) -> str:
        return BASE if model in self.inert_adapters else model

    def answer_for(self, body: dict, index: int = 0) -> str:
        """Choice 0 names the model and counts the images; choice i > 0 says which take it is."""
        images = sum(
            1
            for m in body["messages"]
            if isinstance(m.get("content"), list)
            for p in m["content"]
            if p.get("type") == "image_url"
        )
        model = self.effective_model(body["model"])
        return f"{model} saw {images} image(s){'' if index == 0 else f', take {index + 1}'}."

    def _refusal(self, body: dict) -> JSONResponse | None:
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
        return None

    def _logprobs(self, body: dict, words: list[str]) -> dict:
        """vLLM's `logprobs.content` for an answer: one entry a word; an adapter shifts them a little."""
        shift = 0.0 if self.effective_model(body["model"]) == BASE else 0.01
        return {
            "content": [
                {"token": word, "logprob": -0.1 * (i + 1) - shift, "bytes": list(word.encode()), "top_logprobs": []}
                for i, word in enumerate(words)
            ]
        }

    def _answer(self, body: dict, kind: str, texts: list[str]):
        """vLLM 0.32's answer, null fields and extras included (as measured on the real server)."""
        chat = kind == "chat.completion"
        token_ids = bool(body.get("return_token_ids"))
        words = [text.split(" ") for text in texts]
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        completion_tokens = sum(len(w) for w in words)
        usage = {"prompt_tokens": 40, "total_tokens": 40 + completion_tokens, "completion_tokens": completion_tokens}
        if not body.get("stream"):
            choices = []
            for index, text in enumerate(texts):
                if chat:
                    message = {"role": "assistant", "content": text, "refusal": None, "annotations": None}
                    message |= {"audio": None, "function_call": None, "reasoning": None}
                    logprobs = self._logprobs(body, words[index]) if body.get("logprobs") else None
                    choice = {"index": index, "message": message, "logprobs": logprobs}
                    choice["finish_reason"] = self.finish_reason
                else:
                    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": self.finish_reason}
                choice |= {"stop_reason": None, "token_ids": list(range(len(words[index]))) if token_ids else None}
                choices.append(choice)
            return {
                "id": response_id,
                "object": kind,
                "created": int(time.time()),
                "model": body["model"],
                "choices": choices,
                "service_tier": None,
                "system_fingerprint": "vllm-0.32.0-fake",
                "usage": {**usage, "prompt_tokens_details": None, "completion_tokens_details": None},
                "prompt_logprobs": None,
                "prompt_token_ids": [1, 2, 3] if token_ids else None,
                "kv_transfer_params": None,
            }

        def chunk(index, piece=None, finish=None, role=False, with_usage=False):
            data = {
                "id": response_id,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()),
                "model": body["model"],
            }
            if with_usage:
                return f"data: {json.dumps({**data, 'choices': [], 'usage': usage})}\n\n"
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if piece is None else {"content": piece})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": piece or "", "logprobs": None, "finish_reason": finish}
            if not role:
                choice["token_ids"] = ([7] if piece is not None else []) if token_ids else None
            if finish:
                choice["stop_reason"] = None
            data["choices"] = [choice]
            if role:
                data["prompt_token_ids"] = None
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            if chat:
                for index in range(len(texts)):
                    yield chunk(index, role=True)
            try:
                for position in range(max(len(w) for w in words)):
                    for index, choice_words in enumerate(words):
                        if position < len(choice_words):
                            await asyncio.sleep(self.token_delay_s)
                            word = choice_words[position]
                            yield chunk(index, word if position == 0 else " " + word)
                            if self.garbled_after_first_word:
                                yield "data: {not json\n\n"
                                return
            except (asyncio.CancelledError, GeneratorExit):
                self.streams_cut.append(response_id)
                raise
            for index in range(len(texts)):
                yield chunk(index, finish=self.finish_reason)
            if (body.get("stream_options") or {}).get("include_usage"):
                yield chunk(0, with_usage=True)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

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
            refused = self._refusal(body)
            if refused is not None:
                return refused
            return self._answer(body, "chat.completion", [self.answer_for(body, i) for i in range(body.get("n") or 1)])

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            self.requests.append(body)
            refused = self._refusal(body)
            if refused is not None:
                return refused
            texts = [
                f" and {body['model']} went on{'' if i == 0 else f', take {i + 1}'}." for i in range(body.get("n") or 1)
            ]
            return self._answer(body, "text_completion", texts)

        return app
