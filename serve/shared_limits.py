"""Per-key limits shared by every gateway replica through the Redis store, so that N replicas behave as one: a key
allowed N requests a minute gets N in all, not N per replica, and at most `limit` requests in flight in all.

- `SharedRateLimiter`: the `limits` library's moving window on Redis: at most `per_minute` requests of a key in any
  60 seconds, counted in Redis, whichever replica took them.
- `SharedConcurrencyLimiter`: a lease per request in flight, in one Redis sorted set per key (member: the lease,
  score: when it expires, by Redis's clock). Acquiring is one Lua script (drop expired leases, count, add), so two
  replicas cannot both take the last slot. A replica renews its own leases every `lease_s / 3`; a replica that
  crashed stops renewing, and its slots expire after `lease_s` instead of leaking.

If Redis cannot be reached the limiters let requests through (and log it, at most once a minute): the answers do
not depend on Redis, and a failing limiter must not take the service down with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid

import redis.asyncio
from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

from serve.auth import concurrency_error, rate_limit_error

logger = logging.getLogger(__name__)

# KEYS[1]: the key's leases. ARGV: lease milliseconds, limit, lease id. Returns 1 when the lease was taken.
ACQUIRE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[1]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""
# KEYS: lease sets, ARGV[1]: lease milliseconds, then one lease id per key. Pushes back the expiry of leases still held.
RENEW = """
local now = redis.call('TIME')
local until_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', until_ms, ARGV[i + 1])
  redis.call('PEXPIRE', key, tonumber(ARGV[1]))
end
return #KEYS
"""


class _Warnings:
    """At most one log line a minute about an unreachable Redis."""

    def __init__(self):
        self.last = float("-inf")

    def failed(self, what: str, error: Exception) -> None:
        if time.monotonic() - self.last >= 60.0:
            self.last = time.monotonic()
            logger.warning("shared limit not enforced: %s failed error=%s: %s", what, type(error).__name__, error)


class SharedRateLimiter:
    def __init__(self, pool: redis.asyncio.ConnectionPool, prefix: str, per_minute: int):
        self.per_minute = per_minute
        self.item = RateLimitItemPerMinute(per_minute)
        self.storage = RedisStorage(
            "async+redis://", implementation="redispy", key_prefix=f"{prefix}:ratelimit", connection_pool=pool
        )
        self.limiter = MovingWindowRateLimiter(self.storage)
        self.warnings = _Warnings()

    async def check(self, key_id: str) -> None:
        try:
            if await self.limiter.hit(self.item, key_id):
                return
            stats = await self.limiter.get_window_stats(self.item, key_id)
        except redis.RedisError as error:
            self.warnings.failed("rate limit", error)
            return
        raise rate_limit_error(self.per_minute, round(stats.reset_time - time.time()))


class SharedConcurrencyLimiter:
    def __init__(self, pool: redis.asyncio.ConnectionPool, prefix: str, limit: int, lease_s: float = 30.0):
        self.limit = limit
        self.lease_ms = int(lease_s * 1000)
        self.prefix = prefix
        self.client = redis.asyncio.Redis(connection_pool=pool)
        self._acquire = self.client.register_script(ACQUIRE)
        self._renew = self.client.register_script(RENEW)
        self.replica = uuid.uuid4().hex[:12]
        self._ids = itertools.count()
        self.in_flight: dict[str, list[str]] = {}  # this replica's leases, by key: what it renews and releases
        self._releases: set[asyncio.Task] = set()
        self.warnings = _Warnings()

    def _key(self, key_id: str) -> str:
        return f"{self.prefix}:inflight:{key_id}"

    async def acquire(self, key_id: str) -> None:
        lease = f"{self.replica}-{next(self._ids)}"
        try:
            taken = await self._acquire(keys=[self._key(key_id)], args=[self.lease_ms, self.limit, lease])
        except redis.RedisError as error:
            self.warnings.failed("concurrency limit", error)
            taken = 1
            lease = ""  # nothing in Redis to release
        if not taken:
            raise concurrency_error(self.limit)
        self.in_flight.setdefault(key_id, []).append(lease)

    def release(self, key_id: str) -> None:
        leases = self.in_flight.get(key_id)
        if not leases:
            return
        lease = leases.pop()
        if not leases:
            del self.in_flight[key_id]
        if lease:
            task = asyncio.get_running_loop().create_task(self._release(key_id, lease))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _release(self, key_id: str, lease: str) -> None:
        try:
            await self.client.zrem(self._key(key_id), lease)
        except redis.RedisError as error:  # the lease expires by itself
            self.warnings.failed("concurrency release", error)

    async def renew_forever(self) -> None:
        """Keeps this replica's leases alive while their requests run (a background task of the app)."""
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            held = [
                (self._key(key_id), lease) for key_id, leases in self.in_flight.items() for lease in leases if lease
            ]
            if not held:
                continue
            try:
                await self._renew(keys=[key for key, _ in held], args=[self.lease_ms, *(lease for _, lease in held)])
            except redis.RedisError as error:
                self.warnings.failed("lease renewal", error)

    async def aclose(self) -> None:
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        with contextlib.suppress(redis.RedisError):
            await self.client.aclose()
