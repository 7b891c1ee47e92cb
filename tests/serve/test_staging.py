"""Staging before a promotion: the version is loaded and smoke-checked on every healthy vLLM replica, and the alias
moves only if all of them serve it. Two fake vLLM servers behind one gateway (the real-vLLM version of the refusal
is tests/integration/test_staging_vllm.py)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from alignloop.client import GatewayClient, PromotionConflict
from online_rl.promotion import gateway_promoter
from online_rl.schema import AdapterVersion, adapter_name
from online_rl.store import ConflictError
from serve.app import create_app
from tests.serve.conftest import ADMIN, ALICE, auth, wait_until
from tests.serve.fake_vllm import FakeVLLM
from tests.serve.test_replicas import RouteByHost, served_version

SERVICE = "service-0123456789abcdef0123"
URLS = ["http://vllm-0:8000", "http://vllm-1:8000"]


@pytest.fixture
def servers() -> dict[str, FakeVLLM]:
    return {"vllm-0": FakeVLLM(), "vllm-1": FakeVLLM()}


@pytest.fixture
def gateway(settings, servers):
    settings = settings.model_copy(update={"vllm_urls": URLS, "service_key": SecretStr(SERVICE)})
    app = create_app(settings, upstream_transport=RouteByHost(servers))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_until(lambda: len(client.get("/ready").json().get("upstreams", [])) == 2)
        yield client


def register(store) -> int:
    version = store.allocate_adapter_version()
    store.register_adapter(AdapterVersion(version=version, name=adapter_name(version), path="p", algorithm="dpo"))
    return version


def answers_by_server(gateway, servers, count: int = 10) -> set[tuple[str, str]]:
    """(server, version label) of `count` answers to the alias; the idle servers take turns."""
    seen = set()
    for _ in range(count):
        before = {name: len(server.requests) for name, server in servers.items()}
        label = served_version(gateway)
        (name,) = [name for name, server in servers.items() if len(server.requests) > before[name]]
        seen.add((name, label))
    return seen


def test_a_version_staged_on_every_replica_is_promoted(gateway, servers):
    store = gateway.app.state.store
    version = register(store)
    for server in servers.values():
        server.adapters.add(adapter_name(version))
    response = gateway.post("/v1/admin/aliases/llava-rlhf/promote", headers=auth(ADMIN), json={"version": version})
    assert response.status_code == 200, response.text
    staging = response.json()["staging"]
    assert staging["staged"] and {r["url"] for r in staging["replicas"]} == set(URLS)
    assert all(r["effect"] == "answer" for r in staging["replicas"])
    for server in servers.values():  # each replica was asked for the base model, then for the version
        assert [r["model"] for r in server.requests[-2:]] == ["shapes-llava", adapter_name(version)]
    assert answers_by_server(gateway, servers) == {("vllm-0", adapter_name(version)), ("vllm-1", adapter_name(version))}
    assert "alignloop_staging_seconds_count 1.0" in gateway.get("/metrics").text


def test_a_replica_that_cannot_load_the_version_refuses_the_promotion(gateway, servers):
    store = gateway.app.state.store
    version = register(store)
    servers["vllm-0"].adapters.add(adapter_name(version))  # vllm-1 cannot load it (not on its volume, say)
    response = gateway.post(
        "/v1/admin/aliases/llava-rlhf/promote", headers=auth(ADMIN), json={"version": version, "reason": "try"}
    )
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "promote_refused" and "http://vllm-1:8000" in error["message"]
    assert "vllm-0" not in error["message"]  # only the replica that failed is named
    assert store.promoted_version("llava-rlhf") is None and store.get_adapter(version).status == "candidate"
    (refusal,) = store.alias_history("llava-rlhf")
    assert (refusal.action, refusal.to_version, refusal.actor) == ("promote_refused", version, "admin")
    assert "HTTP 404" in refusal.reason and "vllm-1" in refusal.reason
    # Both replicas keep serving the old version (here the base model).
    assert answers_by_server(gateway, servers) == {("vllm-0", "base"), ("vllm-1", "base")}
    metrics = gateway.get("/metrics").text
    assert 'alignloop_promotions_total{outcome="refused"} 1.0' in metrics
    assert 'alignloop_error_responses_total{code="promote_refused",status="409"} 1.0' in metrics
    history = gateway.get("/v1/admin/aliases/llava-rlhf/history", headers=auth(ADMIN)).json()["data"]
    assert history[-1]["action"] == "promote_refused"


def test_an_unhealthy_replica_is_not_staged_and_none_healthy_refuses(gateway, servers):
    store = gateway.app.state.store
    version = register(store)
    servers["vllm-0"].adapters.add(adapter_name(version))
    servers["vllm-1"].healthy = False  # out of the pool: it takes no traffic, so it need not stage
    wait_until(lambda: gateway.get("/ready").json()["upstreams"] == ["http://vllm-0:8000"])
    response = gateway.post("/v1/admin/aliases/llava-rlhf/promote", headers=auth(ADMIN), json={"version": version})
    assert response.status_code == 200, response.text
    assert [r["url"] for r in response.json()["staging"]["replicas"]] == ["http://vllm-0:8000"]
    other = register(store)
    servers["vllm-0"].healthy = False
    wait_until(lambda: gateway.get("/ready").status_code == 503)
    refused = gateway.post("/v1/admin/aliases/llava-rlhf/promote", headers=auth(ADMIN), json={"version": other})
    assert refused.status_code == 409 and "no healthy vLLM replica" in refused.json()["error"]["message"]
    assert store.promoted_version("llava-rlhf") == version


def test_an_adapter_with_no_effect_is_refused_unless_asked_for(gateway, servers):
    store = gateway.app.state.store
    version = register(store)
    for server in servers.values():
        server.adapters.add(adapter_name(version))
        server.inert_adapters.add(adapter_name(version))  # loads, and answers exactly as the base model
    response = gateway.post("/v1/admin/aliases/llava-rlhf/promote", headers=auth(ADMIN), json={"version": version})
    assert response.status_code == 409 and "no effect on the probe" in response.json()["error"]["message"]
    forced = gateway.post(
        "/v1/admin/aliases/llava-rlhf/promote", headers=auth(ADMIN), json={"version": version, "require_effect": False}
    )
    assert forced.status_code == 200, forced.text
    assert [(c.action, c.to_version) for c in store.alias_history("llava-rlhf")] == [
        ("promote_refused", version),
        ("promote", version),
    ]


def test_the_same_answer_with_other_token_probabilities_is_an_effect(gateway, servers):
    store = gateway.app.state.store
    version = register(store)
    for server in servers.values():
        server.adapters.add(adapter_name(version))
        server.answer_for = lambda body, index=0: "A red square and a blue circle."  # every model says the same
    response = gateway.post("/v1/admin/aliases/llava-rlhf/promote", headers=auth(ADMIN), json={"version": version})
    assert response.status_code == 200, response.text
    assert {r["effect"] for r in response.json()["staging"]["replicas"]} == {"logprobs"}


def test_the_trainer_promotes_with_the_service_key_and_a_user_key_cannot(gateway, servers):
    store = gateway.app.state.store
    version = register(store)
    for server in servers.values():
        server.adapters.add(adapter_name(version))
    denied = gateway.post("/v1/admin/aliases/llava-rlhf/promote", headers=auth(ALICE), json={"version": version})
    assert denied.status_code == 403
    client = GatewayClient("http://testserver", SERVICE, http_client=gateway)
    with pytest.raises(PromotionConflict) as lost:  # compare-and-set: the alias serves the base model, not v7
        client.promote("llava-rlhf", version, expected=7, reason="gate passed")
    assert lost.value.code == "conflict" and store.alias_history("llava-rlhf") == []  # nothing was staged
    change = client.promote("llava-rlhf", version, expected=None, reason="gate passed: chair_s 0.40->0.30")
    assert (change["actor"], change["to_version"], change["staging"]["staged"]) == ("trainer", version, True)
    assert store.promoted_version("llava-rlhf") == version

    refused_version = register(store)  # on no replica's volume
    with pytest.raises(PromotionConflict) as refused:
        client.promote("llava-rlhf", refused_version, expected=version, reason="gate passed")
    assert refused.value.code == "promote_refused"
    assert store.alias_history("llava-rlhf")[-1].actor == "trainer"


def test_the_trainers_gateway_promoter_raises_the_stores_conflict(gateway, servers, monkeypatch):
    """`online_rl.promotion.gateway_promoter` is what the trainer and the canary call: a refusal is a ConflictError,
    which they handle as a promotion that did not happen."""
    store = gateway.app.state.store
    version = register(store)
    monkeypatch.setattr("online_rl.promotion.GatewayClient", lambda url, key, timeout_s: _client(gateway))
    promote = gateway_promoter("http://testserver", SERVICE)
    with pytest.raises(ConflictError, match="promotion refused"):
        promote("llava-rlhf", version, expected=None, actor="trainer", reason="gate passed")
    for server in servers.values():
        server.adapters.add(adapter_name(version))
    promote("llava-rlhf", version, expected=None, actor="trainer", reason="gate passed")
    assert store.promoted_version("llava-rlhf") == version
    assert store.alias_history("llava-rlhf")[-1].actor == "trainer"
    inert = register(store)  # a canary's version: its users chose it; staging checks only that it loads
    for server in servers.values():
        server.adapters.add(adapter_name(inert))
        server.inert_adapters.add(adapter_name(inert))
    promote("llava-rlhf", inert, expected=version, actor="canary", reason="no worse with confidence")
    assert (store.promoted_version("llava-rlhf"), store.alias_history("llava-rlhf")[-1].actor) == (inert, "canary")


def _client(gateway: TestClient) -> GatewayClient:
    """A GatewayClient on the test's app whose `close()` leaves the test's connection open."""
    client = GatewayClient("http://testserver", SERVICE, http_client=gateway)
    client.close = lambda: None
    return client
