"""Several gateway replicas on one store: a promotion made through one replica (or by the trainer, straight in the
store) moves every replica's alias within a second. On SQLite the replicas poll; on Redis they are woken by the
registry's pub/sub channel, so they move at once even with a long poll interval."""

from __future__ import annotations

import time

import pytest

from online_rl.schema import AdapterVersion, adapter_name
from tests.serve.conftest import ADMIN, ALICE, auth, make_client, wait_until


def served_version(client) -> str:
    response = client.post("/v1/chat/completions", headers=auth(ALICE),
                           json={"model": "llava-rlhf", "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
    assert response.status_code == 200, response.text
    return response.headers["x-alignloop-adapter"]


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_promotion_reaches_every_replica_within_a_second(backend, settings, fake_vllm, redis_store_url, tmp_path):
    if backend == "redis":
        # A poll interval far longer than the deadline: only the pub/sub notification can move replica B in time.
        settings = settings.model_copy(update={"store_url": redis_store_url, "alias_poll_interval_s": 30.0})
    replica_b_settings = settings.model_copy()
    with make_client(settings, fake_vllm) as replica_a, make_client(replica_b_settings, fake_vllm) as replica_b:
        for replica in (replica_a, replica_b):
            wait_until(lambda: replica.get("/ready").status_code == 200)
        store = replica_a.app.state.store
        version = store.allocate_adapter_version()
        store.register_adapter(AdapterVersion(version=version, name=adapter_name(version), path="p", algorithm="dpo"))
        fake_vllm.adapters.add(adapter_name(version))
        assert served_version(replica_b) == "base"

        promoted_at = time.monotonic()
        response = replica_a.post("/v1/admin/aliases/llava-rlhf/promote", headers=auth(ADMIN), json={"version": version})
        assert response.status_code == 200, response.text
        assert served_version(replica_a) == adapter_name(version)  # the replica that took the call: at once
        wait_until(lambda: served_version(replica_b) == adapter_name(version), timeout=1.0, interval=0.01)
        moved_after = time.monotonic() - promoted_at
        assert moved_after < 1.0

        store.rollback("llava-rlhf", actor="trainer")  # a change made in the store, by no replica
        for replica in (replica_a, replica_b):
            wait_until(lambda: served_version(replica) == "base", timeout=1.0, interval=0.01)
