"""Fixtures for the store tests: one `store` fixture that runs every contract test on SQLite, on real Redis, and on
real Redis with image files on a volume."""

from __future__ import annotations

import pytest

from online_rl.store import open_store


@pytest.fixture(params=["sqlite", "redis", "redis-image-files"])
def store_url(request, tmp_path):
    """SQLite; Redis; Redis with image bytes as files on a shared volume (`?images=DIR`), not in Redis's memory."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'alignloop.db'}"
    url = request.getfixturevalue("redis_store_url")
    if request.param == "redis-image-files":
        url += f"&images={tmp_path / 'images'}"
    return url


@pytest.fixture
def store(store_url):
    with open_store(store_url) as opened:
        yield opened
