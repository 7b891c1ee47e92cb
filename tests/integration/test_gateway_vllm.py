"""The gateway in front of the real vLLM CPU server on the bundled model, through the official openai SDK:
text and image chat, streaming and not, pinned adapter versions, the feedback round trip, and bad input."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import openai
import pytest

from tests.integration.conftest import ADMIN, ALICE, BOB
from training.shapes_world import Scene, SceneObject, ShapesWorld

pytestmark = pytest.mark.slow


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def square_of(color: str) -> str:
    return data_url(ShapesWorld().render(Scene("test", 0, (SceneObject("square", color, "large", 1, 1),))))


def image_question(url: str, question: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


def sdk(gateway, key: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)


def test_image_chat_answers_the_color_with_the_base_version(gateway, gateway_store):
    raw = sdk(gateway).chat.completions.with_raw_response.create(
        model="llava-rlhf",
        messages=image_question(square_of("blue"), "What color is the square?"),
        max_tokens=8,
        temperature=0,
    )
    completion = raw.parse()
    assert completion.choices[0].message.content.strip().rstrip(".").lower() == "blue"
    assert completion.system_fingerprint == "base" and raw.headers["x-alignloop-adapter"] == "base"
    record = _wait_for(lambda: gateway_store.get_generation(completion.id))
    assert record.response == completion.choices[0].message.content and record.adapter_version is None
    assert record.image_hashes and gateway_store.get_image(record.image_hashes[0]) is not None


def test_streamed_and_async_answers_match_the_plain_one(gateway):
    messages = image_question(square_of("red"), "Describe the image in detail.")
    plain = sdk(gateway).chat.completions.create(model="llava-rlhf", messages=messages, max_tokens=48, temperature=0)
    chunks = list(
        sdk(gateway).chat.completions.create(
            model="llava-rlhf", messages=messages, max_tokens=48, temperature=0, stream=True
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    assert streamed == plain.choices[0].message.content
    assert streamed.strip().startswith("There ")  # vLLM keeps the first token's leading space
    assert "A large red square is in the center." in streamed  # (the square's partner, a triangle, may be made up)

    async def ask_async() -> str:
        async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=ALICE, max_retries=0) as client:
            answer = await client.chat.completions.create(
                model="llava-rlhf", messages=messages, max_tokens=48, temperature=0
            )
            stream = await client.chat.completions.create(
                model="llava-rlhf", messages=messages, max_tokens=48, temperature=0, stream=True
            )
            pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            assert "".join(pieces) == answer.choices[0].message.content
            return answer.choices[0].message.content

    assert asyncio.run(ask_async()) == plain.choices[0].message.content


def test_a_text_only_question_is_answered(gateway):
    completion = sdk(gateway).chat.completions.create(
        model="base", messages=[{"role": "user", "content": "How many objects are there?"}], max_tokens=8, temperature=0
    )
    assert completion.choices[0].finish_reason in ("stop", "length") and completion.usage.completion_tokens >= 1


def test_a_pinned_version_is_answered_by_its_adapter(gateway, gateway_store, publish_random_adapter, vllm_server):
    adapter = publish_random_adapter(gateway_store, seed=1)
    messages = image_question(square_of("green"), "Describe the image in detail.")
    _wait_for(lambda: any(m.id == f"llava-rlhf@v{adapter.version}" for m in sdk(gateway).models.list().data))
    base = sdk(gateway).chat.completions.create(model="base", messages=messages, max_tokens=24, temperature=0)
    raw = sdk(gateway).chat.completions.with_raw_response.create(
        model=f"llava-rlhf@v{adapter.version}", messages=messages, max_tokens=24, temperature=0
    )
    pinned = raw.parse()
    assert raw.headers["x-alignloop-adapter"] == adapter.name and pinned.system_fingerprint == adapter.name
    assert pinned.model == f"llava-rlhf@v{adapter.version}"
    assert pinned.choices[0].message.content != base.choices[0].message.content  # the LoRA really ran
    served = httpx.get(f"{vllm_server.base_url}/v1/models").json()["data"]
    assert adapter.name in {m["id"] for m in served}  # vLLM loaded it by name from the shared directory
    record = _wait_for(lambda: gateway_store.get_generation(pinned.id))
    assert record.adapter_version == adapter.version


def test_the_feedback_round_trip(gateway, gateway_store):
    completion = sdk(gateway).chat.completions.create(
        model="llava-rlhf",
        messages=image_question(square_of("yellow"), "Describe the image in detail."),
        max_tokens=32,
        temperature=0,
        user="end-user-1",
    )
    answer = completion.choices[0].message.content
    feedback = httpx.post(
        f"{gateway.url}/v1/feedback",
        headers={"Authorization": f"Bearer {ALICE}"},
        json={
            "response_id": completion.id,
            "rating": -1,
            "correction": answer + " It is yellow.",
            "facts": ["There is a large yellow square in the center."],
            "idempotency_key": "fb-1",
            "user": "end-user-1",
        },
    )
    assert feedback.status_code == 200, feedback.text
    body = feedback.json()
    assert body["rating"] == -1 and body["adapter_version"] == "base" and body["response_id"] == completion.id
    again = httpx.get(f"{gateway.url}/v1/feedback/{body['id']}", headers={"Authorization": f"Bearer {ALICE}"})
    assert again.json() == body
    other = httpx.get(f"{gateway.url}/v1/feedback/{body['id']}", headers={"Authorization": f"Bearer {BOB}"})
    assert other.status_code == 404  # another key's feedback does not exist for Bob
    event = gateway_store.get_event(body["id"])
    assert event.generation_id == completion.id and event.rating == -1 and event.correction.endswith("It is yellow.")
    record = gateway_store.get_generation(completion.id)
    facts = gateway_store.get_facts(record.image_hashes[0])
    assert any("large yellow square" in fact for entry in facts for fact in entry.facts)


BAD_REQUESTS = [
    (
        "malformed JSON",
        {"content": b'{"model": "llava-rlhf", "messages": [', "headers": {"Content-Type": "application/json"}},
        400,
    ),
    (
        "wrong content type",
        {"content": b"model=llava-rlhf", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
        415,
    ),
    (
        "broken image",
        {"json": {"model": "llava-rlhf", "messages": image_question("data:image/png;base64,iVBORw0KGgoAAAA", "Hi")}},
        400,
    ),
    (
        "not an image",
        {
            "json": {
                "model": "llava-rlhf",
                "messages": image_question(
                    "data:image/png;base64," + base64.b64encode(b"hello world" * 50).decode(), "Hi"
                ),
            }
        },
        400,
    ),
    (
        "image URL not allowed",
        {"json": {"model": "llava-rlhf", "messages": image_question("http://169.254.169.254/latest/meta-data", "Hi")}},
        400,
    ),
    ("unknown model", {"json": {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}}, 404),
    ("unknown version", {"json": {"model": "llava-rlhf@v999", "messages": [{"role": "user", "content": "Hi"}]}}, 404),
    (
        "tokens over the cap",
        {"json": {"model": "llava-rlhf", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100000}},
        400,
    ),
    (
        "prompt over the context",
        {"json": {"model": "llava-rlhf", "messages": [{"role": "user", "content": "square " * 2000}]}},
        400,
    ),
]


@pytest.mark.parametrize("case, request_kwargs, status", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_chat_input_is_a_4xx_and_the_server_keeps_serving(gateway, case, request_kwargs, status):
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {ALICE}", **request_kwargs.pop("headers", {})},
        timeout=30,
        **request_kwargs,
    )
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    ok = sdk(gateway).chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert ok.choices[0].message.content is not None


def test_a_huge_image_and_bad_keys_are_refused(gateway):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (12000, 12000), (255, 0, 0)).save(buffer, format="PNG")  # 144 Mpx, a few hundred kB
    huge = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(gateway).chat.completions.create(model="llava-rlhf", messages=image_question(huge, "Hi"), max_tokens=4)
    assert "pixels" in refused.value.message
    with pytest.raises(openai.AuthenticationError):
        sdk(gateway, key="sk-not-a-key-000000000000").chat.completions.create(
            model="llava-rlhf", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
    admin_with_user_key = httpx.get(f"{gateway.url}/v1/admin/adapters", headers={"Authorization": f"Bearer {ALICE}"})
    assert admin_with_user_key.status_code == 403
    assert (
        httpx.get(f"{gateway.url}/v1/admin/adapters", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    )


def test_feedback_for_an_unknown_response_is_404(gateway):
    response = httpx.post(
        f"{gateway.url}/v1/feedback",
        headers={"Authorization": f"Bearer {ALICE}"},
        json={"response_id": "chatcmpl-does-not-exist", "rating": 1},
    )
    assert response.status_code == 404 and response.json()["error"]["param"] == "response_id"


def _wait_for(condition, timeout: float = 10.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")
