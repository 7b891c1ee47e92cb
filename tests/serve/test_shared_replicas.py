"""N gateway replicas on one Redis store behave as one: two app instances in this process, each with its own record
writer and its own limiters, in front of one fake vLLM, sharing a real Redis.

- Feedback (and facts about the image) sent to replica B right after replica A answered finds the answer, though A
  writes its record in the background, after the last byte (here slowed down so that B certainly asks first).
- A key allowed N requests a minute gets N in all across both replicas, not 2N; the service key is not rate-limited.
- At most `max_concurrent_per_key` requests of a key are in flight across both; a replica that dies holding slots
  frees them when their leases expire.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis
from pydantic import SecretStr

from serve.auth import RateLimiter
from serve.protocol import APIError
from serve.shared_limits import SharedConcurrencyLimiter
from tests.serve.conftest import ALICE, BOB, auth, image_question, make_client, png_data_url, wait_until

SERVICE = "service-0123456789abcdef0123"


def ask(client, key: str = ALICE):
    return client.post(
        "/v1/chat/completions",
        headers=auth(key),
        json={"model": "llava-rlhf", "messages": image_question(png_data_url())},
    )


@pytest.fixture
def replica_settings(settings, redis_store_url):
    return settings.model_copy(
        update={"store_url": redis_store_url, "service_key": SecretStr(SERVICE), "alias_poll_interval_s": 30.0}
    )


def slow_record_writes(client, seconds: float) -> None:
    """Replica A's record writer takes `seconds` for each generation record (a busy store, a long queue)."""
    store = client.app.state.chat.recorder.store
    add = store.add_generation

    def slow(record):
        time.sleep(seconds)
        add(record)

    store.add_generation = slow


def test_feedback_on_one_replica_finds_the_answer_another_replica_gave(replica_settings, fake_vllm):
    with make_client(replica_settings, fake_vllm) as a, make_client(replica_settings, fake_vllm) as b:
        for replica in (a, b):
            wait_until(lambda replica=replica: replica.get("/ready").status_code == 200)
        slow_record_writes(a, 0.5)
        for _ in range(3):
            answer = ask(a)
            assert answer.status_code == 200, answer.text
            response_id = answer.json()["id"]
            assert b.app.state.store.get_generation(response_id) is None  # not written yet when B is asked
            feedback = b.post("/v1/feedback", headers=auth(ALICE), json={"response_id": response_id, "rating": 1})
            assert feedback.status_code == 200, feedback.text
            assert feedback.json()["response_id"] == response_id
        # Facts about the image of an answer another replica gave are found the same way.
        answer = a.post(
            "/v1/chat/completions",
            headers=auth(ALICE),
            json={"model": "llava-rlhf", "messages": image_question(png_data_url(color=(1, 99, 7)))},
        )
        sha = answer.headers["x-alignloop-images"]
        facts = b.post(f"/v1/images/{sha}/facts", headers=auth(ALICE), json={"facts": ["A green square."]})
        assert facts.status_code == 200, facts.text
        # Another key still cannot rate it, and an id no replica gave is a 404 after the bounded wait.
        other = b.post("/v1/feedback", headers=auth(BOB), json={"response_id": response_id, "rating": -1})
        assert other.status_code == 404
        started = time.monotonic()
        unknown = b.post("/v1/feedback", headers=auth(ALICE), json={"response_id": "chatcmpl-nobody", "rating": 1})
        assert unknown.status_code == 404
        assert 2.5 <= time.monotonic() - started < 6.0  # feedback_wait_s = 3


def test_without_the_wait_the_race_is_lost(replica_settings, fake_vllm):
    """The control: with feedback_wait_s = 0, B answers 404 for an answer A has not written yet."""
    settings = replica_settings.model_copy(update={"feedback_wait_s": 0.0})
    with make_client(settings, fake_vllm) as a, make_client(settings, fake_vllm) as b:
        for replica in (a, b):
            wait_until(lambda replica=replica: replica.get("/ready").status_code == 200)
        slow_record_writes(a, 0.5)
        response_id = ask(a).json()["id"]
        feedback = b.post("/v1/feedback", headers=auth(ALICE), json={"response_id": response_id, "rating": 1})
        assert feedback.status_code == 404


