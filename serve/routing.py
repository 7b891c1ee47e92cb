"""Which adapter version answers a request: the gateway's copy of the registry, and how model names resolve.

Model names a client may send:
- the public alias (`llava-rlhf`): the promoted version, or the base model when none is promoted; with a canary,
  a share of these requests goes to the canary version instead;
- `llava-rlhf@vN`: version N, pinned (any registered version, so the eval gate can score a candidate);
- `base` (or the base model's served name): the base model.

A request resolves once, at its start, against the registry revision the gateway holds then; in-flight requests
keep their version across a swap. `RegistryWatcher` refreshes the copy when the revision moves: it polls the store
every `poll_interval_s` and, on Redis, also wakes on the registry's pub/sub channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import re
import threading

import anyio

from online_rl.schema import BASE_VERSION_NAME, AdapterVersion, adapter_name
from online_rl.store import FeedbackStore
from serve.protocol import APIError

logger = logging.getLogger(__name__)
_PINNED = re.compile(r"^(?P<alias>[\w.-]+)@v(?P<version>\d+)$")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one request goes: `served_name` is the model name sent to vLLM."""

    requested: str
    version: int | None
    served_name: str
    revision: int
    canary: bool = False

    @property
    def label(self) -> str:
        """policy-vN or base: the adapter version as responses and metrics name it."""
        return BASE_VERSION_NAME if self.version is None else adapter_name(self.version)


@dataclasses.dataclass(frozen=True)
class RegistrySnapshot:
    revision: int = 0
    promoted: dict[str, int | None] = dataclasses.field(default_factory=dict)
    canaries: dict[str, tuple[int, float]] = dataclasses.field(default_factory=dict)
    versions: dict[int, AdapterVersion] = dataclasses.field(default_factory=dict)


def read_snapshot(store: FeedbackStore) -> RegistrySnapshot:
    """Reads the registry; the revision is read first, so a change racing the read is picked up next time."""
    revision = store.registry_revision()
    return RegistrySnapshot(
        revision=revision,
        promoted=store.aliases(),
        canaries=store.canaries(),
        versions={a.version: a for a in store.list_adapters()},
    )


class AliasTable:
    def __init__(self, public_alias: str, base_model_name: str, rng: random.Random | None = None):
        self.public_alias = public_alias
        self.base_model_name = base_model_name
        self.snapshot = RegistrySnapshot()
        self.rng = rng or random.Random()

    def resolve(self, model: str) -> Target:
        snapshot = self.snapshot
        if model in (BASE_VERSION_NAME, self.base_model_name):
            return Target(model, None, self.base_model_name, snapshot.revision)
        if model == self.public_alias:
            canary = snapshot.canaries.get(model)
            if canary is not None and self.rng.random() < canary[1]:
                return Target(model, canary[0], adapter_name(canary[0]), snapshot.revision, canary=True)
            version = snapshot.promoted.get(model)
            return Target(model, version, self._served(version), snapshot.revision)
        pinned = _PINNED.match(model)
        if pinned and pinned.group("alias") == self.public_alias:
            version = int(pinned.group("version"))
            if version not in snapshot.versions:
                raise APIError(
                    404,
                    f"The model `{model}` does not exist: adapter version {version} is not registered.",
                    param="model",
                    code="model_not_found",
                )
            return Target(model, version, adapter_name(version), snapshot.revision)
        raise APIError(
            404,
            f"The model `{model}` does not exist. Use `{self.public_alias}`, "
            f"`{self.public_alias}@vN` or `{BASE_VERSION_NAME}`.",
            param="model",
            code="model_not_found",
        )

    def _served(self, version: int | None) -> str:
        return self.base_model_name if version is None else adapter_name(version)

    def public_names(self) -> list[tuple[str, AdapterVersion | None]]:
        """Every model name /v1/models lists, with the version behind it."""
        snapshot = self.snapshot
        promoted = snapshot.promoted.get(self.public_alias)
        names = [(self.public_alias, snapshot.versions.get(promoted) if promoted else None), (BASE_VERSION_NAME, None)]
        names += [(f"{self.public_alias}@v{v}", a) for v, a in sorted(snapshot.versions.items())]
        return names

    def public_model(self, model: str) -> tuple[str, AdapterVersion | None] | None:
        """One of `public_names()` by name (the base model's served name is `base`); None if unknown."""
        model = BASE_VERSION_NAME if model == self.base_model_name else model
        return next(((name, adapter) for name, adapter in self.public_names() if name == model), None)


class RegistryWatcher:
    """Keeps an AliasTable in step with the store; `on_change(old, new, initial)` runs after each applied change
    (and once after the first load, with `initial=True`)."""

    def __init__(self, store: FeedbackStore, table: AliasTable, poll_interval_s: float, on_change=None):
        self.store = store
        self.table = table
        self.poll_interval_s = poll_interval_s
        self.on_change = on_change
        self._loaded = False
        self._wake = asyncio.Event()
        self._stop_listener = threading.Event()

    async def refresh(self, force: bool = False) -> bool:
        """Reloads the snapshot if the revision moved (or `force`); returns whether it did."""
        revision = await anyio.to_thread.run_sync(self.store.registry_revision)
        if self._loaded and not force and revision == self.table.snapshot.revision:
            return False
        new = await anyio.to_thread.run_sync(read_snapshot, self.store)
        if self._loaded and new.revision < self.table.snapshot.revision:
            # Refreshes overlap (the poll loop, an admin call, a request naming a new version): one that read the
            # registry before another must not put the older snapshot back over the newer one.
            return False
        initial, self._loaded = not self._loaded, True
        old, self.table.snapshot = self.table.snapshot, new
        if self.on_change is not None and (initial or old.revision != new.revision):
            self.on_change(old, new, initial)
        return True

    async def run(self) -> None:
        self._start_listener(asyncio.get_running_loop())
        try:
            while True:
                try:
                    await self.refresh()
                except Exception:  # the store may be briefly unreachable: keep serving the last snapshot
                    logger.exception("registry refresh failed; serving revision %d", self.table.snapshot.revision)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval_s)
                self._wake.clear()
        finally:
            self._stop_listener.set()

    def _start_listener(self, loop: asyncio.AbstractEventLoop) -> None:
        """On Redis, a thread listens on the registry channel and wakes the loop at once."""
        channel = getattr(self.store, "registry_channel", None)
        if channel is None:
            return

        def listen() -> None:
            pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(channel)
                while not self._stop_listener.is_set():
                    if pubsub.get_message(timeout=0.5) is not None:
                        loop.call_soon_threadsafe(self._wake.set)
            except Exception:
                logger.warning("registry pub/sub listener stopped; relying on polling", exc_info=True)
            finally:
                pubsub.close()

        threading.Thread(target=listen, name="registry-listener", daemon=True).start()
