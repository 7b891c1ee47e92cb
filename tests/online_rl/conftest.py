"""Fixtures for the store tests: one `store` fixture that runs every contract test on SQLite and on real Redis."""

from __future__ import annotations

import pytest

from online_rl.store import open_store


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'alignloop.db'}"
    return request.getfixturevalue("redis_store_url")


@pytest.fixture
def store(store_url):
    with open_store(store_url) as opened:
        yield opened
