"""The SQLite backend: the whole store in one file, in WAL mode, for a laptop or a single-node deployment.

Where things live (one table each; records are kept as JSON next to the columns they are looked up by):
- `images`: image bytes as BLOBs, one row per sha256; `generation_images` says which records use which image;
- `generations`, `facts`, `events` (the stream: `seq` is the delivery id), `event_generations`;
- `consumer_groups` (the cursor: the last sequence number handed out per group) and `pending` (handed out, not yet
  acknowledged), both updated in the transaction that delivers;
- `adapters`, `aliases`, `alias_history`, `counters` (the version counter and the registry revision).

Every write is one `BEGIN IMMEDIATE` transaction, so several processes can write at once (SQLite serialises them,
waiting up to `busy_timeout`) and a process killed mid-write leaves nothing half-written. `synchronous=NORMAL` in
WAL mode keeps every committed transaction across a process crash (SIGKILL); `?synchronous=full` in the URL also
survives power loss, at the cost of an fsync per commit.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from online_rl.schema import (
    AdapterVersion,
    AliasChange,
    Delivery,
    FactsRecord,
    FeedbackEvent,
    GenerationRecord,
    ImageBlob,
    PreferenceEvent,
    parse_stream_event,
)
from online_rl.store.base import UNSET, ConflictError, FeedbackStore, NotFoundError, StoreOptions

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    sha256 TEXT PRIMARY KEY, mime_type TEXT NOT NULL, size INTEGER NOT NULL, created REAL NOT NULL, data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS generations (
    id TEXT PRIMARY KEY, created REAL NOT NULL, user_id TEXT NOT NULL, prompt_hash TEXT NOT NULL,
    adapter_version INTEGER, record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS generations_user ON generations (user_id);
CREATE INDEX IF NOT EXISTS generations_prompt ON generations (prompt_hash);
CREATE INDEX IF NOT EXISTS generations_created ON generations (created);
CREATE TABLE IF NOT EXISTS generation_images (
    generation_id TEXT NOT NULL, sha256 TEXT NOT NULL, PRIMARY KEY (generation_id, sha256)
);
CREATE INDEX IF NOT EXISTS generation_images_sha ON generation_images (sha256);
CREATE TABLE IF NOT EXISTS facts (
    id TEXT PRIMARY KEY, image_sha256 TEXT NOT NULL, user_id TEXT, created REAL NOT NULL, record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS facts_image ON facts (image_sha256);
CREATE INDEX IF NOT EXISTS facts_user ON facts (user_id);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, user_id TEXT NOT NULL,
    idempotency_key TEXT, fingerprint TEXT NOT NULL, created REAL NOT NULL, adapter_version INTEGER,
    payload TEXT NOT NULL, UNIQUE (user_id, idempotency_key)
);
CREATE INDEX IF NOT EXISTS events_user ON events (user_id);
CREATE INDEX IF NOT EXISTS events_created ON events (created);
CREATE TABLE IF NOT EXISTS event_generations (
    event_id TEXT NOT NULL, generation_id TEXT NOT NULL, PRIMARY KEY (event_id, generation_id)
);
CREATE INDEX IF NOT EXISTS event_generations_generation ON event_generations (generation_id);
CREATE TABLE IF NOT EXISTS consumer_groups (name TEXT PRIMARY KEY, last_delivered_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pending (
    group_name TEXT NOT NULL, seq INTEGER NOT NULL, consumer TEXT NOT NULL, delivered_at REAL NOT NULL,
    delivery_count INTEGER NOT NULL, PRIMARY KEY (group_name, seq)
);
CREATE INDEX IF NOT EXISTS pending_seq ON pending (seq);
CREATE TABLE IF NOT EXISTS adapters (version INTEGER PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS aliases (alias TEXT PRIMARY KEY, version INTEGER);
CREATE TABLE IF NOT EXISTS alias_history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, alias TEXT NOT NULL, record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alias_history_alias ON alias_history (alias);
CREATE TABLE IF NOT EXISTS canaries (alias TEXT PRIMARY KEY, version INTEGER NOT NULL, fraction REAL NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
SYNCHRONOUS_MODES = ("off", "normal", "full", "extra")


class SQLiteStore(FeedbackStore):
    """The store in one SQLite file. Safe to share between threads (a connection each) and processes."""

    def __init__(self, path: str | Path, options: StoreOptions | None = None, synchronous: str = "normal"):
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self.options = options or StoreOptions()
        self.synchronous = synchronous
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._create_schema()

    # ---- connections and transactions ---------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("PRAGMA foreign_keys=OFF")
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    def _create_schema(self) -> None:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row["value"]) != SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has store schema {row['value']}; this code reads {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE takes the write lock up front, so it never fails half-way."""
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _read(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        return self._connection().execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            for db in self._connections:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
            self._connections.clear()
        self._local = threading.local()

    # ---- images --------------------------------------------------------------------------------------------
    def _put_image(self, blob: ImageBlob, data: bytes) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO images (sha256, mime_type, size, created, data) VALUES (?, ?, ?, ?, ?)",
                (blob.sha256, blob.mime_type, blob.size, blob.created, data),
            )

    def get_image(self, sha256: str) -> bytes | None:
        rows = self._read("SELECT data FROM images WHERE sha256 = ?", (sha256,))
        return bytes(rows[0]["data"]) if rows else None

    def image_info(self, sha256: str) -> ImageBlob | None:
        rows = self._read("SELECT sha256, mime_type, size, created FROM images WHERE sha256 = ?", (sha256,))
        return ImageBlob(**dict(rows[0])) if rows else None

    # ---- generation records ----------------------------------------------------------------------------------
    def _add_generation(self, record: GenerationRecord) -> None:
        try:
            with self._write() as db:
                db.execute(
                    "INSERT INTO generations (id, created, user_id, prompt_hash, adapter_version, record) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        record.id,
                        record.created,
                        record.user_id,
                        record.prompt_hash,
                        record.adapter_version,
                        record.to_json(),
                    ),
                )
                db.executemany(
                    "INSERT INTO generation_images (generation_id, sha256) VALUES (?, ?)",
                    [(record.id, sha) for sha in record.image_hashes],
                )
        except sqlite3.IntegrityError as error:
            raise ConflictError(f"a generation with id {record.id!r} already exists") from error

    def get_generation(self, generation_id: str) -> GenerationRecord | None:
        rows = self._read("SELECT record FROM generations WHERE id = ?", (generation_id,))
        return GenerationRecord.model_validate_json(rows[0]["record"]) if rows else None

    def generations_for_prompt(self, prompt_hash: str) -> list[GenerationRecord]:
        rows = self._read("SELECT record FROM generations WHERE prompt_hash = ? ORDER BY created, id", (prompt_hash,))
        return [GenerationRecord.model_validate_json(row["record"]) for row in rows]

    def list_generations(self, user_id: str | None = None, limit: int = 1000) -> list[GenerationRecord]:
        if user_id is None:
            rows = self._read("SELECT record FROM generations ORDER BY created DESC, id LIMIT ?", (limit,))
        else:
            rows = self._read(
                "SELECT record FROM generations WHERE user_id = ? ORDER BY created DESC, id LIMIT ?", (user_id, limit)
            )
        return [GenerationRecord.model_validate_json(row["record"]) for row in rows]

    def generations_using_image(self, sha256: str) -> list[str]:
        return [
            r[0]
            for r in self._read(
                "SELECT generation_id FROM generation_images WHERE sha256 = ? ORDER BY generation_id", (sha256,)
            )
        ]

    # ---- facts ---------------------------------------------------------------------------------------------
    def _add_facts(self, record: FactsRecord) -> None:
        with self._write() as db:
            self._insert_facts(db, [record])

    @staticmethod
    def _insert_facts(db: sqlite3.Connection, records: list[FactsRecord]) -> None:
        db.executemany(
            "INSERT INTO facts (id, image_sha256, user_id, created, record) VALUES (?, ?, ?, ?, ?)",
            [(r.id, r.image_sha256, r.user_id, r.created, r.to_json()) for r in records],
        )

    def get_facts(self, image_sha256: str) -> list[FactsRecord]:
        rows = self._read("SELECT record FROM facts WHERE image_sha256 = ? ORDER BY created, id", (image_sha256,))
        return [FactsRecord.model_validate_json(row["record"]) for row in rows]

    # ---- the event stream ------------------------------------------------------------------------------------
    def _append_event(self, event, fingerprint: str, generation_ids: list[str], facts: list[FactsRecord]):
        with self._write() as db:
            if event.idempotency_key is not None:
                row = db.execute(
                    "SELECT payload, fingerprint FROM events WHERE user_id = ? AND idempotency_key = ?",
                    (event.user_id, event.idempotency_key),
                ).fetchone()
                if row is not None:
                    if row["fingerprint"] != fingerprint:
                        raise ConflictError("this idempotency key was already used for different feedback")
                    return parse_stream_event(row["payload"])
            for generation_id in generation_ids:
                if db.execute("SELECT 1 FROM generations WHERE id = ?", (generation_id,)).fetchone() is None:
                    raise NotFoundError(f"no generation with id {generation_id!r}")
            adapter_version = event.adapter_version if isinstance(event, FeedbackEvent) else None
            db.execute(
                "INSERT INTO events "
                "(id, kind, user_id, idempotency_key, fingerprint, created, adapter_version, payload) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    event.id,
                    event.kind,
                    event.user_id,
                    event.idempotency_key,
                    fingerprint,
                    event.created,
                    adapter_version,
                    event.to_json(),
                ),
            )
            db.executemany(
                "INSERT OR IGNORE INTO event_generations (event_id, generation_id) VALUES (?, ?)",
                [(event.id, generation_id) for generation_id in generation_ids],
            )
            self._insert_facts(db, facts)
        return event

    def get_event(self, event_id: str) -> FeedbackEvent | PreferenceEvent | None:
        rows = self._read("SELECT payload FROM events WHERE id = ?", (event_id,))
        return parse_stream_event(rows[0]["payload"]) if rows else None

    def events_for_generation(self, generation_id: str) -> list[FeedbackEvent | PreferenceEvent]:
        rows = self._read(
            "SELECT e.payload FROM events e JOIN event_generations g ON g.event_id = e.id "
            "WHERE g.generation_id = ? ORDER BY e.seq",
            (generation_id,),
        )
        return [parse_stream_event(row["payload"]) for row in rows]

    def list_events(self, after: str | None = None, limit: int = 1000):
        rows = self._read(
            "SELECT seq, payload FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (int(after or 0), limit)
        )
        return [(str(row["seq"]), parse_stream_event(row["payload"])) for row in rows]

    def count_events(self, since: float | None = None) -> int:
        return int(self._read("SELECT COUNT(*) AS n FROM events WHERE created >= ?", (since or 0.0,))[0]["n"])

    def _read_events(self, group, consumer, count, include_own_pending, min_idle_ms) -> list[Delivery]:
        now = time.time()
        found: list[tuple[int, str, int]] = []  # (seq, payload, delivery_count)
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO consumer_groups (name, last_delivered_seq) VALUES (?, 0)", (group,))
            if include_own_pending:
                rows = db.execute(
                    "SELECT p.seq, e.payload, p.delivery_count + 1 FROM pending p JOIN events e ON e.seq = p.seq "
                    "WHERE p.group_name = ? AND p.consumer = ? ORDER BY p.seq LIMIT ?",
                    (group, consumer, count),
                ).fetchall()
                found += [(r[0], r[1], r[2]) for r in rows]
            if len(found) < count:  # claim what other consumers left idle (XAUTOCLAIM)
                rows = db.execute(
                    "SELECT p.seq, e.payload, p.delivery_count + 1 FROM pending p JOIN events e ON e.seq = p.seq "
                    "WHERE p.group_name = ? AND p.delivered_at <= ? AND NOT (p.consumer = ? AND ?) "
                    "ORDER BY p.seq LIMIT ?",
                    (group, now - min_idle_ms / 1000, consumer, include_own_pending, count - len(found)),
                ).fetchall()
                found += [(r[0], r[1], r[2]) for r in rows]
            # Every redelivery counts, as in Redis (XREADGROUP 0 and XAUTOCLAIM both bump times_delivered).
            db.executemany(
                "UPDATE pending SET consumer = ?, delivered_at = ?, delivery_count = ? "
                "WHERE group_name = ? AND seq = ?",
                [(consumer, now, n, group, seq) for seq, _, n in found],
            )
            if len(found) < count:  # new events after the group's cursor (XREADGROUP >)
                cursor = db.execute(
                    "SELECT last_delivered_seq FROM consumer_groups WHERE name = ?", (group,)
                ).fetchone()[0]
                rows = db.execute(
                    "SELECT seq, payload FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (cursor, count - len(found))
                ).fetchall()
                if rows:
                    db.executemany(
                        "INSERT INTO pending (group_name, seq, consumer, delivered_at, delivery_count) "
                        "VALUES (?, ?, ?, ?, 1)",
                        [(group, r[0], consumer, now) for r in rows],
                    )
                    db.execute("UPDATE consumer_groups SET last_delivered_seq = ? WHERE name = ?", (rows[-1][0], group))
                found += [(r[0], r[1], 1) for r in rows]
        found.sort(key=lambda item: item[0])
        return [
            Delivery(delivery_id=str(seq), event=parse_stream_event(payload), delivery_count=n)
            for seq, payload, n in found
        ]

    def ack_events(self, group: str, delivery_ids: Iterable[str]) -> int:
        with self._write() as db:
            return self._ack(db, group, delivery_ids)

    @staticmethod
    def _ack(db: sqlite3.Connection, group: str, delivery_ids: Iterable[str]) -> int:
        acked = 0
        for delivery_id in delivery_ids:
            acked += db.execute(
                "DELETE FROM pending WHERE group_name = ? AND seq = ?", (group, int(delivery_id))
            ).rowcount
        return acked

    def pending_count(self, group: str) -> int:
        return int(self._read("SELECT COUNT(*) AS n FROM pending WHERE group_name = ?", (group,))[0]["n"])

    # ---- adapter registry ------------------------------------------------------------------------------------
    @staticmethod
    def _counter(db: sqlite3.Connection, name: str) -> int:
        row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    @classmethod
    def _increment(cls, db: sqlite3.Connection, name: str) -> int:
        value = cls._counter(db, name) + 1
        db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)", (name, value))
        return value

    def allocate_adapter_version(self) -> int:
        with self._write() as db:
            return self._increment(db, "adapter_version")

    def last_allocated_version(self) -> int:
        return self._counter(self._connection(), "adapter_version")

    def _register_adapter(self, adapter: AdapterVersion, ack) -> None:
        try:
            with self._write() as db:
                db.execute("INSERT INTO adapters (version, record) VALUES (?, ?)", (adapter.version, adapter.to_json()))
                self._increment(db, "registry_revision")
                if ack is not None:
                    self._ack(db, ack[0], ack[1])
        except sqlite3.IntegrityError as error:
            raise ConflictError(f"adapter version {adapter.version} is already registered") from error

    def get_adapter(self, version: int) -> AdapterVersion | None:
        rows = self._read("SELECT record FROM adapters WHERE version = ?", (version,))
        return AdapterVersion.model_validate_json(rows[0]["record"]) if rows else None

    def list_adapters(self) -> list[AdapterVersion]:
        return [
            AdapterVersion.model_validate_json(r["record"])
            for r in self._read("SELECT record FROM adapters ORDER BY version")
        ]

    def _update_adapter(self, version: int, change) -> AdapterVersion:
        with self._write() as db:
            row = db.execute("SELECT record FROM adapters WHERE version = ?", (version,)).fetchone()
            if row is None:
                raise NotFoundError(f"adapter version {version} is not registered")
            adapter = change(AdapterVersion.model_validate_json(row[0]))
            db.execute("UPDATE adapters SET record = ? WHERE version = ?", (adapter.to_json(), version))
        return adapter

    def promoted_version(self, alias: str) -> int | None:
        rows = self._read("SELECT version FROM aliases WHERE alias = ?", (alias,))
        return rows[0]["version"] if rows else None

    def aliases(self) -> dict[str, int | None]:
        return {row["alias"]: row["version"] for row in self._read("SELECT alias, version FROM aliases ORDER BY alias")}

    def _move_alias(self, alias, version, expected, action, actor, reason) -> AliasChange:
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT version FROM aliases WHERE alias = ?", (alias,)).fetchone()
            current = row[0] if row else None
            if expected is not UNSET and current != expected:
                raise ConflictError(f"alias {alias!r} serves {_version_label(current)}, not {_version_label(expected)}")
            db.execute("INSERT OR REPLACE INTO aliases (alias, version) VALUES (?, ?)", (alias, version))
            if current is not None and current != version:
                self._set_status(db, current, "retired", now)
            if version is not None:
                self._set_status(db, version, "promoted", now)
            revision = self._increment(db, "registry_revision")
            change = AliasChange(
                seq=revision,
                alias=alias,
                from_version=current,
                to_version=version,
                action=action,
                actor=actor,
                reason=reason,
                created=now,
            )
            db.execute("INSERT INTO alias_history (alias, record) VALUES (?, ?)", (alias, change.to_json()))
        return change

    @staticmethod
    def _set_status(db: sqlite3.Connection, version: int, status: str, now: float) -> None:
        row = db.execute("SELECT record FROM adapters WHERE version = ?", (version,)).fetchone()
        if row is not None:
            adapter = AdapterVersion.model_validate_json(row[0]).model_copy(update={"status": status, "updated": now})
            db.execute("UPDATE adapters SET record = ? WHERE version = ?", (adapter.to_json(), version))

    def alias_history(self, alias: str) -> list[AliasChange]:
        rows = self._read("SELECT record FROM alias_history WHERE alias = ? ORDER BY seq", (alias,))
        return [AliasChange.model_validate_json(row["record"]) for row in rows]

    def _append_history(self, change: AliasChange) -> None:
        with self._write() as db:
            db.execute("INSERT INTO alias_history (alias, record) VALUES (?, ?)", (change.alias, change.to_json()))

    def _set_canary(self, alias: str, version: int | None, fraction: float, change: AliasChange) -> AliasChange:
        with self._write() as db:
            if version is None:
                db.execute("DELETE FROM canaries WHERE alias = ?", (alias,))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO canaries (alias, version, fraction) VALUES (?, ?, ?)",
                    (alias, version, fraction),
                )
            change = change.model_copy(update={"seq": self._increment(db, "registry_revision")})
            db.execute("INSERT INTO alias_history (alias, record) VALUES (?, ?)", (alias, change.to_json()))
        return change

    def canaries(self) -> dict[str, tuple[int, float]]:
        return {r["alias"]: (r["version"], r["fraction"]) for r in self._read("SELECT * FROM canaries ORDER BY alias")}

    def registry_revision(self) -> int:
        return self._counter(self._connection(), "registry_revision")

    # ---- retention and privacy -------------------------------------------------------------------------------
    def delete_user(self, user_id: str) -> dict[str, int]:
        with self._write() as db:
            generation_ids = [r[0] for r in db.execute("SELECT id FROM generations WHERE user_id = ?", (user_id,))]
            counts = self._delete_generations(db, generation_ids)
            own_events = [r[0] for r in db.execute("SELECT id FROM events WHERE user_id = ?", (user_id,))]
            counts["events"] += self._delete_events(db, own_events)
            counts["facts"] += db.execute("DELETE FROM facts WHERE user_id = ?", (user_id,)).rowcount
        return counts

    def _delete_generations_before(self, cutoff: float) -> dict[str, int]:
        with self._write() as db:
            generation_ids = [r[0] for r in db.execute("SELECT id FROM generations WHERE created < ?", (cutoff,))]
            return self._delete_generations(db, generation_ids)

    def _delete_generations(self, db: sqlite3.Connection, generation_ids: list[str]) -> dict[str, int]:
        """Deletes records, the events about them, and images (with their facts) no longer referenced."""
        counts = {"generations": 0, "events": 0, "images": 0, "facts": 0}
        images: set[str] = set()
        event_ids: set[str] = set()
        for generation_id in generation_ids:
            images.update(
                r[0]
                for r in db.execute("SELECT sha256 FROM generation_images WHERE generation_id = ?", (generation_id,))
            )
            event_ids.update(
                r[0]
                for r in db.execute("SELECT event_id FROM event_generations WHERE generation_id = ?", (generation_id,))
            )
            db.execute("DELETE FROM generation_images WHERE generation_id = ?", (generation_id,))
            counts["generations"] += db.execute("DELETE FROM generations WHERE id = ?", (generation_id,)).rowcount
        counts["events"] = self._delete_events(db, sorted(event_ids))
        for sha in sorted(images):
            if db.execute("SELECT 1 FROM generation_images WHERE sha256 = ? LIMIT 1", (sha,)).fetchone() is None:
                counts["images"] += db.execute("DELETE FROM images WHERE sha256 = ?", (sha,)).rowcount
                counts["facts"] += db.execute("DELETE FROM facts WHERE image_sha256 = ?", (sha,)).rowcount
        return counts

    @staticmethod
    def _delete_events(db: sqlite3.Connection, event_ids: list[str]) -> int:
        deleted = 0
        for event_id in event_ids:
            row = db.execute("SELECT seq FROM events WHERE id = ?", (event_id,)).fetchone()
            if row is None:
                continue
            db.execute("DELETE FROM pending WHERE seq = ?", (row[0],))
            db.execute("DELETE FROM event_generations WHERE event_id = ?", (event_id,))
            deleted += db.execute("DELETE FROM events WHERE seq = ?", (row[0],)).rowcount
        return deleted


def _version_label(version) -> str:
    return "the base model" if version is None else f"version {version}"
