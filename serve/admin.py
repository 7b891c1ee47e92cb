"""Admin operations (admin key only): list adapter versions with their metrics, promote, roll back, set a canary,
delete a user's data. Every change goes through the store, so every gateway replica picks it up.

`version_overview` is the one read any API key may make: which version the public alias serves, how much feedback
arrived since it was promoted, and for recent versions their status, gate metrics, the gate's decision with its
intervals and reasons, and the pairs they were trained on (what the demo's Versions tab and `alignloop versions`
show)."""

from __future__ import annotations

import anyio

from online_rl.store import FeedbackStore
from online_rl.store.base import UNSET
from serve.feedback import store_errors, version_label
from serve.protocol import CanaryRequest, PromoteRequest, RollbackRequest
from serve.routing import RegistryWatcher


class AdminService:
    def __init__(self, store: FeedbackStore, watcher: RegistryWatcher, public_alias: str):
        self.store = store
        self.watcher = watcher
        self.public_alias = public_alias

    async def registry(self) -> dict:
        def read() -> dict:
            return {
                "object": "registry",
                "revision": self.store.registry_revision(),
                "aliases": dict(self.store.aliases()),
                "canaries": {alias: {"version": v, "fraction": f} for alias, (v, f) in self.store.canaries().items()},
                "data": [adapter.model_dump() for adapter in self.store.list_adapters()],
            }

        return await anyio.to_thread.run_sync(read)

    async def version_overview(self, recent: int) -> dict:
        def read() -> dict:
            alias = self.public_alias
            promoted = self.store.aliases().get(alias)
            changes = self.store.alias_history(alias)
            since = changes[-1].created if changes else None
            canary = self.store.canaries().get(alias)
            adapters = self.store.list_adapters()[-recent:] if recent else []
            return {
                "object": "versions",
                "alias": alias,
                "current": version_label(promoted),
                "current_version": promoted,
                "promoted_at": since,
                "feedback_since_promotion": self.store.count_events(since=since),
                "canary": {"version": canary[0], "fraction": canary[1]} if canary else None,
                "data": [
                    {
                        "version": a.version,
                        "name": a.name,
                        "model": f"{alias}@v{a.version}",
                        "status": a.status,
                        "parent_version": a.parent_version,
                        "algorithm": a.algorithm,
                        "created": a.created,
                        "metrics": a.metrics,
                        "pair_sources": a.pair_sources,
                        "gate": a.gate,
                    }
                    for a in adapters
                ],
            }

        return await anyio.to_thread.run_sync(read)

    async def history(self, alias: str) -> dict:
        changes = await anyio.to_thread.run_sync(self.store.alias_history, alias)
        return {"object": "list", "data": [change.model_dump() for change in changes]}

    async def promote(self, alias: str, body: PromoteRequest) -> dict:
        expected = body.expected_version if body.check_expected else UNSET
        with store_errors("version"):
            change = await anyio.to_thread.run_sync(
                lambda: self.store.promote(alias, body.version, expected=expected, actor="admin", reason=body.reason)
            )
        await self.watcher.refresh(force=True)  # this replica swaps at once; the others within a poll interval
        return change.model_dump()

    async def rollback(self, alias: str, body: RollbackRequest) -> dict:
        with store_errors():
            change = await anyio.to_thread.run_sync(
                lambda: self.store.rollback(alias, actor="admin", reason=body.reason)
            )
        await self.watcher.refresh(force=True)
        return change.model_dump()

    async def canary(self, alias: str, body: CanaryRequest) -> dict:
        with store_errors("version"):
            await anyio.to_thread.run_sync(
                lambda: self.store.set_canary(alias, body.version, body.fraction, actor="admin", reason=body.reason)
            )
        await self.watcher.refresh(force=True)
        canaries = await anyio.to_thread.run_sync(self.store.canaries)
        return {
            "object": "canary",
            "alias": alias,
            "canaries": {a: {"version": v, "fraction": f} for a, (v, f) in canaries.items()},
        }

    async def delete_user(self, user_id: str) -> dict:
        counts = await anyio.to_thread.run_sync(self.store.delete_user, user_id)
        return {"object": "user.deleted", "user_id": user_id, "deleted": counts}