def test_a_key_limited_to_n_a_minute_gets_n_across_both_replicas(replica_settings, fake_vllm):
    settings = replica_settings.model_copy(update={"rate_limit_per_minute": 5})
    with make_client(settings, fake_vllm) as a, make_client(settings, fake_vllm) as b:
        for replica in (a, b):
            wait_until(lambda replica=replica: replica.get("/ready").status_code == 200)
        statuses = [ask(replica).status_code for _ in range(6) for replica in (a, b)]
        assert statuses.count(200) == 5 and statuses.count(429) == 7  # N in all, not 2N
        limited = ask(a)
        assert limited.json()["error"]["code"] == "rate_limit_exceeded" and int(limited.headers["Retry-After"]) >= 1
        assert ask(b, BOB).status_code == 200  # per key: Bob has his own N
        assert all(ask(replica, SERVICE).status_code == 200 for replica in (a, b) for _ in range(4))  # no user limit


def test_the_in_process_limiter_is_kept_for_one_gateway(settings, fake_vllm):
    with make_client(settings, fake_vllm) as client:
        assert isinstance(client.app.state.rate_limiter, RateLimiter)


def test_concurrency_slots_are_shared_and_a_dead_replicas_slots_expire(redis_url):
    async def scenario() -> None:
        prefix = f"alignloop-test-{time.time_ns()}"
        pools = [redis.asyncio.ConnectionPool.from_url(redis_url) for _ in range(3)]
        a, b = (SharedConcurrencyLimiter(pool, prefix, limit=2, lease_s=0.6) for pool in pools[:2])
        dead = SharedConcurrencyLimiter(pools[2], prefix, limit=2, lease_s=0.6)
        renewing = asyncio.create_task(a.renew_forever())
        try:
            await a.acquire("k-1")
            await a.acquire("k-1")
            with pytest.raises(APIError) as refused:
                await b.acquire("k-1")  # two in flight on A: B may not start a third
            assert refused.value.status == 429 and refused.value.code == "concurrency_limit_exceeded"
            await b.acquire("k-2")  # another key has its own slots
            await asyncio.sleep(1.5)  # > lease: A renews its leases, so they hold
            with pytest.raises(APIError):
                await b.acquire("k-1")
            a.release("k-1")
            await asyncio.sleep(0.05)
            await b.acquire("k-1")  # the slot A released
            assert a.in_flight == {"k-1": [a.in_flight["k-1"][0]]} and list(b.in_flight) == ["k-2", "k-1"]

            await dead.acquire("k-3")
            await dead.acquire("k-3")  # ... and the replica dies: nothing renews or releases these
            with pytest.raises(APIError):
                await b.acquire("k-3")
            await asyncio.sleep(0.8)
            await b.acquire("k-3")  # its leases expired
        finally:
            renewing.cancel()
            client = redis.asyncio.Redis(connection_pool=pools[0])
            keys = [key async for key in client.scan_iter(f"{prefix}:*")]
            if keys:
                await client.delete(*keys)
            for limiter in (a, b, dead):
                await limiter.aclose()

    asyncio.run(scenario())


def test_concurrency_across_replicas_through_the_api(replica_settings, fake_vllm):
    """Streams held open on replica A use the key's slots, and replica B refuses the next request."""
    settings = replica_settings.model_copy(update={"max_concurrent_per_key": 2})
    fake_vllm.token_delay_s = 0.3
    with make_client(settings, fake_vllm) as a, make_client(settings, fake_vllm) as b:
        for replica in (a, b):
            wait_until(lambda replica=replica: replica.get("/ready").status_code == 200)
        body = {"model": "llava-rlhf", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
        done = []

        def stream() -> None:
            done.append(a.post("/v1/chat/completions", headers=auth(ALICE), json=body).status_code)

        threads = [threading.Thread(target=stream) for _ in range(2)]
        for thread in threads:
            thread.start()
        wait_until(lambda: sum(len(v) for v in a.app.state.concurrency.in_flight.values()) == 2)
        refused = b.post("/v1/chat/completions", headers=auth(ALICE), json={**body, "stream": False})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "concurrency_limit_exceeded"
        for thread in threads:
            thread.join(30)
        assert done == [200, 200]
        wait_until(lambda: a.app.state.concurrency.in_flight == {})
        assert b.post("/v1/chat/completions", headers=auth(ALICE), json={**body, "stream": False}).status_code == 200
