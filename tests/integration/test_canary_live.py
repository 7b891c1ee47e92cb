"""The live canary with real parts: a gateway on the real vLLM, `alignloop trainer` watching the canary, and
`alignloop simulate`'s users rating what they get by ground truth. A worse version on canary is rolled back and a
better one promoted, by the trainer's sequential test, with no admin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.integration.conftest import ADMIN, ALICE, SERVICE
from tests.integration.test_embedded_mode import wait_for

pytestmark = pytest.mark.slow
ALIGNLOOP = str(Path(sys.executable).parent / "alignloop")


def admin(gateway, path: str, body: dict) -> dict:
    response = httpx.post(f"{gateway.url}{path}", json=body, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def simulate(gateway, events: int, seed: int) -> None:
    done = subprocess.run(
        [ALIGNLOOP, "simulate", "--gateway-url", gateway.url, "--events", str(events), "--seed", str(seed)],
        env={**os.environ, "ALIGNLOOP_SIMULATE_API_KEY": ALICE},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_worse_canary_is_rolled_back_and_a_better_one_promoted(
    gateway, gateway_store, gateway_store_url, vllm_server, bundled_model, publish_random_adapter, tmp_path
):
    from peft import get_peft_model

    from online_rl.adapters import publish_adapter
    from training.lora import language_model_lora
    from training.tiny_llava import load_checkpoint

    store, alias = gateway_store, "llava-rlhf"
    garbage = publish_random_adapter(store, seed=11)  # strong random weights: every answer is wrong
    model, _ = load_checkpoint(bundled_model)
    untouched = publish_adapter(  # a LoRA of zeros: it answers as the base model does
        store,
        get_peft_model(model, language_model_lora(rank=4)),
        vllm_server.config.adapter_dir,
        vllm_server.config.model,
        algorithm="zero-test",
    )
    for version in (garbage, untouched):  # tried before and rejected: an admin puts them on canary below
        store.update_adapter(version.version, status="rejected")
    store.promote(alias, None, actor="test")
    store.set_canary(alias, None, 0.0, actor="test")
    trainer_env = {
        **os.environ,
        "ALIGNLOOP_TRAINER_API_KEY": SERVICE,  # the trainer's own key: it promotes through the gateway
        "ALIGNLOOP_TRAINER_PAIR_SOURCES": "preference",  # the simulated users send none: no round, only the canary
        "ALIGNLOOP_TRAINER_BDHS_PER_ROUND": "0",
        "ALIGNLOOP_TRAINER_CANARY_MIN_RATED": "15",
        "ALIGNLOOP_TRAINER_CANARY_MAX_LOOKS": "5",
        "ALIGNLOOP_TRAINER_METRICS_PORT": str(free_port()),
        "ALIGNLOOP_TRAINER_POLL_INTERVAL_S": "1",
    }
    command = [
        ALIGNLOOP,
        "trainer",
        "--gateway-url",
        gateway.url,
        "--store-url",
        gateway_store_url,
        "--model",
        str(bundled_model),
        "--adapter-dir",
        str(tmp_path / "trainer-adapters"),
    ]
    with (tmp_path / "trainer.log").open("wb") as log:
        trainer = subprocess.Popen(command, env=trainer_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # A worse version on canary beside the base model: rolled back.
        admin(gateway, f"/v1/admin/aliases/{alias}/canary", {"version": garbage.version, "fraction": 0.5})
        assert store.get_adapter(garbage.version).status == "canary"  # the trainer leaves it to the canary's users
        simulate(gateway, 80, seed=1)
        wait_for(lambda: store.canaries() == {}, 120, "the canary rolled back")
        assert store.promoted_version(alias) is None and store.get_adapter(garbage.version).status == "rejected"
        stop = store.alias_history(alias)[-1]
        assert (stop.action, stop.actor, stop.from_version) == ("canary_stop", "canary", garbage.version)
        assert stop.reason.startswith("worse with confidence: thumbs-up")
        assert store.get_adapter(garbage.version).gate["canary"]["action"] == "rollback"

        # A better version on canary beside a worse promoted one: promoted.
        admin(gateway, f"/v1/admin/aliases/{alias}/promote", {"version": garbage.version, "reason": "test"})
        admin(gateway, f"/v1/admin/aliases/{alias}/canary", {"version": untouched.version, "fraction": 0.5})
        simulate(gateway, 80, seed=2)
        wait_for(lambda: store.promoted_version(alias) == untouched.version, 120, "the canary promoted")
        promote = [c for c in store.alias_history(alias) if c.action == "promote"][-1]
        assert (promote.actor, promote.from_version, promote.to_version) == (
            "canary",
            garbage.version,
            untouched.version,
        )
        assert promote.reason.startswith("no worse than 0.05 with confidence") and store.canaries() == {}
    finally:
        trainer.terminate()
        trainer.wait(30)
        store.set_canary(alias, None, 0.0, actor="test")
        store.promote(alias, None, actor="test")
    assert "Traceback" not in (tmp_path / "trainer.log").read_text()
