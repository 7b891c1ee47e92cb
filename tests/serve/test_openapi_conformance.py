"""Every answer body and every streamed event of the gateway, validated against OpenAI's own OpenAPI document in
strict mode (tests/serve/openai_openapi/strict.py says what strict means). The fake vLLM sends what vLLM 0.32 sends,
nulls included, so this checks the gateway's rewriting of real upstream shapes."""

from __future__ import annotations

import json

import pytest

from tests.serve.conftest import ALICE, auth, image_question, png_data_url
from tests.serve.openai_openapi import strict
from tests.serve.test_gateway_api import register

IMAGE_INPUT = [
    {
        "role": "user",
        "content": [{"type": "input_image", "image_url": png_data_url()}, {"type": "input_text", "text": "Color?"}],
    }
]


def sse_events(response) -> list[dict]:
    return [
        json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"
    ]


def test_the_fixture_names_its_source_and_reads_strictly():
    source = strict.document()["info"]["x-source"]
    assert source["repository"] == "https://github.com/openai/openai-openapi" and len(source["commit"]) == 40
    assert strict.document()["info"]["version"] == "2.3.0"
    # what vLLM 0.32 sends and a strict reader refuses (measured on the real server)
    vllm_answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Blue.",
                    "refusal": None,
                    "annotations": None,
                    "function_call": None,
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 1,
            "completion_tokens": 1,
            "total_tokens": 2,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        },
    }
    problems = strict.errors("CreateChatCompletionResponse", vllm_answer)
    assert [p.split(":")[0] for p in problems] == [
        "choices/0/message/annotations",
        "choices/0/message/function_call",
        "usage/completion_tokens_details",
        "usage/prompt_tokens_details",
    ]
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    choice = {"index": 0, "delta": {"content": "x"}, "finish_reason": None}
    assert strict.errors("CreateChatCompletionStreamResponse", {**chunk, "choices": [choice]}) == []  # as OpenAI sends
    with_logprobs = {**chunk, "choices": [{**choice, "logprobs": None}]}
    assert strict.errors("CreateChatCompletionStreamResponse", with_logprobs) == [
        "choices/0/logprobs: None is not of type 'object'"
    ]
    unknown_null = {**chunk, "choices": [{**choice, "stop_reason": None}]}
    assert strict.errors("CreateChatCompletionStreamResponse", unknown_null)
    with pytest.raises(AssertionError, match="not an event type"):
        strict.assert_stream_event_conforms({"type": "response.made_up", "sequence_number": 0})


@pytest.mark.parametrize(
    "body",
    [
        {"model": "llava-rlhf", "messages": image_question(png_data_url())},
        {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "n": 2},
        {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "n": 2, "return_token_ids": True},
    ],
)
def test_chat_answers_conform(client, body):
    response = client.post("/v1/chat/completions", headers=auth(ALICE), json=body)
    assert response.status_code == 200
    strict.assert_conforms(strict.schema_of("/chat/completions", "post"), response.json())


@pytest.mark.parametrize("usage", [False, True])
@pytest.mark.parametrize("n", [1, 2])
def test_chat_chunks_conform(client, usage, n):
    body = {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "stream": True, "n": n}
    if usage:
        body["stream_options"] = {"include_usage": True}
    with client.stream("POST", "/v1/chat/completions", headers=auth(ALICE), json=body) as response:
        events = sse_events(response)
    assert len(events) > 4
    schema = strict.schema_of("/chat/completions", "post", "text/event-stream")
    for event in events:
        strict.assert_conforms(schema, event)
    assert any(e["choices"] and e["choices"][0]["finish_reason"] is None for e in events)  # as OpenAI sends it


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("n", [1, 2])
def test_text_completions_conform(client, stream, n):
    body = {"model": "base", "prompt": "There is a", "n": n, "stream": stream}
    if not stream:
        response = client.post("/v1/completions", headers=auth(ALICE), json=body)
        strict.assert_conforms(strict.schema_of("/completions", "post"), response.json())
        return
    with client.stream("POST", "/v1/completions", headers=auth(ALICE), json=body) as response:
        events = sse_events(response)
    for event in events:
        strict.assert_conforms("x-CreateCompletionChunk", event)


@pytest.mark.parametrize("finish", ["stop", "length"])
@pytest.mark.parametrize(
    "body",
    [
        {"model": "llava-rlhf", "input": IMAGE_INPUT, "instructions": "Be brief.", "metadata": {"k": "v"}},
        {"model": "base", "input": "Hi", "max_output_tokens": 16, "temperature": 0.5, "top_p": 0.9, "user": "u-1"},
    ],
)
def test_responses_and_their_events_conform(client, fake_vllm, body, finish):
    fake_vllm.finish_reason = finish
    response = client.post("/v1/responses", headers=auth(ALICE), json=body)
    strict.assert_conforms(strict.schema_of("/responses", "post"), response.json())
    with client.stream("POST", "/v1/responses", headers=auth(ALICE), json={**body, "stream": True}) as streamed:
        events = sse_events(streamed)
    assert strict.schema_of("/responses", "post", "text/event-stream") == "ResponseStreamEvent"
    for event in events:
        strict.assert_stream_event_conforms(event)
    assert events[-1]["type"] == ("response.completed" if finish == "stop" else "response.incomplete")


def test_a_failed_response_stream_conforms(client, fake_vllm):
    fake_vllm.garbled_after_first_word = True
    with client.stream(
        "POST", "/v1/responses", headers=auth(ALICE), json={"model": "base", "input": "Hi", "stream": True}
    ) as streamed:
        events = sse_events(streamed)
    assert events[-1]["type"] == "response.failed"
    for event in events:
        strict.assert_stream_event_conforms(event)


def test_models_conform(client, store, fake_vllm):
    register(store, fake_vllm, promote=True)
    strict.assert_conforms(strict.schema_of("/models", "get"), client.get("/v1/models", headers=auth(ALICE)).json())
    for name in ("llava-rlhf", "base", "llava-rlhf@v1"):
        model = client.get(f"/v1/models/{name}", headers=auth(ALICE)).json()
        strict.assert_conforms(strict.schema_of("/models/{model}", "get"), model)


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "/v1/models/gpt-4", None),
        ("POST", "/v1/responses", {"model": "base", "input": []}),
        ("POST", "/v1/responses", {"model": "nope", "input": "Hi"}),
        ("POST", "/v1/completions", {"model": "base", "prompt": ["a"]}),
        ("POST", "/v1/chat/completions", {"model": "base", "messages": [], "n": 2}),
    ],
)
def test_errors_conform(client, method, path, body):
    response = client.request(method, path, headers=auth(ALICE), json=body)
    assert response.status_code >= 400
    strict.assert_conforms("ErrorResponse", response.json())


def test_logprobs_are_filled_where_the_document_requires_them():
    """vLLM 0.32 leaves `refusal` out of a choice's logprobs (measured); the document requires both lists."""
    from serve import conformance

    token = {"token": " Blue", "logprob": -0.1, "bytes": [32, 66], "top_logprobs": []}
    body = {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " Blue"},
                "logprobs": {"content": [token]},
                "finish_reason": "stop",
            }
        ],
    }
    strict.assert_conforms("CreateChatCompletionResponse", conformance.chat_completion(body))
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": " Blue"}, "logprobs": {"content": [token], "refusal": None}}],
    }
    strict.assert_conforms("CreateChatCompletionStreamResponse", conformance.chat_chunk(chunk))
