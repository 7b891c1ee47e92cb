"""The feedback store: one interface (`FeedbackStore`), two backends chosen by URL.

    open_store("sqlite:///runs/alignloop.db")                 # one file, WAL mode (the embedded default)
    open_store("sqlite:////var/lib/alignloop/alignloop.db")    # an absolute path: four slashes
    open_store("redis://127.0.0.1:6379/0?prefix=alignloop")    # Redis Streams, hashes and sorted sets

Query options on either URL: `retention_days=N` (generation records older than N days are purged by
`purge_expired`). SQLite also takes `synchronous=normal|full`. Redis takes `prefix=` (key namespace),
`password_file=PATH` (the password read from a file, e.g. a mounted Kubernetes secret, so that it appears in no URL,
setting or log line) and `images=DIR` (image bytes as content-addressed files in DIR, a volume every replica
shares, instead of in Redis's memory):

    open_store("redis://redis:6379/0?password_file=/run/secrets/redis/password&images=/data/images")
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from online_rl.store.base import (
    ConflictError,
    FeedbackStore,
    InvalidInputError,
    NotFoundError,
    StoreError,
    StoreOptions,
)

__all__ = [
    "ConflictError",
    "FeedbackStore",
    "InvalidInputError",
    "NotFoundError",
    "StoreError",
    "StoreOptions",
    "open_store",
]


def open_store(url: str) -> FeedbackStore:
    """Opens the store a URL names; raises ValueError with one clear line for a URL it cannot use."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    options = StoreOptions(retention_seconds=_retention_seconds(query.pop("retention_days", None)))
    if parts.scheme == "sqlite":
        from online_rl.store.sqlite import SQLiteStore

        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if parts.netloc or not path:
            raise ValueError(f"store URL {url!r}: use sqlite:///relative/path.db or sqlite:////absolute/path.db")
        synchronous = query.pop("synchronous", "normal").lower()
        _no_unknown(url, query)
        return SQLiteStore(path, options, synchronous=synchronous)
    if parts.scheme in ("redis", "rediss", "unix"):
        from online_rl.store.redis import RedisStore

        prefix = query.pop("prefix", "alignloop")
        if not prefix.strip(":"):
            raise ValueError(f"store URL {url!r}: prefix must not be empty")
        password = None
        password_file = query.pop("password_file", None)
        if password_file is not None:
            try:
                password = Path(password_file).read_text().rstrip("\r\n")
            except OSError as error:
                raise ValueError(f"store URL: cannot read password_file {password_file}: {error.strerror}") from None
        images = query.pop("images", None)
        if images is not None and not images.strip():
            raise ValueError(f"store URL {url!r}: images must name a directory")
        plain = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))
        return RedisStore(plain, options, prefix=prefix, password=password, images_dir=images)
    raise ValueError(f"store URL {url!r}: the scheme must be sqlite:// or redis://")


def _retention_seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        days = float(value)
    except ValueError:
        raise ValueError(f"retention_days must be a number, not {value!r}") from None
    if days <= 0:
        raise ValueError("retention_days must be positive")
    return days * 86400


def _no_unknown(url: str, query: dict[str, str]) -> None:
    if query:
        raise ValueError(f"store URL {url!r}: unknown option(s) {', '.join(sorted(query))}")
