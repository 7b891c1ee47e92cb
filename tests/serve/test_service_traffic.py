"""The trainer's gate is service traffic: its key is not rate-limited as a user's, and what it asks is neither a
user's generation record nor counted in per-version user metrics."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from serve.settings import GatewaySettings
from tests.serve.conftest import ALICE, auth, image_question, make_client, png_data_url, wait_until

SERVICE = "svc-0123456789abcdef0123"


def test_the_gates_requests_leave_no_record_and_use_no_user_limit(settings, fake_vllm):
    settings = settings.model_copy(update={"rate_limit_per_minute": 3, "service_key": SecretStr(SERVICE)})
    with make_client(settings, fake_vllm) as client:
        wait_until(lambda: client.get("/ready").status_code == 200)
        store = client.app.state.store
        body = {"model": "base", "messages": image_question(png_data_url()), "max_tokens": 8}
        eval_headers = {**auth(SERVICE), "x-alignloop-client": "eval"}
        gate = [client.post("/v1/chat/completions", json=body, headers=eval_headers) for _ in range(10)]
        assert [r.status_code for r in gate] == [200] * 10  # far over the user limit of 3 a minute
        user = [client.post("/v1/chat/completions", json=body, headers=auth(ALICE)) for _ in range(4)]
        assert [r.status_code for r in user] == [200, 200, 200, 429]  # Alice's budget is whole: the gate took none
        wait_until(lambda: len(store.list_generations()) == 3)
        assert {record.id for record in store.list_generations()} == {r.json()["id"] for r in user[:3]}
        assert not any(store.get_generation(r.json()["id"]) for r in gate)
        metrics = client.get("/metrics").text
        assert 'alignloop_service_requests_total{adapter="base",status="200"} 10.0' in metrics
        assert 'alignloop_requests_total{adapter="base",status="200"} 3.0' in metrics


def test_feedback_on_a_gate_answer_is_refused_as_unknown(settings, fake_vllm):
    settings = settings.model_copy(update={"service_key": SecretStr(SERVICE)})
    with make_client(settings, fake_vllm) as client:
        wait_until(lambda: client.get("/ready").status_code == 200)
        body = {"model": "base", "messages": [{"role": "user", "content": "x"}]}
        answer = client.post("/v1/chat/completions", json=body, headers=auth(SERVICE)).json()
        refused = client.post("/v1/feedback", json={"response_id": answer["id"], "rating": 1}, headers=auth(ALICE))
        assert refused.status_code == 404 and refused.json()["error"]["code"]


def test_production_requires_a_service_key_of_its_own():
    secrets = {
        "environment": "production",
        "api_keys": [f"alice:{ALICE}"],
        "admin_key": "admin-0123456789abcdef",
        "user_id_salt": "salt-0123456789abcdef",
    }
    with pytest.raises(ValueError, match="set ALIGNLOOP_SERVICE_KEY"):
        GatewaySettings(**secrets)
    with pytest.raises(ValueError, match="the service key must be a key of its own"):
        GatewaySettings(**secrets, service_key=ALICE)
    assert GatewaySettings(**secrets, service_key=SERVICE).service_key.get_secret_value() == SERVICE
