"""The gateway's newer OpenAI endpoints on a fake vLLM, through the official `openai` SDK (sync, async, streaming):
/v1/responses (text and images, previous_response_id, events as the SDK's stream helper reads them),
/v1/models/{id}, `n > 1` on chat (every choice recorded and rateable) and /v1/completions; and that feedback and
preferences on these answers reach the trainer as preference pairs."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from online_rl.pairs import build_pairs
from online_rl.schema import choice_record_id
from tests.serve.conftest import ADMIN, ALICE, BOB, auth, png_data_url, wait_until
from tests.serve.test_gateway_api import assert_openai_error, record_of, register, sdk


def image_input(url: str, question: str = "What color is the square?") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "input_image", "image_url": url}, {"type": "input_text", "text": question}],
        }
    ]


def stored_events(store) -> list:
    return [event for _, event in store.list_events()]


# ---- /v1/responses ---------------------------------------------------------------------------------------------
def test_a_response_with_an_image_through_the_sdk(client, fake_vllm, store):
    raw = sdk(client).responses.with_raw_response.create(
        model="llava-rlhf", input=image_input(png_data_url()), max_output_tokens=8, temperature=0, user="end-user-3"
    )
    response = raw.parse()
    assert response.output_text == "shapes-llava saw 1 image(s)."
    assert response.id.startswith("resp_") and response.status == "completed" and response.model == "base"
    assert response.usage.input_tokens == 40 and response.usage.output_tokens == 4
    assert raw.headers["x-alignloop-adapter"] == "base"
    sent = fake_vllm.requests[-1]  # a chat completion to vLLM
    assert sent["max_tokens"] == 8 and sent["temperature"] == 0 and "user" not in sent
    assert sent["messages"][0]["content"][0] == {"type": "image_url", "image_url": {"url": png_data_url()}}
    record = record_of(client, response.id)  # recorded under the id the client received
    assert record.response == response.output_text and record.finish_reason == "stop"
    assert record.messages[0]["content"][0]["image_url"]["url"].startswith("sha256:")
    assert store.get_image(record.image_hashes[0]) is not None and "end-user-3" not in record.user_id


def test_a_streamed_response_through_the_sdk_stream_helper(client):
    with sdk(client).responses.stream(model="llava-rlhf", input="How many objects are there?") as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == final.output_text == "shapes-llava saw 0 image(s)." and len(deltas) == 4
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert final.usage.output_tokens == 4 and final.status == "completed"
    record = record_of(client, final.id)
    assert record.response == final.output_text and record.time_to_first_token_ms is not None


def test_create_with_stream_true_yields_the_raw_events(client):
    events = list(sdk(client).responses.create(model="base", input="Hi", stream=True))
    assert events[0].type == "response.created" and events[0].response.status == "in_progress"
    assert events[-1].type == "response.completed" and events[-1].response.output_text == "shapes-llava saw 0 image(s)."


@pytest.mark.anyio
async def test_the_async_sdk_creates_and_streams_responses(settings, fake_vllm):
    from serve.app import create_app

    app = create_app(settings, upstream_transport=httpx.ASGITransport(fake_vllm.app))
    async with app.router.lifespan_context(app):
        while not app.state.pool.any_healthy:
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://testserver") as http:
            client = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key=ALICE, http_client=http)
            response = await client.responses.create(model="base", input=image_input(png_data_url()))
            assert response.output_text == "shapes-llava saw 1 image(s)."
            async with client.responses.stream(model="base", input="Hi") as stream:
                deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
                final = await stream.get_final_response()
            assert "".join(deltas) == final.output_text == "shapes-llava saw 0 image(s)."
            model = await client.models.retrieve("base")
            assert model.id == "base"
            completion = await client.completions.create(model="base", prompt="There is")
            assert completion.choices[0].text == " and shapes-llava went on."
            two = await client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}], n=2)
            assert [c.index for c in two.choices] == [0, 1]
            stream = await client.chat.completions.create(
                model="base", messages=[{"role": "user", "content": "Hi"}], n=2, stream=True
            )
            indexes = {choice.index async for chunk in stream for choice in chunk.choices}
            assert indexes == {0, 1}


def test_previous_response_id_continues_the_conversation(client, fake_vllm, store):
    url = png_data_url(color=(0, 0, 255))
    first = sdk(client).responses.create(model="base", input=image_input(url), instructions="Answer briefly.")
    assert fake_vllm.requests[-1]["messages"][0] == {"role": "system", "content": "Answer briefly."}
    second = sdk(client).responses.create(
        model="base", input="And how many objects are there?", previous_response_id=first.id
    )
    sent = fake_vllm.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]  # the first's instructions are not carried over
    assert sent[0]["content"][0]["image_url"]["url"] == url  # the image again, from the store
    assert sent[1] == {"role": "assistant", "content": first.output_text}
    assert second.output_text == "shapes-llava saw 1 image(s)." and second.previous_response_id == first.id
    record = record_of(client, second.id)
    assert [m["role"] for m in record.messages] == ["user", "assistant", "user"]
    assert record.messages[0]["content"][0]["image_url"]["url"] == "sha256:" + record.image_hashes[0]
    assert record_of(client, first.id).sampling["instructions"] == "Answer briefly."
    third = sdk(client).responses.create(model="base", input="Thanks.", previous_response_id=second.id)
    assert [m["role"] for m in fake_vllm.requests[-1]["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert third.output_text
    for key, response_id in ((BOB, first.id), (ALICE, "resp_unknown")):  # another key's answers do not exist
        with pytest.raises(openai.NotFoundError) as missing:
            sdk(client, key).responses.create(model="base", input="Hi", previous_response_id=response_id)
        assert missing.value.body["param"] == "previous_response_id"
    admin = sdk(client, ADMIN).responses.create(model="base", input="Hi", previous_response_id=first.id)
    assert admin.output_text


def test_a_chat_answer_may_be_continued_as_a_response(client, fake_vllm):
    chat = sdk(client).chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}])
    sdk(client).responses.create(model="base", input="Go on.", previous_response_id=chat.id)
    assert fake_vllm.requests[-1]["messages"][:2] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": chat.choices[0].message.content},
    ]


def test_feedback_and_preferences_on_responses_reach_the_trainer_as_pairs(client, store, fake_vllm):
    register(store, fake_vllm)
    url = png_data_url(color=(10, 200, 10))
    base = sdk(client).responses.create(model="base", input=image_input(url))
    pinned = sdk(client).responses.create(model="llava-rlhf@v1", input=image_input(url))
    assert pinned.model == "llava-rlhf@v1" and pinned.output_text == "policy-v1 saw 1 image(s)."
    chat = sdk(client).chat.completions.create(
        model="base", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    )
    for body in (
        {"response_id": base.id, "rating": -1},
        {"response_id": pinned.id, "rating": 1},
        {"response_id": base.id, "correction": "A green square."},
    ):
        assert client.post("/v1/feedback", headers=auth(ALICE), json=body).status_code == 200
    preference = client.post(
        "/v1/preferences", headers=auth(ALICE), json={"response_ids": [base.id, pinned.id], "preferred_id": pinned.id}
    )
    assert preference.json()["adapter_versions"] == ["base", "policy-v1"]
    pairs = build_pairs(stored_events(store), store.get_generation)
    by_source = {pair.source: pair for pair in pairs}
    assert set(by_source) == {"correction", "thumbs", "preference"}
    assert (by_source["preference"].chosen_generation_id, by_source["preference"].rejected_generation_id) == (
        pinned.id,
        base.id,
    )
    assert by_source["thumbs"].chosen == "policy-v1 saw 1 image(s)." and by_source["correction"].chosen == (
        "A green square."
    )
    # the same prompt through chat has the same prompt hash: a response and a chat answer can be compared
    assert record_of(client, chat.id).prompt_hash != record_of(client, base.id).prompt_hash  # (no question text)
    assert record_of(client, pinned.id).prompt_hash == record_of(client, base.id).prompt_hash


def test_a_response_and_a_chat_answer_to_one_prompt_share_the_prompt_hash(client):
    response = sdk(client).responses.create(model="base", input="How many objects are there?")
    chat = sdk(client).chat.completions.create(
        model="base", messages=[{"role": "user", "content": "How many objects are there?"}]
    )
    assert record_of(client, response.id).prompt_hash == record_of(client, chat.id).prompt_hash
    preference = client.post(
        "/v1/preferences", headers=auth(ALICE), json={"response_ids": [response.id, chat.id], "preferred_id": chat.id}
    )
    assert preference.status_code == 200, preference.text


def test_an_answer_cut_by_max_output_tokens_is_incomplete(client, fake_vllm):
    fake_vllm.finish_reason = "length"
    response = sdk(client).responses.create(model="base", input="Hi", max_output_tokens=4)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"
    events = list(sdk(client).responses.create(model="base", input="Hi", max_output_tokens=4, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == response.output_text
    assert record_of(client, response.id).finish_reason == "length"


def test_a_response_stream_that_breaks_ends_with_response_failed(client, fake_vllm):
    fake_vllm.garbled_after_first_word = True
    events = list(sdk(client).responses.create(model="base", input="Hi", stream=True))
    assert [e.type for e in events][-2:] == ["response.output_text.delta", "response.failed"]
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error" and "not JSON" in failed.error.message
    assert record_of(client, failed.id).finish_reason == "error"


def test_responses_sampling_extras_go_to_vllm(client, fake_vllm):
    sdk(client).responses.create(
        model="base", input="Hi", top_p=0.5, extra_body={"top_k": 5, "seed": 3, "n": 4, "messages": []}
    )
    sent = fake_vllm.requests[-1]
    assert (sent["top_p"], sent["top_k"], sent["seed"]) == (0.5, 5, 3)
    assert "n" not in sent and sent["messages"] == [{"role": "user", "content": "Hi"}]  # the translation's own


@pytest.mark.parametrize(
    "body, status, param, fragment",
    [
        ({"model": "base", "input": []}, 400, "input", "at least one message"),
        ({"model": "base"}, 400, "input", "Field required"),
        ({"model": "gpt-4o", "input": "Hi"}, 404, "model", "does not exist"),
        ({"model": "base", "input": "Hi", "max_output_tokens": 100_000}, 400, "max_output_tokens", "at most 256"),
        (
            {"model": "base", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            400,
            "input.0.content.0",
            "file ids are not supported",
        ),
        (
            {"model": "base", "input": image_input("data:image/png;base64,!!!")},
            400,
            "input.0.content.0.image_url",
            "not valid base64",
        ),
        (
            {"model": "base", "input": image_input("http://169.254.169.254/latest/meta-data")},
            400,
            "input.0.content.0.image_url",
            "allow-list",
        ),
        (
            {"model": "base", "input": [{"role": "user", "content": [{"type": "input_audio", "data": "x"}]}]},
            400,
            "input.0.content.0",
            "input_audio",
        ),
        ({"model": "base", "input": "Hi", "tools": [{"type": "web_search"}]}, 400, None, "tools are not supported"),
        ({"model": "base", "input": "Hi", "background": True}, 400, None, "background"),
        ({"model": "base", "input": "Hi", "text": {"format": {"type": "json_object"}}}, 400, "text.format.type", ""),
        ({"model": "base", "input": [{"role": "wizard", "content": "Hi"}]}, 400, "input.0.role", ""),
    ],
)
def test_bad_responses_requests_get_openai_errors(client, fake_vllm, body, status, param, fragment):
    response = client.post("/v1/responses", headers=auth(ALICE), json=body)
    error = assert_openai_error(response, status, fragment)
    if param is not None:
        assert error["param"] == param
    assert fake_vllm.requests == []


def test_too_many_images_across_a_conversation_are_refused(client):
    first = sdk(client).responses.create(model="base", input=image_input(png_data_url()))
    items = image_input(png_data_url((1, 2, 3))) * 4
    response = client.post(
        "/v1/responses",
        headers=auth(ALICE),
        json={"model": "base", "input": items, "previous_response_id": first.id},
    )
    assert assert_openai_error(response, 400, "at most 4 images")["param"].startswith("input.")


# ---- /v1/models/{id} -------------------------------------------------------------------------------------------
def test_models_are_retrieved_by_id(client, store, fake_vllm):
    version = register(store, fake_vllm)
    client_sdk = sdk(client)
    pinned = client_sdk.models.retrieve(f"llava-rlhf@v{version}")  # registered a moment ago
    assert (pinned.id, pinned.object, pinned.owned_by) == ("llava-rlhf@v1", "model", "alignloop")
    assert pinned.model_extra["adapter"]["name"] == "policy-v1"
    assert client_sdk.models.retrieve("base").id == "base"
    assert client_sdk.models.retrieve("shapes-llava").id == "base"  # the base model's served name
    assert client_sdk.models.retrieve("llava-rlhf").id == "llava-rlhf"
    listed = {model.id: model.to_dict() for model in client_sdk.models.list()}
    assert client_sdk.models.retrieve("llava-rlhf@v1").to_dict() == listed["llava-rlhf@v1"]
    for unknown in ("gpt-4", "llava-rlhf@v7", "other@v1"):
        with pytest.raises(openai.NotFoundError) as missing:
            client_sdk.models.retrieve(unknown)
        assert missing.value.body == {
            "message": f"The model `{unknown}` does not exist.",
            "type": "not_found_error",
            "param": "model",
            "code": "model_not_found",
        }
    assert client.get("/v1/models/base").status_code == 401


# ---- n > 1 -----------------------------------------------------------------------------------------------------
def test_every_choice_of_n_is_recorded_and_can_be_rated_and_compared(client, fake_vllm, store):
    completion = sdk(client).chat.completions.create(
        model="llava-rlhf", messages=[{"role": "user", "content": "Hi"}], n=3, temperature=1.0
    )
    texts = [choice.message.content for choice in completion.choices]
    assert texts == [
        "shapes-llava saw 0 image(s).",
        "shapes-llava saw 0 image(s), take 2.",
        "shapes-llava saw 0 image(s), take 3.",
    ]
    sent = fake_vllm.requests[-1]
    assert sent["n"] == 3 and sent["return_token_ids"] is True  # for each choice's token count
    assert (
        "token_ids" not in completion.choices[0].model_extra and completion.model_extra.get("prompt_token_ids") is None
    )
    ids = [choice_record_id(completion.id, index) for index in range(3)]
    assert ids[0] == completion.id and ids[2] == f"{completion.id}-2"
    records = [record_of(client, record_id) for record_id in ids]
    assert [r.response for r in records] == texts and [r.completion_tokens for r in records] == [4, 6, 6]
    assert len({r.prompt_hash for r in records}) == 1 and records[1].sampling["n"] == 3
    assert "return_token_ids" not in records[0].sampling
    for record_id, rating in ((ids[0], -1), (ids[1], 1)):
        rated = client.post("/v1/feedback", headers=auth(ALICE), json={"response_id": record_id, "rating": rating})
        assert rated.status_code == 200, rated.text
    preferred = client.post(
        "/v1/preferences", headers=auth(ALICE), json={"response_ids": [ids[2], ids[0]], "preferred_id": ids[2]}
    )
    assert preferred.status_code == 200, preferred.text
    pairs = {
        (p.source, p.chosen_generation_id, p.rejected_generation_id)
        for p in build_pairs(stored_events(store), store.get_generation)
    }
    assert pairs == {("thumbs", ids[1], ids[0]), ("preference", ids[2], ids[0])}


def test_streamed_choices_are_recorded_each(client):
    stream = sdk(client).chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": "Hi"}],
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            assert "token_ids" not in (choice.model_extra or {})
    assert texts == {0: "shapes-llava saw 0 image(s).", 1: "shapes-llava saw 0 image(s), take 2."}
    assert chunks[-1].usage.completion_tokens == 10
    records = [record_of(client, choice_record_id(chunks[0].id, index)) for index in (0, 1)]
    assert [r.response for r in records] == [texts[0], texts[1]] and [r.completion_tokens for r in records] == [4, 6]
    assert all(r.finish_reason == "stop" for r in records)


def test_token_ids_the_client_asked_for_stay(client):
    completion = sdk(client).chat.completions.create(
        model="base", messages=[{"role": "user", "content": "Hi"}], n=2, extra_body={"return_token_ids": True}
    )
    assert completion.choices[1].model_extra["token_ids"] == [0, 1, 2, 3, 4, 5]


# ---- /v1/completions -------------------------------------------------------------------------------------------
def test_plain_text_completions_are_passed_through_and_recorded(client, fake_vllm, store):
    completion = sdk(client).completions.create(model="llava-rlhf", prompt="There is a", max_tokens=6, temperature=0)
    assert completion.choices[0].text == " and shapes-llava went on." and completion.model == "base"
    assert completion.system_fingerprint == "base"
    sent = fake_vllm.requests[-1]
    assert (sent["prompt"], sent["max_tokens"], sent["model"]) == ("There is a", 6, "shapes-llava")
    record = record_of(client, completion.id)
    assert (record.prompt, record.messages, record.response) == ("There is a", [], completion.choices[0].text)
    assert record.question == "There is a" and record.sampling["max_tokens"] == 6
    streamed = list(sdk(client).completions.create(model="base", prompt="There is a", stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == completion.choices[0].text
    assert record_of(client, streamed[0].id).response == completion.choices[0].text
    two = sdk(client).completions.create(model="base", prompt="There is a", n=2)
    assert [c.text for c in two.choices] == [" and shapes-llava went on.", " and shapes-llava went on, take 2."]
    assert record_of(client, f"{two.id}-1").response == two.choices[1].text
    # rated like any answer, but a raw text prompt never becomes a training pair
    for record_id, rating in ((two.id, -1), (f"{two.id}-1", 1)):
        assert (
            client.post(
                "/v1/feedback", headers=auth(ALICE), json={"response_id": record_id, "rating": rating}
            ).status_code
            == 200
        )
    assert build_pairs(stored_events(store), store.get_generation) == []


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"model": "base", "prompt": ["a", "b"]}, 400, "one string"),
        ({"model": "base", "prompt": [1, 2, 3]}, 400, "one string"),
        ({"model": "base"}, 400, "prompt"),
        ({"model": "base", "prompt": "x", "max_tokens": 100_000}, 400, "at most 256"),
        ({"model": "base", "prompt": "x", "n": 99}, 400, "n"),
        ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
    ],
)
def test_bad_completions_requests_get_openai_errors(client, body, status, fragment):
    assert_openai_error(client.post("/v1/completions", headers=auth(ALICE), json=body), status, fragment)


def test_a_previous_response_id_of_a_raw_completion_is_not_a_conversation(client):
    completion = sdk(client).completions.create(model="base", prompt="There is a")
    response = client.post(
        "/v1/responses",
        headers=auth(ALICE),
        json={"model": "base", "input": "Hi", "previous_response_id": completion.id},
    )
    assert_openai_error(response, 404, "No response", param="previous_response_id")


def test_concurrency_slots_come_back_after_every_new_endpoint(client):
    for path, body in (
        ("/v1/responses", {"model": "base", "input": "Hi", "stream": True}),
        ("/v1/responses", {"model": "base", "input": "Hi"}),
        ("/v1/completions", {"model": "base", "prompt": "Hi", "stream": True}),
        ("/v1/responses", {"model": "base", "input": [], "stream": True}),
    ):
        client.post(path, headers=auth(ALICE), json=body)
    wait_until(lambda: client.app.state.concurrency.in_flight == {})
    assert json.dumps(client.app.openapi())  # the OpenAPI document still renders
