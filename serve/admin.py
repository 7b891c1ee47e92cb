"""Admin operations (admin key only): list adapter versions with their metrics, promote, roll back, set a canary,
delete a user's data. Every change goes through the store, so every gateway replica picks it up.

A promotion is staged first (`serve.staging`): the version is loaded and smoke-checked on every healthy vLLM
replica, and only then does the alias move. If a replica fails, the promotion is refused (409
`promote_refused`), the alias stays, and the refusal and its reason go into the alias history. The trainer promotes
through the same endpoint with the service key. A rollback first loads the version it goes back to (best effort).

`version_overview` is the one read any API key may make: which version the public alias serves, how much feedback
arrived since it was promoted, and for recent versions their status, gate metrics, the gate's decision with its
intervals and reasons, and the pairs they were trained on (what the demo's Versions tab and `alignloop versions`
show)."""

from __future__ import annotations

import logging

import anyio

from online_rl.store import ConflictError, FeedbackStore, NotFoundError
from online_rl.store.base import UNSET
from serve.auth import Caller
from serve.feedback import store_errors, version_label
from serve.metrics import GatewayMetrics
from serve.protocol import APIError, CanaryRequest, PromoteRequest, RollbackRequest
from serve.routing import RegistryWatcher
from serve.staging import StagingService

logger = logging.getLogger(__name__)
MOVES = ("promote", "rollback")


def _label(version: int | None) -> str:
    return "the base model" if version is None else f"version {version}"


class AdminService:
    def __init__(
        self,
        store: FeedbackStore,
        watcher: RegistryWatcher,
        public_alias: str,
        staging: StagingService | None = None,
        metrics: GatewayMetrics | None = None,
    ):
        self.store = store
        self.watcher = watcher
        self.public_alias = public_alias
        self.staging = staging
        self.metrics = metrics or GatewayMetrics()

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
            moves = [change for change in self.store.alias_history(alias) if change.action in MOVES]
            since = moves[-1].created if moves else None
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

    async def promote(self, alias: str, body: PromoteRequest, caller: Caller | None = None) -> dict:
        """Stages the version on every healthy vLLM replica, then moves the alias (compare-and-set with
        `expected_version`); refuses with 409 `promote_refused`, recorded in the alias history, when staging fails."""
        actor = (body.actor or "trainer") if caller is not None and caller.is_service else "admin"
        expected = body.expected_version if body.check_expected else UNSET
        staging = None
        if body.version is not None and self.staging is not None:
            await self._check_promotable(alias, body.version, expected)
            report = await self.staging.stage(body.version, require_effect=body.require_effect)
            self.metrics.staging_seconds.observe(report.seconds)
            staging = report.as_dict()
            if not report.staged:
                reason = f"staging failed: {report.reason}"
                if body.reason:
                    reason += f" (promotion asked for: {body.reason})"
                await anyio.to_thread.run_sync(
                    lambda: self.store.record_refusal(alias, body.version, actor=actor, reason=reason)
                )
                self.metrics.promotions.labels(outcome="refused").inc()
                logger.warning("promotion refused alias=%s version=%s actor=%s %s", alias, body.version, actor, reason)
                raise APIError(409, f"promotion refused: {reason}", param="version", code="promote_refused")
        with store_errors("version"):
            change = await anyio.to_thread.run_sync(
                lambda: self.store.promote(alias, body.version, expected=expected, actor=actor, reason=body.reason)
            )
        self.metrics.promotions.labels(outcome="promoted").inc()
        await self.watcher.refresh(force=True)  # this replica swaps at once; the others within a poll interval
        return change.model_dump() | ({"staging": staging} if staging is not None else {})

    async def _check_promotable(self, alias: str, version: int, expected) -> None:
        """What the store's promotion would refuse anyway, found before the staging work: an unregistered version
        (404) or an alias that moved (409)."""

        def check() -> None:
            if self.store.get_adapter(version) is None:
                raise NotFoundError(f"adapter version {version} is not registered")
            current = self.store.promoted_version(alias)
            if expected is not UNSET and current != expected:
                raise ConflictError(f"alias {alias!r} serves {_label(current)}, not {_label(expected)}")

        with store_errors("version"):
            await anyio.to_thread.run_sync(check)

    async def rollback(self, alias: str, body: RollbackRequest) -> dict:
        if self.staging is not None:
            target = await anyio.to_thread.run_sync(self._rollback_target, alias)
            if target is not None:
                await self.staging.warm(target)
        with store_errors():
            change = await anyio.to_thread.run_sync(
                lambda: self.store.rollback(alias, actor="admin", reason=body.reason)
            )
        await self.watcher.refresh(force=True)
        return change.model_dump()

    def _rollback_target(self, alias: str) -> int | None:
        """The version a rollback would move back to (as the store's `rollback` finds it), or None."""
        current = self.store.promoted_version(alias)
        history = self.store.alias_history(alias)
        promotion = next((c for c in reversed(history) if c.action == "promote" and c.to_version == current), None)
        return promotion.from_version if promotion is not None else None

    async def canary(self, alias: str, body: CanaryRequest) -> dict:
        """Starts, changes or ends the alias's canary. A version put on canary has status `canary` (the trainer then
        leaves its gate to the canary's users); one whose canary an admin ends is `rejected`."""

        def change() -> None:
            previous = self.store.canaries().get(alias)
            self.store.set_canary(alias, body.version, body.fraction, actor="admin", reason=body.reason)
            started = body.version if body.fraction > 0 else None
            if started is not None and self.store.get_adapter(started).status != "promoted":
                self.store.update_adapter(started, status="canary")
            ended = previous[0] if previous is not None and previous[0] != started else None
            if ended is not None and self.store.get_adapter(ended).status == "canary":
                self.store.update_adapter(ended, status="rejected", notes=f"canary ended by admin: {body.reason}")

        with store_errors("version"):
            await anyio.to_thread.run_sync(change)
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
