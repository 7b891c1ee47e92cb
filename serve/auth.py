"""Who is calling, and how much they may: API keys (kept hashed), the separate admin key, per-key rate limits and
caps on concurrent requests.

The limiters here count in this process: right for one gateway (the SQLite store). Gateway replicas that share a
Redis store share their limits through it instead (`serve.shared_limits`), with the same interface: `await
check(key_id)`, `await acquire(key_id)`, `release(key_id)`.

In development with no API keys configured, requests without a key are accepted as the `anonymous` key (a laptop
needs no setup); in production the settings refuse to start without keys. Admin endpoints always need the admin key.
The service key identifies alignloop's own traffic (the trainer's gate): it is not rate-limited as a user is, and
what it asks is neither recorded as a user's generation nor counted in per-version user metrics.
"""

from __future__ import annotations

import dataclasses
import hmac
import time

from serve.protocol import APIError
from serve.settings import GatewaySettings, key_digest

ANONYMOUS_KEY_ID = "k-anonymous"
ADMIN_KEY_ID = "k-admin"
SERVICE_KEY_ID = "k-service"


@dataclasses.dataclass(frozen=True)
class Caller:
    key_name: str
    key_id: str
    is_admin: bool = False
    is_service: bool = False


class Authenticator:
    def __init__(self, settings: GatewaySettings):
        self.keys = settings.api_key_table()
        self.admin_digest = key_digest(settings.admin_key.get_secret_value()) if settings.admin_key else None
        self.service_digest = key_digest(settings.service_key.get_secret_value()) if settings.service_key else None
        self.anonymous_allowed = settings.environment == "development" and not self.keys

    def authenticate(self, authorization: str | None) -> Caller:
        token = _bearer(authorization)
        if token is None:
            if self.anonymous_allowed:
                return Caller("anonymous", ANONYMOUS_KEY_ID)
            raise APIError(
                401,
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                code="missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        digest = key_digest(token)
        if self.admin_digest is not None and hmac.compare_digest(digest, self.admin_digest):
            return Caller("admin", ADMIN_KEY_ID, is_admin=True)
        if self.service_digest is not None and hmac.compare_digest(digest, self.service_digest):
            return Caller("service", SERVICE_KEY_ID, is_service=True)
        key = self.keys.get(digest)
        if key is not None:
            return Caller(key.name, key.key_id)
        if self.anonymous_allowed:
            return Caller("anonymous", ANONYMOUS_KEY_ID)
        raise APIError(
            401, "Incorrect API key provided.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )

    def require_operator(self, authorization: str | None) -> Caller:
        """The admin key, or the service key (the trainer promoting the versions its gate passed)."""
        token = _bearer(authorization)
        service = self.service_digest
        if token is not None and service is not None and hmac.compare_digest(key_digest(token), service):
            return Caller("service", SERVICE_KEY_ID, is_service=True)
        return self.require_admin(authorization)

    def require_admin(self, authorization: str | None) -> Caller:
        if self.admin_digest is None:
            raise APIError(403, "admin endpoints are disabled: set ALIGNLOOP_ADMIN_KEY", code="admin_disabled")
        token = _bearer(authorization)
        if token is None:
            raise APIError(
                401,
                "admin endpoints need the admin key as 'Authorization: Bearer ADMIN_KEY'",
                code="missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(key_digest(token), self.admin_digest):
            raise APIError(403, "this endpoint needs the admin key", code="admin_key_required")
        return Caller("admin", ADMIN_KEY_ID, is_admin=True)


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def rate_limit_error(per_minute: int, retry_after_s: int) -> APIError:
    return APIError(
        429,
        f"Rate limit reached: {per_minute} requests per minute for this key.",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(max(1, retry_after_s))},
    )


def concurrency_error(limit: int) -> APIError:
    return APIError(
        429,
        f"Too many concurrent requests: at most {limit} in flight per key.",
        code="concurrency_limit_exceeded",
        headers={"Retry-After": "1"},
    )


class RateLimiter:
    """A token bucket per key: `per_minute` requests a minute on average, bursts up to `per_minute`."""

    def __init__(self, per_minute: int):
        self.capacity = float(per_minute)
        self.refill_per_s = per_minute / 60.0
        self.buckets: dict[str, tuple[float, float]] = {}  # key_id -> (tokens, last update)

    async def check(self, key_id: str) -> None:
        now = time.monotonic()
        tokens, last = self.buckets.get(key_id, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.refill_per_s)
        if tokens < 1.0:
            retry_after = max(1, round((1.0 - tokens) / self.refill_per_s))
            self.buckets[key_id] = (tokens, now)
            raise rate_limit_error(int(self.capacity), retry_after)
        self.buckets[key_id] = (tokens - 1.0, now)


class ConcurrencyLimiter:
    """At most `limit` requests of one key in flight at once; the next one is refused with a 429.

    The check and the increment have no await between them, so on one event loop they are atomic."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight: dict[str, int] = {}

    async def acquire(self, key_id: str) -> None:
        if self.in_flight.get(key_id, 0) >= self.limit:
            raise concurrency_error(self.limit)
        self.in_flight[key_id] = self.in_flight.get(key_id, 0) + 1

    def release(self, key_id: str) -> None:
        self.in_flight[key_id] -= 1
        if not self.in_flight[key_id]:
            del self.in_flight[key_id]
