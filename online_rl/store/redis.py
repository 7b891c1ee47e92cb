"""The Redis backend: for several gateway replicas and a separate trainer sharing one store.

Where things live, under a key prefix (default `alignloop`, `?prefix=` in the URL):
- `{p}:events`: the stream (XADD), read by consumer groups (XREADGROUP, XACK, XAUTOCLAIM); its entry ids are the
  delivery ids. Each event is also kept as a hash `{p}:event:{id}` (payload, stream id) for lookups;
- `{p}:gen:{id}`: a generation record (JSON string), indexed by `{p}:gens:created` (sorted set, for retention),
  `{p}:user:{u}:gens` and `{p}:prompt:{hash}` (sets);
- `{p}:img:{sha256}`: image bytes and metadata (hash), with `{p}:img:{sha256}:refs`, the set of generation ids
  that use it, so an image is deleted with its last reference; `{p}:facts:{sha256}` (hash of facts records).
  With an image directory (`?images=/data/images` in the URL) the bytes stay out of Redis's memory: they are
  content-addressed files `<dir>/<sha[:2]>/<sha256>` on a volume every replica shares, and the hash holds only the
  metadata (see `ImageFiles`);
- `{p}:idem:{u}:{key}`: the event an idempotency key produced and its content fingerprint;
- `{p}:adapter:{n}`, `{p}:adapters` (sorted set), `{p}:adapters:next` (INCR counter), `{p}:alias:{name}`,
  `{p}:alias:{name}:history` (list), `{p}:registry:revision`, and the pub/sub channel `{p}:registry`, on which
  every alias move is published so gateways swap at once.

Appending an event is one Lua script (idempotency check, existence checks, XADD, indexes), so it is atomic; the
registry's compare-and-set runs as a WATCH/MULTI transaction. Redis must persist (appendonly yes) for the
acknowledged-means-durable promise to hold across a Redis restart; the test server here keeps nothing on disk.
All keys of one store are plain keys, not hash-tagged: this backend targets one Redis (or a replicated primary),
not Redis Cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import redis
import redis.asyncio

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

logger = logging.getLogger(__name__)

# KEYS: the stream, the idempotency key ('' for none), the event hash, then `n_required` keys that must exist, then
# `n_sadd` sets, then hashes. ARGV: event id, payload, fingerprint, n_required, n_sadd, one member per set, then a
# (field, value) pair per hash.
APPEND_EVENT = """
local n_required, n_sadd = tonumber(ARGV[4]), tonumber(ARGV[5])
if KEYS[2] ~= '' then
  local existing = redis.call('GET', KEYS[2])
  if existing then return {'exists', existing} end
end
for i = 4, 3 + n_required do
  if redis.call('EXISTS', KEYS[i]) == 0 then return {'missing', KEYS[i]} end
end
local stream_id = redis.call('XADD', KEYS[1], '*', 'id', ARGV[1], 'event', ARGV[2])
redis.call('HSET', KEYS[3], 'event', ARGV[2], 'stream_id', stream_id)
local arg = 6
for i = 4 + n_required, #KEYS do
  if i < 4 + n_required + n_sadd then
    redis.call('SADD', KEYS[i], ARGV[arg])
    arg = arg + 1
  else
    redis.call('HSET', KEYS[i], ARGV[arg], ARGV[arg + 1])
    arg = arg + 2
  end
