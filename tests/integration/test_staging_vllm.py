"""Staging on real engines: a gateway process in front of two vLLM replicas, the session's real vLLM server and a
fake one (tests/serve/fake_vllm.py served over HTTP; two real vLLM servers do not fit on 2 cores beside the tests).
A promotion is staged on both: when the fake cannot load the new adapter, the move is refused with its reason in
the alias history and both replicas keep serving the old version; once it can, the alias moves and both serve the
new one. On the real server alone, an all-zero LoRA (no effect on any answer) is refused by the smoke check."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn

from online_rl.adapters import publish_adapter
from tests.integration.conftest import ADMIN, ALICE, GatewayProcess
from tests.integration.test_gateway_vllm import image_question, square_of
from tests.serve.fake_vllm import FakeVLLM

pytestmark = pytest.mark.slow


class FakeServer:
    """A FakeVLLM on a real port, in a thread of this process."""

    def __init__(self):
        self.fake = FakeVLLM()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.fake.app, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the fake vLLM did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def ask(gateway: GatewayProcess) -> tuple[str, str]:
    """(the adapter version that answered, the answer) for one request to the alias."""
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {ALICE}"},
        json={
            "model": "llava-rlhf",
            "max_tokens": 8,
            "temperature": 0,
            "messages": image_question(square_of("red"), "What color is the square?"),
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.headers["x-alignloop-adapter"], response.json()["choices"][0]["message"]["content"]


def promote(gateway: GatewayProcess, version: int, **fields) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/admin/aliases/llava-rlhf/promote",
        headers={"Authorization": f"Bearer {ADMIN}"},
        json={"version": version, **fields},
        timeout=300,
    )


def test_a_replica_that_cannot_load_the_version_keeps_every_replica_on_the_old_one(
    vllm_server, gateway_store, gateway_store_url, publish_random_adapter, tmp_path
):
    store, store_url = gateway_store, gateway_store_url  # the session's store: version numbers stay unique
    before = store.promoted_version("llava-rlhf")
    old_label = "base" if before is None else f"policy-v{before}"
    with FakeServer() as fake:
        fake.fake.adapters.update(f"policy-v{v}" for v in range(1, store.last_allocated_version() + 1))
        adapter = publish_random_adapter(store, seed=11)
        gateway = GatewayProcess(f"{vllm_server.base_url},{fake.url}", store_url, tmp_path, name="staging")
        try:
            gateway.wait_ready()
            deadline = time.monotonic() + 30
            while len(httpx.get(f"{gateway.url}/ready", timeout=5).json()["upstreams"]) < 2:
                assert time.monotonic() < deadline, "both replicas should be healthy"
                time.sleep(0.2)

            refused = promote(gateway, adapter.version, reason="gate passed")
            assert refused.status_code == 409, refused.text
            error = refused.json()["error"]
            assert error["code"] == "promote_refused"
            assert fake.url in error["message"] and vllm_server.base_url not in error["message"]
            assert store.promoted_version("llava-rlhf") == before
            assert store.alias_history("llava-rlhf")[-1].action == "promote_refused"
            assert fake.fake.requests[-1]["model"] == adapter.name  # the fake was asked for it, and had it not

            fake_before = len(fake.fake.requests)
            answers = [ask(gateway) for _ in range(8)]
            assert {label for label, _ in answers} == {old_label}  # both replicas on the old version
            assert len(fake.fake.requests) > fake_before  # the fake took some of them...
            assert any("saw" not in text for _, text in answers)  # ...and the real server the others

            fake.fake.adapters.add(adapter.name)  # now the fake replica can load it too
            promoted = promote(gateway, adapter.version, reason="gate passed")
            assert promoted.status_code == 200, promoted.text
            staging = {r["url"]: r for r in promoted.json()["staging"]["replicas"]}
            assert staging[vllm_server.base_url]["staged"] and staging[vllm_server.base_url]["effect"] in (
                "answer",
                "logprobs",
            )
            assert staging[fake.url]["staged"]
            assert {ask(gateway)[0] for _ in range(6)} == {adapter.name}
        finally:
            gateway.stop()
            store.promote("llava-rlhf", before, actor="test", reason="test cleanup")


def test_a_lora_with_no_effect_is_refused_on_a_real_server(
    vllm_server, gateway_store, gateway_store_url, bundled_model, tmp_path
):
    from peft import get_peft_model

    from training.lora import language_model_lora
    from training.tiny_llava import load_checkpoint

    store = gateway_store
    before = store.promoted_version("llava-rlhf")
    model, _ = load_checkpoint(bundled_model)
    inert = get_peft_model(model, language_model_lora(rank=8))  # PEFT's default: B = 0, the identity
    adapter = publish_adapter(store, inert, vllm_server.config.adapter_dir, vllm_server.config.model, algorithm="zero")
    gateway = GatewayProcess(vllm_server.base_url, gateway_store_url, tmp_path, name="inert")
    try:
        gateway.wait_ready()
        refused = promote(gateway, adapter.version)
        assert refused.status_code == 409, refused.text
        assert "no effect on the probe" in refused.json()["error"]["message"]
        forced = promote(gateway, adapter.version, require_effect=False)
        assert forced.status_code == 200, forced.text
        assert forced.json()["staging"]["replicas"][0]["effect"] is None
    finally:
        gateway.stop()
        store.promote("llava-rlhf", before, actor="test", reason="test cleanup")
