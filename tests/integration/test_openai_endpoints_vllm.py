"""The gateway's newer OpenAI endpoints in front of the real vLLM CPU server on the bundled model, through the
official openai SDK (sync, async, streaming): /v1/responses (images, previous_response_id), /v1/models/{id}, `n > 1`
and /v1/completions; feedback and preferences on them reaching the trainer as pairs; and every body and event
validated against OpenAI's OpenAPI document in strict mode."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from online_rl.pairs import build_pairs
from online_rl.schema import choice_record_id
from tests.integration.conftest import ALICE, BOB
from tests.integration.test_gateway_vllm import _wait_for, image_question, sdk, square_of
from tests.serve.openai_openapi import strict

pytestmark = pytest.mark.slow


def image_input(url: str, question: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "input_image", "image_url": url}, {"type": "input_text", "text": question}],
        }
    ]


def post(gateway, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{gateway.url}{path}", headers={"Authorization": f"Bearer {ALICE}"}, json=body, timeout=120)


def streamed(gateway, path: str, body: dict) -> list[dict]:
    with httpx.stream(
        "POST", f"{gateway.url}{path}", headers={"Authorization": f"Bearer {ALICE}"}, json=body, timeout=120
    ) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    return [json.loads(line[6:]) for line in lines]


def pairs_of(store, *record_ids: str):
    events = [event for _, event in store.list_events()]
    return [
        p
        for p in build_pairs(events, store.get_generation)
        if {p.chosen_generation_id, p.rejected_generation_id} <= set(record_ids)
    ]


def test_a_response_about_an_image_and_its_stream(gateway, gateway_store):
    request = {"model": "llava-rlhf", "input": image_input(square_of("blue"), "What color is the square?")}
    response = sdk(gateway).responses.create(**request, max_output_tokens=8, temperature=0)
    assert response.output_text.strip().rstrip(".").lower() == "blue" and response.status == "completed"
    assert response.model == "base" and response.usage.input_tokens > 20
    record = _wait_for(lambda: gateway_store.get_generation(response.id))
    assert record.response == response.output_text and gateway_store.get_image(record.image_hashes[0]) is not None
    with sdk(gateway).responses.stream(**request, max_output_tokens=8, temperature=0) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == response.output_text and len(deltas) >= 2

    async def ask_async() -> str:
        async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=ALICE, max_retries=0) as client:
            answer = await client.responses.create(**request, max_output_tokens=8, temperature=0)
            async with client.responses.stream(**request, max_output_tokens=8, temperature=0) as stream:
                text = "".join([event.delta async for event in stream if event.type == "response.output_text.delta"])
            assert text == answer.output_text
            return answer.output_text

    assert asyncio.run(ask_async()) == response.output_text


def test_previous_response_id_continues_a_conversation_about_the_image(gateway, gateway_store):
    first = sdk(gateway).responses.create(
        model="llava-rlhf",
        input=image_input(square_of("red"), "What color is the square?"),
        max_output_tokens=8,
        temperature=0,
    )
    second = sdk(gateway).responses.create(
        model="llava-rlhf",
        input="Describe the image in detail.",
        previous_response_id=first.id,
        max_output_tokens=48,
        temperature=0,
    )
    assert second.output_text.strip() and second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens  # the first turn was sent again
    record = _wait_for(lambda: gateway_store.get_generation(second.id))
    assert [m["role"] for m in record.messages] == ["user", "assistant", "user"]
    assert record.messages[1]["content"] == first.output_text and record.image_hashes
    with pytest.raises(openai.NotFoundError):
        sdk(gateway, BOB).responses.create(model="llava-rlhf", input="Hi", previous_response_id=first.id)


def test_feedback_and_a_preference_on_responses_become_pairs(gateway, gateway_store):
    request = {"model": "llava-rlhf", "input": image_input(square_of("green"), "Describe the image in detail.")}
    answers = {}
    for seed in range(8):  # two sampled answers that differ
        response = sdk(gateway).responses.create(
            **request, max_output_tokens=32, temperature=1.0, extra_body={"seed": seed}
        )
        answers.setdefault(response.output_text.strip(), response)
        if len(answers) == 2:
            break
    better, worse = answers.values()
    for body in ({"response_id": better.id, "rating": 1}, {"response_id": worse.id, "rating": -1}):
        assert post(gateway, "/v1/feedback", body).status_code == 200
    preference = post(gateway, "/v1/preferences", {"response_ids": [better.id, worse.id], "preferred_id": better.id})
    assert preference.status_code == 200, preference.text
    pairs = pairs_of(gateway_store, better.id, worse.id)
    assert {(p.source, p.chosen_generation_id, p.rejected_generation_id) for p in pairs} == {
        ("thumbs", better.id, worse.id),
        ("preference", better.id, worse.id),
    }
    assert pairs[0].image_hashes and pairs[0].chosen == better.output_text


def test_models_by_id(gateway):
    client = sdk(gateway)
    assert client.models.retrieve("llava-rlhf").id == "llava-rlhf"
    assert client.models.retrieve("base").owned_by == "alignloop"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("llava-rlhf@v999")
    assert missing.value.body["code"] == "model_not_found"


def test_two_choices_are_recorded_each_and_can_be_compared(gateway, gateway_store):
    messages = image_question(square_of("yellow"), "Describe the image in detail.")
    completion = sdk(gateway).chat.completions.create(
        model="llava-rlhf", messages=messages, n=2, max_tokens=32, temperature=1.0, seed=7
    )
    assert [c.index for c in completion.choices] == [0, 1]
    ids = [choice_record_id(completion.id, index) for index in (0, 1)]
    records = [_wait_for(lambda rid=rid: gateway_store.get_generation(rid)) for rid in ids]
    assert [r.response for r in records] == [c.message.content for c in completion.choices]
    assert sum(r.completion_tokens for r in records) == completion.usage.completion_tokens  # each its own count
    assert records[0].prompt_hash == records[1].prompt_hash
    assert post(gateway, "/v1/feedback", {"response_id": ids[1], "rating": 1}).status_code == 200
    preference = post(gateway, "/v1/preferences", {"response_ids": ids, "preferred_id": ids[1]})
    assert preference.status_code == 200, preference.text
    if records[0].response.strip() != records[1].response.strip():
        (pair,) = pairs_of(gateway_store, *ids)
        assert (pair.source, pair.chosen_generation_id) == ("preference", ids[1])
    chunks = list(
        sdk(gateway).chat.completions.create(
            model="llava-rlhf", messages=messages, n=2, max_tokens=16, temperature=1.0, seed=7, stream=True
        )
    )
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    for index in (0, 1):
        record = _wait_for(lambda i=index: gateway_store.get_generation(choice_record_id(chunks[0].id, i)))
        assert record.response == texts[index]


def test_plain_text_completions(gateway, gateway_store):
    completion = sdk(gateway).completions.create(model="base", prompt="There is a", max_tokens=6, temperature=0)
    assert completion.choices[0].text and completion.model == "base"
    record = _wait_for(lambda: gateway_store.get_generation(completion.id))
    assert record.prompt == "There is a" and record.messages == [] and record.response == completion.choices[0].text
    stream = sdk(gateway).completions.create(
        model="base", prompt="There is a", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == completion.choices[0].text


def test_every_body_and_event_conforms_to_openai_s_document(gateway):
    url = square_of("blue")
    chat = {"model": "llava-rlhf", "messages": image_question(url, "What color is the square?"), "max_tokens": 8}
    for body in (chat, {**chat, "n": 2, "temperature": 1.0}, {**chat, "logprobs": True, "top_logprobs": 2}):
        strict.assert_conforms("CreateChatCompletionResponse", post(gateway, "/v1/chat/completions", body).json())
        for stream_options in (None, {"include_usage": True}):
            extra = {"stream": True} | ({"stream_options": stream_options} if stream_options else {})
            for event in streamed(gateway, "/v1/chat/completions", {**body, **extra}):
                strict.assert_conforms("CreateChatCompletionStreamResponse", event)
    text = {"model": "base", "prompt": "There is a", "max_tokens": 6}
    for body in (text, {**text, "n": 2}):
        strict.assert_conforms("CreateCompletionResponse", post(gateway, "/v1/completions", body).json())
        for event in streamed(gateway, "/v1/completions", {**body, "stream": True}):
            strict.assert_conforms("x-CreateCompletionChunk", event)
    responses = {"model": "llava-rlhf", "input": image_input(url, "What color is the square?")}
    for body in ({**responses, "max_output_tokens": 8}, {**responses, "max_output_tokens": 2}):  # completed, incomplete
        strict.assert_conforms("Response", post(gateway, "/v1/responses", body).json())
        events = streamed(gateway, "/v1/responses", {**body, "stream": True})
        for event in events:
            strict.assert_stream_event_conforms(event)
    assert events[-1]["type"] == "response.incomplete"
    headers = {"Authorization": f"Bearer {ALICE}"}
    strict.assert_conforms("ListModelsResponse", httpx.get(f"{gateway.url}/v1/models", headers=headers).json())
    strict.assert_conforms("Model", httpx.get(f"{gateway.url}/v1/models/base", headers=headers).json())
    strict.assert_conforms("ErrorResponse", post(gateway, "/v1/responses", {"model": "x", "input": "Hi"}).json())