end
if KEYS[2] ~= '' then redis.call('SET', KEYS[2], ARGV[1] .. '|' .. ARGV[3]) end
return {'ok', stream_id}
"""


class RedisStore(FeedbackStore):
    """The store in Redis (redis-py's synchronous client; thread-safe through its connection pool)."""

    def __init__(
        self,
        url: str,
        options: StoreOptions | None = None,
        prefix: str = "alignloop",
        password: str | None = None,
        images_dir: str | Path | None = None,
    ):
        """`password` overrides one in the URL (`open_store` reads it from `?password_file=`); with `images_dir`,
        image bytes are files there and Redis keeps only their metadata."""
        self.url = _without_password(url)  # for messages and logs; the client keeps the real one
        self.options = options or StoreOptions()
        self.prefix = prefix
        self._connection = (url, {"password": password} if password is not None else {})
        self.client = redis.Redis.from_url(url, decode_responses=False, health_check_interval=30, **self._connection[1])
        try:
            self.client.ping()
        except redis.RedisError as error:
            raise ConnectionError(f"cannot reach the Redis store at {_without_password(url)}: {error}") from error
        self._append_script = self.client.register_script(APPEND_EVENT)
        self.image_files = ImageFiles(images_dir) if images_dir is not None else None

    def async_client(self) -> redis.asyncio.Redis:
        """A client of the same Redis for an event loop (the gateway's shared limits), same credentials."""
        url, extra = self._connection
        return redis.asyncio.Redis.from_url(url, decode_responses=False, health_check_interval=30, **extra)

    def async_connection_pool(self) -> redis.asyncio.ConnectionPool:
        url, extra = self._connection
        return redis.asyncio.ConnectionPool.from_url(url, health_check_interval=30, **extra)

    def key(self, *parts: str | int) -> str:
        return ":".join([self.prefix, *map(str, parts)])

    def close(self) -> None:
        self.client.close()

    # ---- images --------------------------------------------------------------------------------------------
    def _put_image(self, blob: ImageBlob, data: bytes) -> None:
        key = self.key("img", blob.sha256)
        if self.image_files is not None:
            # The file first, then the metadata, then the file again if a concurrent delete took it meanwhile
            # (`_delete_image_file` puts back a file whose metadata reappeared): a stored image always has its file.
            self.image_files.write(blob.sha256, data)
            self.client.hsetnx(key, "meta", blob.to_json())
            if not self.image_files.exists(blob.sha256):
                self.image_files.write(blob.sha256, data)
            return
        # HSETNX on the data field keeps the first write; the metadata is the same for the same bytes.
        pipe = self.client.pipeline(transaction=True)
        pipe.hsetnx(key, "data", data)
        pipe.hsetnx(key, "meta", blob.to_json())
        pipe.execute()

    def get_image(self, sha256: str) -> bytes | None:
        if self.image_files is None:
            return self.client.hget(self.key("img", sha256), "data")
        if not self.client.hexists(self.key("img", sha256), "meta"):
            return None
        data = self.image_files.read(sha256)
        if data is None:
            logger.error("image file missing sha256=%s dir=%s", sha256, self.image_files.root)
        return data

    def image_info(self, sha256: str) -> ImageBlob | None:
        meta = self.client.hget(self.key("img", sha256), "meta")
        return ImageBlob.model_validate_json(meta) if meta else None

    # ---- generation records ----------------------------------------------------------------------------------
    def _add_generation(self, record: GenerationRecord) -> None:
        key = self.key("gen", record.id)
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                if pipe.exists(key):
                    raise ConflictError(f"a generation with id {record.id!r} already exists")
                pipe.multi()
                pipe.set(key, record.to_json())
                pipe.zadd(self.key("gens", "created"), {record.id: record.created})
                pipe.sadd(self.key("user", record.user_id, "gens"), record.id)
                pipe.sadd(self.key("prompt", record.prompt_hash), record.id)
                for sha in record.image_hashes:
                    pipe.sadd(self.key("img", sha, "refs"), record.id)
                pipe.execute()
            except redis.WatchError as error:
                raise ConflictError(f"a generation with id {record.id!r} already exists") from error

    def get_generation(self, generation_id: str) -> GenerationRecord | None:
        data = self.client.get(self.key("gen", generation_id))
        return GenerationRecord.model_validate_json(data) if data else None

    def _generations(self, ids: Iterable[bytes | str]) -> list[GenerationRecord]:
        keys = [self.key("gen", i.decode() if isinstance(i, bytes) else i) for i in ids]
        values = self.client.mget(keys) if keys else []
        return [GenerationRecord.model_validate_json(v) for v in values if v]

    def generations_for_prompt(self, prompt_hash: str) -> list[GenerationRecord]:
        records = self._generations(self.client.smembers(self.key("prompt", prompt_hash)))
        return sorted(records, key=lambda r: (r.created, r.id))

    def list_generations(self, user_id: str | None = None, limit: int = 1000) -> list[GenerationRecord]:
        if user_id is None:
            ids = self.client.zrevrange(self.key("gens", "created"), 0, limit - 1)
            return self._generations(ids)
        records = self._generations(self.client.smembers(self.key("user", user_id, "gens")))
        return sorted(records, key=lambda r: (-r.created, r.id))[:limit]

    def generations_using_image(self, sha256: str) -> list[str]:
        return sorted(g.decode() for g in self.client.smembers(self.key("img", sha256, "refs")))

    # ---- facts ---------------------------------------------------------------------------------------------
    def _add_facts(self, record: FactsRecord) -> None:
        pipe = self.client.pipeline(transaction=True)
        self._queue_facts(pipe, record)
        pipe.execute()

    def _queue_facts(self, pipe, record: FactsRecord) -> None:
        pipe.hset(self.key("facts", record.image_sha256), record.id, record.to_json())
        if record.user_id:
            pipe.sadd(self.key("user", record.user_id, "facts"), f"{record.image_sha256}|{record.id}")

    def get_facts(self, image_sha256: str) -> list[FactsRecord]:
        records = [FactsRecord.model_validate_json(v) for v in self.client.hvals(self.key("facts", image_sha256))]
        return sorted(records, key=lambda r: (r.created, r.id))

    # ---- the event stream ------------------------------------------------------------------------------------
    def _append_event(self, event, fingerprint: str, generation_ids: list[str], facts: list[FactsRecord]):
        idem_key = self.key("idem", event.user_id, event.idempotency_key) if event.idempotency_key else ""
        required = [self.key("gen", g) for g in generation_ids]
        sets = [(self.key("gen", g, "events"), event.id) for g in generation_ids]
        sets.append((self.key("user", event.user_id, "events"), event.id))
        sets += [(self.key("user", f.user_id, "facts"), f"{f.image_sha256}|{f.id}") for f in facts if f.user_id]
        hashes = [(self.key("facts", f.image_sha256), f.id, f.to_json()) for f in facts]
        result = self._append_script(
            keys=[
                self.key("events"),
                idem_key,
                self.key("event", event.id),
                *required,
                *(key for key, _ in sets),
                *(key for key, _, _ in hashes),
            ],
            args=[
                event.id,
                event.to_json(),
                fingerprint,
                len(required),
                len(sets),
                *(member for _, member in sets),
                *(value for _, field, json in hashes for value in (field, json)),
            ],
        )
        status = result[0].decode()
        if status == "missing":
            missing = result[1].decode().removeprefix(self.key("gen") + ":")
            raise NotFoundError(f"no generation with id {missing!r}")
        if status == "exists":
            existing_id, _, existing_fingerprint = result[1].decode().partition("|")
            if existing_fingerprint != fingerprint:
                raise ConflictError("this idempotency key was already used for different feedback")
            stored = self.get_event(existing_id)
            if stored is None:
                raise NotFoundError(f"the event {existing_id} this idempotency key produced has been deleted")
            return stored
        return event

    def get_event(self, event_id: str) -> FeedbackEvent | PreferenceEvent | None:
        payload = self.client.hget(self.key("event", event_id), "event")
        return parse_stream_event(payload) if payload else None

    def _events_by_id(self, event_ids: Iterable[bytes]) -> list[tuple[str, FeedbackEvent | PreferenceEvent]]:
        pipe = self.client.pipeline(transaction=False)
        for event_id in event_ids:
            pipe.hmget(self.key("event", event_id.decode()), "stream_id", "event")
        rows = [(sid.decode(), parse_stream_event(payload)) for sid, payload in pipe.execute() if payload]
        return sorted(rows, key=lambda row: _stream_order(row[0]))

    def events_for_generation(self, generation_id: str) -> list[FeedbackEvent | PreferenceEvent]:
        return [
            event for _, event in self._events_by_id(self.client.smembers(self.key("gen", generation_id, "events")))
        ]

    def list_events(self, after: str | None = None, limit: int = 1000):
        start = f"({after}" if after else "-"
        entries = self.client.xrange(self.key("events"), start, "+", count=limit)
        return [(sid.decode(), parse_stream_event(fields[b"event"])) for sid, fields in entries]

    def count_events(self, since: float | None = None) -> int:
        if since is None:
            return int(self.client.xlen(self.key("events")))
        # Stream ids carry Redis' clock, `created` the writer's: start a minute early, then filter on `created`.
        cursor, count = f"{max(0, int((since - 60) * 1000))}-0", 0
        while True:
            entries = self.client.xrange(self.key("events"), cursor, "+", count=1000)
            count += sum(1 for _, fields in entries if parse_stream_event(fields[b"event"]).created >= since)
            if len(entries) < 1000:
                return count
            cursor = "(" + entries[-1][0].decode()

    def _ensure_group(self, group: str) -> None:
        try:
            self.client.xgroup_create(self.key("events"), group, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def _read_events(self, group, consumer, count, include_own_pending, min_idle_ms) -> list[Delivery]:
        self._ensure_group(group)
        stream = self.key("events")
        found: dict[str, tuple[bytes, int | None]] = {}  # stream id -> (payload, delivery count if known)
        deleted: list[str] = []
        if include_own_pending:
            response = self.client.xreadgroup(group, consumer, {stream: "0"}, count=count)
            for sid, fields in response[0][1] if response else []:
                if fields:
                    found[sid.decode()] = (fields[b"event"], None)
                else:  # deleted from the stream while pending
                    deleted.append(sid.decode())
        if len(found) < count:
            _, claimed, gone = self.client.xautoclaim(
                stream, group, consumer, min_idle_time=min_idle_ms, start_id="0-0", count=count - len(found)
            )
            deleted += [sid.decode() for sid in gone]
            for sid, fields in claimed:
                if fields and sid.decode() not in found:
                    found[sid.decode()] = (fields[b"event"], None)
        if len(found) < count:
            response = self.client.xreadgroup(group, consumer, {stream: ">"}, count=count - len(found))
            for sid, fields in response[0][1] if response else []:
                found[sid.decode()] = (fields[b"event"], 1)
        if deleted:
            self.client.xack(stream, group, *deleted)
        unknown = [sid for sid, (_, n) in found.items() if n is None]
        counts = {}
        if unknown:
            ordered = sorted(unknown, key=_stream_order)
            for entry in self.client.xpending_range(stream, group, ordered[0], ordered[-1], len(found) + 1000):
                counts[entry["message_id"].decode()] = int(entry["times_delivered"])
        deliveries = [
            Delivery(delivery_id=sid, event=parse_stream_event(payload), delivery_count=n or counts.get(sid, 1))
            for sid, (payload, n) in found.items()
        ]
        return sorted(deliveries, key=lambda d: _stream_order(d.delivery_id))

    def ack_events(self, group: str, delivery_ids: Iterable[str]) -> int:
        ids = list(delivery_ids)
        return int(self.client.xack(self.key("events"), group, *ids)) if ids else 0

    def pending_count(self, group: str) -> int:
        try:
            return int(self.client.xpending(self.key("events"), group)["pending"])
        except redis.ResponseError:  # no such group yet
            return 0

    # ---- adapter registry ------------------------------------------------------------------------------------
    def allocate_adapter_version(self) -> int:
        return int(self.client.incr(self.key("adapters", "next")))

    def last_allocated_version(self) -> int:
        return int(self.client.get(self.key("adapters", "next")) or 0)

    def _register_adapter(self, adapter: AdapterVersion, ack) -> None:
        key = self.key("adapter", adapter.version)
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                if pipe.exists(key):
                    raise ConflictError(f"adapter version {adapter.version} is already registered")
                pipe.multi()
                pipe.set(key, adapter.to_json())
                pipe.zadd(self.key("adapters"), {str(adapter.version): adapter.version})
                pipe.incr(self.key("registry", "revision"))
                pipe.publish(self.key("registry"), f'{{"registered": {adapter.version}}}')
                if ack is not None and ack[1]:
                    self._ensure_group(ack[0])
                    pipe.xack(self.key("events"), ack[0], *ack[1])
                pipe.execute()
            except redis.WatchError as error:
                raise ConflictError(f"adapter version {adapter.version} is already registered") from error

    def get_adapter(self, version: int) -> AdapterVersion | None:
        data = self.client.get(self.key("adapter", version))
        return AdapterVersion.model_validate_json(data) if data else None

    def list_adapters(self) -> list[AdapterVersion]:
        versions = [int(v) for v in self.client.zrange(self.key("adapters"), 0, -1)]
        values = self.client.mget([self.key("adapter", v) for v in versions]) if versions else []
        return [AdapterVersion.model_validate_json(v) for v in values if v]

    def _update_adapter(self, version: int, change) -> AdapterVersion:
        key = self.key("adapter", version)

        def update(pipe) -> AdapterVersion:
            data = pipe.get(key)
            if data is None:
                raise NotFoundError(f"adapter version {version} is not registered")
            adapter = change(AdapterVersion.model_validate_json(data))
            pipe.multi()
            pipe.set(key, adapter.to_json())
            return adapter

        return self.client.transaction(update, key, value_from_callable=True)

    def promoted_version(self, alias: str) -> int | None:
        return _decode_version(self.client.get(self.key("alias", alias)))

    def aliases(self) -> dict[str, int | None]:
        names = sorted(n.decode() for n in self.client.smembers(self.key("aliases")))
        values = self.client.mget([self.key("alias", n) for n in names]) if names else []
        return {name: _decode_version(value) for name, value in zip(names, values, strict=True)}

    def _move_alias(self, alias, version, expected, action, actor, reason) -> AliasChange:
        alias_key = self.key("alias", alias)

        def move(pipe) -> AliasChange:
            current = _decode_version(pipe.get(alias_key))
            if expected is not UNSET and current != expected:
                raise ConflictError(f"alias {alias!r} serves {_version_label(current)}, not {_version_label(expected)}")
            now = time.time()
            updates = {}
            if current is not None and current != version:
                updates[current] = "retired"
            if version is not None:
                updates[version] = "promoted"
            records = {}
            for number, status in updates.items():
                data = pipe.get(self.key("adapter", number))
                if data is not None:
                    adapter = AdapterVersion.model_validate_json(data)
                    records[number] = adapter.model_copy(update={"status": status, "updated": now})
            revision = int(pipe.get(self.key("registry", "revision")) or 0) + 1
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
            pipe.multi()
            pipe.set(alias_key, "" if version is None else str(version))
            pipe.sadd(self.key("aliases"), alias)
            for number, adapter in records.items():
                pipe.set(self.key("adapter", number), adapter.to_json())
            pipe.set(self.key("registry", "revision"), revision)
            pipe.rpush(self.key("alias", alias, "history"), change.to_json())
            pipe.publish(self.key("registry"), change.to_json())
            return change

        watched = [alias_key, self.key("registry", "revision")]
        watched += [self.key("adapter", v) for v in (version, expected) if isinstance(v, int)]
        return self.client.transaction(move, *watched, value_from_callable=True)

    def alias_history(self, alias: str) -> list[AliasChange]:
        return [
            AliasChange.model_validate_json(v) for v in self.client.lrange(self.key("alias", alias, "history"), 0, -1)
        ]

    def _append_history(self, change: AliasChange) -> None:
        self.client.rpush(self.key("alias", change.alias, "history"), change.to_json())

    def _set_canary(self, alias: str, version: int | None, fraction: float, change: AliasChange) -> AliasChange:
        revision_key = self.key("registry", "revision")

        def write(pipe) -> AliasChange:
            entry = change.model_copy(update={"seq": int(pipe.get(revision_key) or 0) + 1})
            pipe.multi()
            if version is None:
                pipe.delete(self.key("canary", alias))
                pipe.srem(self.key("canaries"), alias)
            else:
                pipe.hset(self.key("canary", alias), mapping={"version": version, "fraction": repr(fraction)})
                pipe.sadd(self.key("canaries"), alias)
            pipe.set(revision_key, entry.seq)
            pipe.rpush(self.key("alias", alias, "history"), entry.to_json())
            pipe.publish(self.key("registry"), entry.to_json())
            return entry

        return self.client.transaction(write, revision_key, value_from_callable=True)

    def canaries(self) -> dict[str, tuple[int, float]]:
        result = {}
        for alias in sorted(a.decode() for a in self.client.smembers(self.key("canaries"))):
            values = self.client.hmget(self.key("canary", alias), "version", "fraction")
            if values[0] is not None:
                result[alias] = (int(values[0]), float(values[1]))
        return result

    def registry_revision(self) -> int:
        return int(self.client.get(self.key("registry", "revision")) or 0)

    @property
    def registry_channel(self) -> str:
        """The pub/sub channel on which every alias move is published (the AliasChange as JSON)."""
        return self.key("registry")

    # ---- retention and privacy -------------------------------------------------------------------------------
    def delete_user(self, user_id: str) -> dict[str, int]:
        generation_ids = [g.decode() for g in self.client.smembers(self.key("user", user_id, "gens"))]
        counts = self._delete_generations(generation_ids)
        own_events = [e.decode() for e in self.client.smembers(self.key("user", user_id, "events"))]
        counts["events"] += self._delete_events(own_events)
        facts_refs = [f.decode() for f in self.client.smembers(self.key("user", user_id, "facts"))]
        pipe = self.client.pipeline(transaction=True)
        for ref in facts_refs:
            sha, _, facts_id = ref.partition("|")
            pipe.hdel(self.key("facts", sha), facts_id)
        pipe.delete(
            self.key("user", user_id, "facts"), self.key("user", user_id, "events"), self.key("user", user_id, "gens")
        )
        results = pipe.execute()
        counts["facts"] += sum(int(r) for r in results[: len(facts_refs)])
        return counts

    def _delete_generations_before(self, cutoff: float) -> dict[str, int]:
        ids = [g.decode() for g in self.client.zrangebyscore(self.key("gens", "created"), "-inf", f"({cutoff}")]
        return self._delete_generations(ids)

    def _delete_generations(self, generation_ids: list[str]) -> dict[str, int]:
        counts = {"generations": 0, "events": 0, "images": 0, "facts": 0}
        event_ids: set[str] = set()
        for generation_id in generation_ids:
            record = self.get_generation(generation_id)
            if record is None:
                continue
            event_ids.update(e.decode() for e in self.client.smembers(self.key("gen", generation_id, "events")))
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self.key("gen", generation_id))
            pipe.delete(self.key("gen", generation_id, "events"))
            pipe.zrem(self.key("gens", "created"), generation_id)
            pipe.srem(self.key("user", record.user_id, "gens"), generation_id)
            pipe.srem(self.key("prompt", record.prompt_hash), generation_id)
            for sha in record.image_hashes:
                pipe.srem(self.key("img", sha, "refs"), generation_id)
            counts["generations"] += int(pipe.execute()[0])
            for sha in record.image_hashes:
                images, facts = self._delete_image_if_unused(sha)
                counts["images"] += images
                counts["facts"] += facts
        counts["events"] = self._delete_events(sorted(event_ids))
        return counts

    def _delete_image_if_unused(self, sha: str) -> tuple[int, int]:
        refs_key = self.key("img", sha, "refs")

        def delete(pipe) -> tuple[int, int]:
            if pipe.scard(refs_key):
                return 0, 0
            facts = pipe.hlen(self.key("facts", sha))
            existed = pipe.exists(self.key("img", sha))
            pipe.multi()
            pipe.delete(self.key("img", sha), self.key("facts", sha), refs_key)
            return int(existed), int(facts)

        images, facts = self.client.transaction(delete, refs_key, value_from_callable=True)
        if images and self.image_files is not None:
            self._delete_image_file(sha)
        return images, facts

    def _delete_image_file(self, sha: str) -> None:
        """Removes an image's file after its metadata went. A concurrent `put_image` of the same bytes may have
        written the file and the metadata again meanwhile: the file is moved aside first and put back if the
        metadata is there again (the bytes are the same, being content-addressed)."""
        aside = self.image_files.move_aside(sha)
        if aside is None:
            return
        if self.client.hexists(self.key("img", sha), "meta"):
            self.image_files.restore(sha, aside)
        else:
            aside.unlink(missing_ok=True)

    def _delete_events(self, event_ids: list[str]) -> int:
        """Deletes events from the stream, their indexes and idempotency keys, and from every group's pending list
        (XDEL alone leaves pending entries behind)."""
        deleted = 0
        groups = [g["name"].decode() for g in self.client.xinfo_groups(self.key("events"))] if event_ids else []
        for event_id in event_ids:
            key = self.key("event", event_id)
            stream_id, payload = self.client.hmget(key, "stream_id", "event")
            if payload is None:
                continue
            event = parse_stream_event(payload)
            generation_ids = event.generation_ids if isinstance(event, PreferenceEvent) else (event.generation_id,)
            pipe = self.client.pipeline(transaction=True)
            pipe.xdel(self.key("events"), stream_id)
            for group in groups:
                pipe.xack(self.key("events"), group, stream_id)
            pipe.delete(key)
            pipe.srem(self.key("user", event.user_id, "events"), event_id)
            for generation_id in generation_ids:
                pipe.srem(self.key("gen", generation_id, "events"), event_id)
            if event.idempotency_key:
                pipe.delete(self.key("idem", event.user_id, event.idempotency_key))
            deleted += int(pipe.execute()[0])
        return deleted


class ImageFiles:
    """Content-addressed image files: `<root>/<sha[:2]>/<sha256>`, each written once, atomically (a temporary file
    in the same directory, fsynced, then renamed), so a reader never sees half an image."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def write(self, sha256: str, data: bytes) -> None:
        path = self.path(sha256)
        if path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{sha256}.", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise

    def read(self, sha256: str) -> bytes | None:
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            return None

    def move_aside(self, sha256: str) -> Path | None:
        path = self.path(sha256)
        aside = path.with_name(f".{sha256}.deleting-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return None
        return aside

    def restore(self, sha256: str, aside: Path) -> None:
        os.replace(aside, self.path(sha256))


def _without_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _decode_version(value: bytes | None) -> int | None:
    return int(value) if value else None


def _stream_order(stream_id: str) -> tuple[int, int]:
    millis, _, seq = stream_id.partition("-")
    return int(millis), int(seq or 0)


def _version_label(version) -> str:
    return "the base model" if version is None else f"version {version}"
