"""The demo's tests reuse the gateway's unit-tier fixtures: the real app on a fake vLLM, with a SQLite store."""

from tests.serve.conftest import client, fake_vllm, settings, store  # noqa: F401  (fixtures)
