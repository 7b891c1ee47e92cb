"""The registry watcher never moves the alias table back to an older revision, whatever order overlapping
refreshes finish in."""

from __future__ import annotations

import anyio

from online_rl.store import open_store
from serve.routing import AliasTable, RegistrySnapshot, RegistryWatcher, read_snapshot


def test_a_refresh_that_read_an_older_revision_does_not_undo_a_newer_one(tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        table = AliasTable("llava-rlhf", "shapes-llava")
        watcher = RegistryWatcher(store, table, poll_interval_s=1.0)
        assert anyio.run(watcher.refresh) is True  # the first load
        current = read_snapshot(store)
        assert table.snapshot.revision == current.revision
        # Another refresh already applied a newer revision than this one is about to read.
        newer = RegistrySnapshot(revision=current.revision + 1, promoted={"llava-rlhf": 3})
        table.snapshot = newer
        assert anyio.run(lambda: watcher.refresh(force=True)) is False
        assert table.snapshot is newer
        # The same revision again is applied on force (a re-read), as before.
        table.snapshot = RegistrySnapshot(revision=current.revision)
        assert anyio.run(lambda: watcher.refresh(force=True)) is True
        assert table.snapshot.revision == current.revision
