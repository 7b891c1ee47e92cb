"""The gateway on a fake vLLM: OpenAI compatibility, version routing, records, feedback, admin, auth and limits.

The upstream is `FakeVLLM`, so these tests check the gateway's own logic fast; tests/integration runs the same
paths against the real vLLM server on the bundled model.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from online_rl.schema import AdapterVersion, adapter_name
from tests.serve.conftest import ADMIN, ALICE, BOB, auth, image_question, make_client, png_data_url, wait_until


def sdk(client, key: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)


def register(store, fake_vllm, promote: bool = False) -> int:
    version = store.allocate_adapter_version()
    store.register_adapter(
        AdapterVersion(version=version, name=adapter_name(version), path=f"adapters/policy-v{version}", algorithm="dpo")
    )
    fake_vllm.adapters.add(adapter_name(version))
    if promote:
        store.promote("llava-rlhf", version)
    return version


def record_of(client, response_id: str):
    """The stored generation record, once the background writer has written it."""
    return wait_until(lambda: client.app.state.store.get_generation(response_id))


# ---- chat completions ------------------------------------------------------------------------------------------
def test_the_openai_sdk_gets_an_answer_from_the_base_model(client, fake_vllm):
    raw = sdk(client).chat.completions.with_raw_response.create(
        model="llava-rlhf", messages=image_question(png_data_url()), max_tokens=8, temperature=0
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "shapes-llava saw 1 image(s)."
    assert completion.model == "base" and completion.system_fingerprint == "base"
    assert raw.headers["x-alignloop-adapter"] == "base"
    sent = fake_vllm.requests[-1]
    assert sent["model"] == "shapes-llava" and sent["max_tokens"] == 8 and sent["temperature"] == 0
    assert sent["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "user" not in sent


def test_a_streamed_answer_arrives_in_chunks_and_is_recorded(client):
    stream = sdk(client).chat.completions.create(
        model="llava-rlhf", messages=image_question(png_data_url()), stream=True, user="end-user-7"
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "shapes-llava saw 1 image(s)." and len(chunks) > 3
    assert all(c.usage is None for c in chunks)  # usage only when the client asks for it
    record = record_of(client, chunks[0].id)
    assert record.response == text and record.finish_reason == "stop" and record.completion_tokens == 4
    assert record.client == "api" and record.alias == "llava-rlhf" and record.adapter_version is None
    image_ref = record.messages[0]["content"][0]["image_url"]["url"]
    assert image_ref.startswith("sha256:") and client.app.state.store.get_image(image_ref[7:]) is not None
    assert "end-user-7" not in record.user_id and record.user_id.startswith("u-")


def test_usage_is_streamed_when_asked_for(client):
    chunks = list(
        sdk(client).chat.completions.create(
            model="llava-rlhf",
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].choices == []


def test_a_stream_that_breaks_midway_ends_with_an_error_event_and_is_recorded_as_failed(client, fake_vllm):
    fake_vllm.garbled_after_first_word = True
    body = {"model": "llava-rlhf", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    with client.stream("POST", "/v1/chat/completions", headers=auth(ALICE), json=body) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert response.status_code == 200
    assert [e["choices"][0]["delta"].get("content") for e in events[:2]] == ["", "shapes-llava"]
    assert events[2] == {
        "error": {
            "message": "the model server failed mid-stream: an event that is not JSON",
            "type": "server_error",
            "param": None,
            "code": "upstream_error",
        }
    }
    assert len(events) == 3  # no [DONE]: the answer did not finish
    record = record_of(client, events[0]["id"])
    assert record.finish_reason == "error" and record.response == "shapes-llava"


@pytest.mark.anyio
async def test_the_async_sdk_works_unchanged(settings, fake_vllm):
    import asyncio

    from serve.app import create_app

    app = create_app(settings, upstream_transport=httpx.ASGITransport(fake_vllm.app))
    async with app.router.lifespan_context(app):
        while not app.state.pool.any_healthy:
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://testserver") as http:
            async_sdk = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key=ALICE, http_client=http)
            completion = await async_sdk.chat.completions.create(
                model="base", messages=[{"role": "user", "content": "Hi"}]
            )
            assert completion.choices[0].message.content == "shapes-llava saw 0 image(s)."
            stream = await async_sdk.chat.completions.create(
                model="base", messages=[{"role": "user", "content": "Hi"}], stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text == "shapes-llava saw 0 image(s)."


def test_pinned_versions_and_the_promoted_alias(client, fake_vllm, store):
    version = register(store, fake_vllm)
    pinned = sdk(client).chat.completions.with_raw_response.create(
        model=f"llava-rlhf@v{version}", messages=[{"role": "user", "content": "Hi"}]
    )
    assert pinned.parse().choices[0].message.content == "policy-v1 saw 0 image(s)."
    assert pinned.headers["x-alignloop-adapter"] == "policy-v1" and pinned.parse().model == "llava-rlhf@v1"
    store.promote("llava-rlhf", version)
    answer = wait_until(
        lambda: (
            sdk(client)
            .chat.completions.create(model="llava-rlhf", messages=[{"role": "user", "content": "Hi"}])
            .system_fingerprint
            == "policy-v1"
        )
    )
    assert answer
    models = [m.id for m in sdk(client).models.list().data]
    assert models == ["llava-rlhf", "base", "llava-rlhf@v1"]


def test_a_canary_takes_its_share_of_unpinned_traffic(client, fake_vllm, store):
    register(store, fake_vllm, promote=True)
    canary = register(store, fake_vllm)
    response = client.post(
        "/v1/admin/aliases/llava-rlhf/canary", json={"version": canary, "fraction": 1.0}, headers=auth(ADMIN)
    )
    assert response.status_code == 200
    fingerprints = {
        sdk(client)
        .chat.completions.create(model="llava-rlhf", messages=[{"role": "user", "content": "Hi"}])
        .system_fingerprint
        for _ in range(5)
    }
    assert fingerprints == {"policy-v2"}
    client.post("/v1/admin/aliases/llava-rlhf/canary", json={"version": None, "fraction": 0}, headers=auth(ADMIN))
    assert (
        sdk(client)
        .chat.completions.create(model="llava-rlhf", messages=[{"role": "user", "content": "Hi"}])
        .system_fingerprint
        == "policy-v1"
    )


def test_other_fields_are_passed_through_to_vllm(client, fake_vllm):
    sdk(client).chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": "Hi"}],
        seed=3,
        top_p=0.5,
        extra_body={"top_k": 5, "repetition_penalty": 1.1},
    )
    sent = fake_vllm.requests[-1]
    assert (sent["seed"], sent["top_p"], sent["top_k"], sent["repetition_penalty"]) == (3, 0.5, 5, 1.1)


# ---- bad input ---------------------------------------------------------------------------------------------------
def assert_openai_error(response: httpx.Response, status: int, fragment: str, param: str | None = "<any>") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"], error
    if param != "<any>":
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    "body, content_type, status, fragment",
    [
        (b"{not json", "application/json", 400, "could not parse the JSON"),
        (b'{"model": "base"}', "application/json", 400, "messages"),
        (b'{"model": "base", "messages": []}', "application/json", 400, "messages"),
        (b'{"model": "base", "messages": [{"role": "user", "content": "x"}]}', "text/plain", 415, "application/json"),
        (b'{"model": "base", "messages": [{"role": "wizard", "content": "x"}]}', "application/json", 400, "role"),
        (
            b'{"model": "base", "n": 9, "messages": [{"role": "user", "content": "x"}]}',
            "application/json",
            400,
            "less than or equal to 8",
        ),
    ],
)
def test_malformed_requests_get_a_400_in_openai_shape(client, body, content_type, status, fragment):
    response = client.post("/v1/chat/completions", content=body, headers={**auth(ALICE), "Content-Type": content_type})
    assert_openai_error(response, status, fragment)
    assert client.get("/health").status_code == 200


def test_unknown_models_and_versions_are_404(client):
    for model in ("gpt-4", "llava-rlhf@v9"):
        response = client.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "x"}]},
            headers=auth(ALICE),
        )
        assert assert_openai_error(response, 404, model, param="model")["code"] == "model_not_found"


def test_keys_are_checked(client):
    body = {"model": "base", "messages": [{"role": "user", "content": "x"}]}
    assert_openai_error(client.post("/v1/chat/completions", json=body), 401, "didn't provide an API key")
    assert_openai_error(
        client.post("/v1/chat/completions", json=body, headers=auth("sk-wrong")), 401, "Incorrect API key"
    )
    assert_openai_error(client.get("/v1/admin/adapters", headers=auth(ALICE)), 403, "admin key")
    assert client.get("/v1/admin/adapters", headers=auth(ADMIN)).status_code == 200


def test_token_limits(client):
    for field in ("max_tokens", "max_completion_tokens"):
        response = client.post(
            "/v1/chat/completions",
            headers=auth(ALICE),
            json={"model": "base", "messages": [{"role": "user", "content": "x"}], field: 100_000},
        )
        assert_openai_error(response, 400, "at most 256", param=field)


@pytest.mark.parametrize(
    "url, status, fragment",
    [
        ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA", 400, "broken or truncated"),
        ("data:image/png;base64,!!!notbase64", 400, "not valid base64"),
        ("data:text/plain,hello", 400, "data:image/png;base64"),
        (png_data_url(size=(5000, 5000)), 400, "the limit is 16777216 pixels"),
        ("data:image/png;base64," + "A" * 12_000_000, 413, "over the limit"),
        ("http://169.254.169.254/latest/meta-data", 400, "not on this server's allow-list"),
        ("http://localhost:6379/", 400, "not on this server's allow-list"),
        ("file:///etc/passwd", 400, "data: URL or an http(s) URL"),
    ],
)
def test_bad_images_are_refused_and_nothing_is_forwarded(client, fake_vllm, url, status, fragment):
    response = client.post(
        "/v1/chat/completions", headers=auth(ALICE), json={"model": "base", "messages": image_question(url)}
    )
    error = assert_openai_error(response, status, fragment)
    assert error["param"] == "messages.0.content.0.image_url.url" and fake_vllm.requests == []


def test_a_decompression_bomb_is_refused_from_its_header(client):
    import zlib

    # A valid PNG header claiming 30000x30000 pixels with a tiny compressed body: never decoded.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = (30000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )
    import base64

    url = "data:image/png;base64," + base64.b64encode(png).decode()
    response = client.post(
        "/v1/chat/completions", headers=auth(ALICE), json={"model": "base", "messages": image_question(url)}
    )
    assert_openai_error(response, 400, "decompression bomb")


def test_allow_listed_image_hosts_are_fetched_without_redirects(settings, fake_vllm):
    import base64

    png = base64.b64decode(png_data_url().split(",", 1)[1])

    def image_host(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/redirect":
            return httpx.Response(302, headers={"Location": "http://169.254.169.254/"})
        return httpx.Response(200, content=png, headers={"Content-Type": "image/png"})

    with make_client(settings, fake_vllm, image_transport=httpx.MockTransport(image_host)) as client:
        wait_until(lambda: client.get("/ready").status_code == 200)
        ok = client.post(
            "/v1/chat/completions",
            headers=auth(ALICE),
            json={"model": "base", "messages": image_question("https://images.example.com/a.png")},
        )
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "shapes-llava saw 1 image(s)."
        sent = fake_vllm.requests[-1]["messages"][0]["content"][0]["image_url"]["url"]
        assert sent.startswith("data:image/png;base64,")  # vLLM never fetches anything itself
        redirected = client.post(
            "/v1/chat/completions",
            headers=auth(ALICE),
            json={"model": "base", "messages": image_question("https://images.example.com/redirect")},
        )
        assert_openai_error(redirected, 400, "redirects are not followed")


def test_oversized_bodies_are_refused(settings, fake_vllm):
    settings = settings.model_copy(update={"max_body_bytes": 2000})
    with make_client(settings, fake_vllm) as client:
        response = client.post(
            "/v1/chat/completions",
            headers=auth(ALICE),
            json={"model": "base", "messages": [{"role": "user", "content": "x" * 5000}]},
        )
        assert_openai_error(response, 413, "over the limit of 2000 bytes")


def test_rate_limits_and_concurrency_caps_answer_429(settings, fake_vllm):
    settings = settings.model_copy(update={"rate_limit_per_minute": 2})
    with make_client(settings, fake_vllm) as client:
        wait_until(lambda: client.get("/ready").status_code == 200)
        body = {"model": "base", "messages": [{"role": "user", "content": "x"}]}
        assert [client.post("/v1/chat/completions", json=body, headers=auth(ALICE)).status_code for _ in range(2)] == [
            200,
            200,
        ]
        limited = client.post("/v1/chat/completions", json=body, headers=auth(ALICE))
        assert_openai_error(limited, 429, "Rate limit")
        assert limited.headers["Retry-After"]
        assert client.post("/v1/chat/completions", json=body, headers=auth(BOB)).status_code == 200  # per key


def test_finished_requests_give_their_concurrency_slot_back(settings, fake_vllm):
    """The per-key cap counts requests in flight: many finished ones, streamed or not, never use it up."""
    settings = settings.model_copy(update={"max_concurrent_per_key": 2})
    with make_client(settings, fake_vllm) as client:
        wait_until(lambda: client.get("/ready").status_code == 200)
        body = {"model": "base", "messages": [{"role": "user", "content": "x"}]}
        for stream in (False, True, False):
            codes = [
                client.post("/v1/chat/completions", json={**body, "stream": stream}, headers=auth(ALICE)).status_code
                for _ in range(5)
            ]
            assert codes == [200] * 5
        fake_vllm.fail_with = 500  # failed requests give it back too
        assert [client.post("/v1/chat/completions", json=body, headers=auth(ALICE)).status_code for _ in range(3)] == [
            502
        ] * 3
        fake_vllm.fail_with = None
        assert client.post("/v1/chat/completions", json=body, headers=auth(ALICE)).status_code == 200
        assert client.app.state.concurrency.in_flight == {}  # nothing left counted


def test_upstream_failures_become_502_and_503(client, fake_vllm):
    body = {"model": "base", "messages": [{"role": "user", "content": "x"}]}
    fake_vllm.fail_with = 500
    assert_openai_error(client.post("/v1/chat/completions", json=body, headers=auth(ALICE)), 502, "engine exploded")
    fake_vllm.fail_with = None
    fake_vllm.healthy = False
    wait_until(lambda: client.get("/ready").status_code == 503)
    assert_openai_error(client.post("/v1/chat/completions", json=body, headers=auth(ALICE)), 503, "not ready")
    fake_vllm.healthy = True
    wait_until(lambda: client.get("/ready").status_code == 200)
    assert client.post("/v1/chat/completions", json=body, headers=auth(ALICE)).status_code == 200


# ---- feedback ----------------------------------------------------------------------------------------------------
def ask(client, key: str = ALICE, model: str = "llava-rlhf", url: str | None = None) -> str:
    messages = image_question(url or png_data_url())
    return sdk(client, key).chat.completions.create(model=model, messages=messages).id


def test_the_feedback_round_trip(client, store, fake_vllm):
    register(store, fake_vllm, promote=True)
    answer = wait_until(
        lambda: (
            (
                c := sdk(client).chat.completions.create(model="llava-rlhf", messages=image_question(png_data_url()))
            ).system_fingerprint
            == "policy-v1"
            and c
        )
    )
    response_id = answer.id
    sent = client.post(
        "/v1/feedback",
        headers=auth(ALICE),
        json={"response_id": response_id, "rating": -1, "correction": "Red.", "comment": "wrong"},
    )
    assert sent.status_code == 200, sent.text
    body = sent.json()
    assert body["object"] == "feedback" and body["rating"] == -1 and body["adapter_version"] == "policy-v1"
    assert client.get(f"/v1/feedback/{body['id']}", headers=auth(ALICE)).json() == body
    assert_openai_error(client.get(f"/v1/feedback/{body['id']}", headers=auth(BOB)), 404, "No feedback")
    assert client.get(f"/v1/feedback/{body['id']}", headers=auth(ADMIN)).json() == body
    (event,) = store.events_for_generation(response_id)
    assert (event.rating, event.correction, event.adapter_version) == (-1, "Red.", 1)
    metrics = client.get("/metrics").text
    assert 'alignloop_thumbs_total{adapter="policy-v1",rating="down"} 1.0' in metrics
    assert "alignloop_thumbs_up_rate" not in metrics  # a per-process ratio; the rate is PromQL over the counters


def test_feedback_right_after_the_answer_waits_for_its_record(client, store):
    for _ in range(5):
        response_id = ask(client)  # no waiting for the background write
        assert (
            client.post("/v1/feedback", headers=auth(ALICE), json={"response_id": response_id, "rating": 1}).status_code
            == 200
        )


def test_feedback_is_checked(client):
    response_id = ask(client)
    record_of(client, response_id)
    cases = [
        ({"response_id": "chatcmpl-unknown", "rating": 1}, ALICE, 404, "chatcmpl-unknown"),
        ({"response_id": response_id, "rating": 1}, BOB, 404, "made with this API key"),
        ({"response_id": response_id, "rating": 5}, ALICE, 400, "rating must be"),
        ({"response_id": response_id, "rating": True}, ALICE, 400, "rating must be"),
        ({"response_id": response_id}, ALICE, 400, "needs a rating"),
        ({"response_id": response_id, "correction": "x" * 4001}, ALICE, 400, "4000"),
        ({"response_id": response_id, "rating": 1, "extra": 1}, ALICE, 400, "Extra inputs"),
    ]
    for body, key, status, fragment in cases:
        assert_openai_error(client.post("/v1/feedback", json=body, headers=auth(key)), status, fragment)
    assert client.app.state.store.count_events() == 0


def test_an_idempotency_key_makes_a_retry_harmless(client, store):
    response_id = ask(client)
    first = client.post(
        "/v1/feedback",
        json={"response_id": response_id, "rating": 1},
        headers={**auth(ALICE), "Idempotency-Key": "click-1"},
    )
    again = client.post(
        "/v1/feedback",
        json={"response_id": response_id, "rating": 1},
        headers={**auth(ALICE), "Idempotency-Key": "click-1"},
    )
    assert first.json()["id"] == again.json()["id"] and store.count_events() == 1
    clash = client.post(
        "/v1/feedback",
        json={"response_id": response_id, "rating": -1},
        headers={**auth(ALICE), "Idempotency-Key": "click-1"},
    )
    assert_openai_error(clash, 409, "idempotency key", param="idempotency_key")


def test_preferences_and_facts(client, store, fake_vllm):
    register(store, fake_vllm)
    url = png_data_url(color=(10, 200, 10))
    a, b = ask(client, model="base", url=url), ask(client, model="llava-rlhf@v1", url=url)
    preference = client.post("/v1/preferences", headers=auth(ALICE), json={"response_ids": [a, b], "preferred_id": b})
    assert preference.status_code == 200, preference.text
    assert preference.json()["adapter_versions"] == ["base", "policy-v1"]
    assert_openai_error(
        client.post("/v1/preferences", headers=auth(ALICE), json={"response_ids": [a, a], "preferred_id": a}),
        400,
        "two different",
    )
    sha = record_of(client, a).image_hashes[0]
    facts = client.post(
        f"/v1/images/{sha}/facts", headers=auth(ALICE), json={"caption": "A green square.", "facts": ["One object."]}
    )
    assert facts.status_code == 200 and facts.json()["image_sha256"] == sha
    assert [f.caption for f in store.get_facts(sha)] == ["A green square."]
    assert_openai_error(
        client.post(f"/v1/images/{sha}/facts", headers=auth(BOB), json={"caption": "x"}), 404, "with this API key"
    )
    assert_openai_error(
        client.post("/v1/images/nothex/facts", headers=auth(ALICE), json={"caption": "x"}), 400, "sha256"
    )


# ---- admin and hot-swap ------------------------------------------------------------------------------------------
def test_admin_promotes_with_compare_and_set_and_rolls_back(client, store, fake_vllm):
    v1, v2 = register(store, fake_vllm), register(store, fake_vllm)
    promote = client.post(
        "/v1/admin/aliases/llava-rlhf/promote",
        headers=auth(ADMIN),
        json={"version": v1, "check_expected": True, "expected_version": None},
    )
    assert promote.status_code == 200 and promote.json()["to_version"] == v1
    conflict = client.post(
        "/v1/admin/aliases/llava-rlhf/promote",
        headers=auth(ADMIN),
        json={"version": v2, "check_expected": True, "expected_version": None},
    )
    assert_openai_error(conflict, 409, "serves version 1")
    client.post("/v1/admin/aliases/llava-rlhf/promote", headers=auth(ADMIN), json={"version": v2})
    # The replica that took the admin call swaps at once.
    assert (
        sdk(client)
        .chat.completions.create(model="llava-rlhf", messages=[{"role": "user", "content": "x"}])
        .system_fingerprint
        == "policy-v2"
    )
    back = client.post("/v1/admin/aliases/llava-rlhf/rollback", headers=auth(ADMIN), json={"reason": "worse"})
    assert back.json()["to_version"] == v1
    registry = client.get("/v1/admin/adapters", headers=auth(ADMIN)).json()
    assert registry["aliases"] == {"llava-rlhf": 1} and [a["status"] for a in registry["data"]] == [
        "promoted",
        "retired",
    ]
    history = client.get("/v1/admin/aliases/llava-rlhf/history", headers=auth(ADMIN)).json()["data"]
    assert [(h["action"], h["to_version"], h["actor"]) for h in history] == [
        ("promote", 1, "admin"),
        ("promote", 2, "admin"),
        ("rollback", 1, "admin"),
    ]
    metrics = client.get("/metrics").text
    assert 'alignloop_current_version{alias="llava-rlhf"} 1.0' in metrics
    swaps = [line for line in metrics.splitlines() if line.startswith("alignloop_swap_events_total")]
    assert swaps == ['alignloop_swap_events_total{action="move",alias="llava-rlhf"} 3.0']


def test_any_key_sees_the_version_overview(client, store, fake_vllm):
    empty = client.get("/v1/versions", headers=auth(BOB)).json()
    assert empty["current"] == "base" and empty["current_version"] is None and empty["data"] == []
    ask(client)  # feedback before the promotion does not count for the new version
    client.post("/v1/feedback", headers=auth(ALICE), json={"response_id": ask(client), "rating": 1})
    v1 = register(store, fake_vllm)
    store.update_adapter(v1, metrics={"pope_random_accuracy": 0.9})
    v2 = register(store, fake_vllm, promote=True)
    client.post("/v1/feedback", headers=auth(ALICE), json={"response_id": ask(client), "rating": -1})
    overview = client.get("/v1/versions", headers=auth(BOB), params={"recent": 1}).json()
    assert overview["current"] == "policy-v2" and overview["current_version"] == v2
    assert overview["feedback_since_promotion"] == 1
    assert [(v["model"], v["status"]) for v in overview["data"]] == [("llava-rlhf@v2", "promoted")]
    everything = client.get("/v1/versions", headers=auth(ALICE)).json()["data"]
    assert everything[0]["metrics"] == {"pope_random_accuracy": 0.9}
    assert_openai_error(client.get("/v1/versions", params={"recent": 1000}, headers=auth(ALICE)), 400, "recent")
    assert client.get("/v1/versions").status_code == 401


def test_admin_deletes_a_users_data(client, store):
    response_id = ask(client)
    record = record_of(client, response_id)
    client.post("/v1/feedback", headers=auth(ALICE), json={"response_id": response_id, "rating": 1})
    deleted = client.delete(f"/v1/admin/users/{record.user_id}", headers=auth(ADMIN))
    assert deleted.json()["deleted"] == {"generations": 1, "events": 1, "images": 1, "facts": 0}
    assert store.get_generation(response_id) is None


def test_every_error_has_the_openai_shape(client):
    assert_openai_error(client.get("/v1/nothing", headers=auth(ALICE)), 404, "Not found")
    assert_openai_error(client.put("/v1/chat/completions", headers=auth(ALICE)), 405, "Method Not Allowed")


def test_health_ready_and_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["upstreams"] == ["http://fake-vllm"]
    ask(client)
    text = client.get("/metrics").text
    for name in (
        "alignloop_requests_total",
        "alignloop_time_to_first_token_seconds",
        "alignloop_request_latency_seconds",
        "alignloop_prompt_tokens_total",
        "alignloop_completion_tokens_total",
        "alignloop_record_write_failures",
        "alignloop_registry_revision",
    ):
        assert name in text
    assert 'alignloop_requests_total{adapter="base",status="200"}' in text
    json.dumps(client.app.openapi())  # the OpenAPI document renders
