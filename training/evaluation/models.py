"""Chat-model backends for evaluation: one image and one question in, one answer string out.

Everything that evaluates a model talks to the `ChatModel` protocol, so the same benchmark runs against a local
checkpoint (`TransformersChatModel`, greedy batched generation) or any OpenAI-compatible server such as the vLLM
server or the alignloop gateway (`OpenAIChatModel`, concurrent requests, temperature 0).
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from PIL import Image

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """One single-turn question about one image."""

    image: Image.Image
    question: str
    max_tokens: int = 64


class ChatModel(Protocol):
    def answer(self, requests: list[ChatRequest]) -> list[str]:
        """The answers to `requests`, in the same order."""
        ...


def user_turn(question: str) -> list[dict]:
    """The single user turn of a request, as chat-template messages (image first, then the question)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


class TransformersChatModel:
    """A LLaVA checkpoint in a local directory, answering with greedy decoding in left-padded batches.

    Requests are sorted by max_tokens before batching so that short answers are not generated to the length of a
    description; each answer is cut at its own max_tokens.
    """

    def __init__(
        self,
        model_dir: str | Path,
        batch_size: int = 16,
        device: str | None = None,
        dtype: torch.dtype | None = None,
    ):
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model directory {model_dir} does not exist")
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} has no config.json: it is not a saved LLaVA checkpoint")
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(device)
        self._attach(model, AutoProcessor.from_pretrained(model_dir), batch_size)
        logger.info("loaded model_dir=%s device=%s dtype=%s", model_dir, self.device, dtype)

    @classmethod
    def from_loaded(cls, model, processor, batch_size: int = 16, synced: bool = False) -> TransformersChatModel:
        """Answers with a model already in memory (e.g. a base model with a LoRA version merged in). `synced`: the
        model is sharded over processes, which all answer the same requests together (`rollouts.generate`)."""
        chat = cls.__new__(cls)
        chat._attach(model, processor, batch_size, synced)
        return chat

    def _attach(self, model, processor, batch_size: int, synced: bool = False) -> None:
        self.batch_size, self.device, self.model, self.processor = batch_size, model.device, model.eval(), processor
        self.synced = synced
        self.tokenizer = processor.tokenizer
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def answer(self, requests: list[ChatRequest]) -> list[str]:
        order = sorted(range(len(requests)), key=lambda i: requests[i].max_tokens)
        answers = [""] * len(requests)
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            for i, text in zip(indices, self._generate([requests[i] for i in indices]), strict=True):
                answers[i] = text
        return answers

    def _generate(self, batch: list[ChatRequest]) -> list[str]:
        from training.rollouts import Prompt, generate

        prompts = [Prompt(tuple(user_turn(r.question)), r.image, r.max_tokens) for r in batch]
        return generate(self.model, self.processor, prompts, greedy=True, synced=self.synced).texts


class OpenAIChatModel:
    """Any OpenAI-compatible chat server: each request sends the image as a PNG data URL, temperature 0.

    Up to `concurrency` requests are in flight at once (a thread pool over the synchronous client). The endpoint is
    checked once, before the first request.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "EMPTY",
        concurrency: int = 8,
        timeout: float = 120.0,
    ):
        from alignloop.client import EVAL_CLIENT_HEADER, ChatEndpoint

        self.model = model
        self.concurrency = concurrency
        self.endpoint = ChatEndpoint(base_url, api_key, timeout, headers=EVAL_CLIENT_HEADER)

    def check(self) -> None:
        """Raises ConnectionError unless the endpoint answers; runs once."""
        self.endpoint.check()

    def answer(self, requests: list[ChatRequest]) -> list[str]:
        if not requests:
            return []
        self.check()
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._answer_one, requests))

    def _answer_one(self, request: ChatRequest) -> str:
        from alignloop.client import image_data_url

        content = [
            {"type": "image_url", "image_url": {"url": image_data_url(request.image)}},
            {"type": "text", "text": request.question},
        ]
        return self.endpoint.chat(self.model, [{"role": "user", "content": content}], request.max_tokens).strip()
