"""Chat-model backends: the OpenAI backend against an unreachable port and a local fake server; the transformers
backend's errors, and (slow) a real tiny LLaVA."""

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from PIL import Image

from training.evaluation.models import ChatRequest, OpenAIChatModel, TransformersChatModel


def request(question: str = "Is there a star in the image?", max_tokens: int = 16) -> ChatRequest:
    return ChatRequest(Image.new("RGB", (12, 12), (200, 30, 30)), question, max_tokens)


def test_unreachable_endpoint_raises_connection_error_quickly():
    model = OpenAIChatModel("http://127.0.0.1:9/v1", "llava-rlhf")
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=r"cannot reach endpoint http://127\.0\.0\.1:9/v1"):
        model.answer([request()])
    assert time.monotonic() - started < 5


class FakeOpenAIServer(BaseHTTPRequestHandler):
    """GET /v1/models and POST /v1/chat/completions; answers echo the question and record each request body."""

    bodies: ClassVar[list[dict]] = []

    def log_message(self, *args):
        pass

    def _reply(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        model = {"id": "llava-rlhf", "object": "model", "created": 0, "owned_by": "alignloop"}
        self._reply({"object": "list", "data": [model]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        question = body["messages"][0]["content"][1]["text"]
        message = {"role": "assistant", "content": f" echo: {question} "}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        self._reply({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "choices": [choice]})


@pytest.fixture
def fake_server():
    FakeOpenAIServer.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAIServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_chat_model_sends_image_and_question(fake_server):
    model = OpenAIChatModel(fake_server, "llava-rlhf", concurrency=3)
    questions = [f"question {i}?" for i in range(7)]
    answers = model.answer([request(q, max_tokens=10 + i) for i, q in enumerate(questions)])
    assert answers == [f"echo: {q}" for q in questions]
    body = next(b for b in FakeOpenAIServer.bodies if b["messages"][0]["content"][1]["text"] == "question 2?")
    assert body["model"] == "llava-rlhf" and body["temperature"] == 0.0 and body["max_tokens"] == 12
    image_part = body["messages"][0]["content"][0]
    assert image_part["type"] == "image_url"
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert image.size == (12, 12) and image.getpixel((0, 0)) == (200, 30, 30)


def test_transformers_chat_model_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TransformersChatModel(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        TransformersChatModel(tmp_path)


@pytest.mark.slow
def test_transformers_chat_model_answers_with_strings(tmp_path):
    from training.tiny_llava import build_untrained

    model = TransformersChatModel(build_untrained(tmp_path / "tiny"), batch_size=2)
    answers = model.answer([request(max_tokens=4), request("Describe the image in detail.", max_tokens=6)])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
