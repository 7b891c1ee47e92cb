"""Gateway settings: one pydantic-settings class, read from flags and ALIGNLOOP_* environment variables.

Secrets (API keys, the admin key, the user-id salt) are `SecretStr`, so they never show in logs or reprs. Outside
development the gateway refuses to start without API keys, with a short admin key, or with the default salt.

    ALIGNLOOP_API_KEYS='alice:sk-alice-...,demo:sk-demo-...'   # "name:key" pairs (or bare keys), comma-separated
    ALIGNLOOP_ADMIN_KEY=...                                     # admin endpoints; never an API key
    ALIGNLOOP_VLLM_URLS='http://vllm-0:8000,http://vllm-1:8000' # external mode; empty = start vLLM here
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import CliSuppress, NoDecode, SettingsConfigDict

from alignloop.cores import checked_cores
from alignloop.settings import ModelSettings

DEFAULT_SALT = "alignloop-development-salt"
MIN_SECRET_CHARS = 16


@dataclasses.dataclass(frozen=True)
class ApiKey:
    """A configured API key, kept only as its sha256. `key_id` is what records store to name the key."""

    name: str
    digest: str

    @property
    def key_id(self) -> str:
        return f"k-{self.digest[:16]}"


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _split_list(value):
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class GatewaySettings(ModelSettings):
    """The gateway's settings, besides the shared store URL, model, public alias and adapter directory."""

    model_config = SettingsConfigDict(env_prefix="ALIGNLOOP_")

    environment: Literal["development", "production"] = Field(
        default="development", description="production refuses to start without keys, an admin key and a salt"
    )
    host: str = Field(default="127.0.0.1", description="the address the gateway binds")
    port: int = Field(default=8000, ge=1, le=65535, description="the gateway's port")
    log_level: str = Field(default="INFO", description="logging level of the gateway")

    # ---- the engine: vLLM started here (embedded) or elsewhere (external) ----------------------------------------
    vllm_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="external vLLM OpenAI servers, comma-separated; none starts one here"
    )
    base_model_name: str = Field(default="shapes-llava", description="the name vLLM serves the base model under")
    vllm_host: str = Field(default="127.0.0.1", description="embedded vLLM: its bind address")
    vllm_port: int = Field(default=8100, description="embedded vLLM: its port")
    vllm_dtype: str = Field(default="float32", description="embedded vLLM: --dtype (auto on GPUs)")
    vllm_max_model_len: int = Field(default=512, description="embedded vLLM: --max-model-len")
    vllm_max_lora_rank: int = Field(default=16, description="embedded vLLM: --max-lora-rank (>= every adapter's rank)")
    vllm_max_loras: int = Field(default=4, description="embedded vLLM: --max-loras, adapters in one batch")
    vllm_enforce_eager: bool = Field(default=True, description="embedded vLLM: --enforce-eager (no CUDA graphs)")
    vllm_cpu_kv_cache_gib: int = Field(default=1, description="embedded vLLM on CPU: KV cache size in GiB")
    vllm_cpus: Annotated[str | None, AfterValidator(checked_cores)] = Field(
        default=None,
        description="embedded vLLM on CPU: the cores its engine's threads are bound to, e.g. 0-3; none: vLLM's "
        "choice, or under `up` on a machine without a GPU the first half of the cores (the trainer gets the rest)",
    )
    vllm_extra_args: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="embedded vLLM: more server flags, comma-separated"
    )
    vllm_startup_timeout_s: float = Field(default=600.0, description="embedded vLLM: seconds to wait for it to start")
    vllm_log: Path | None = Field(default=Path("runs/vllm.log"), description="embedded vLLM: its log file")
    health_interval_s: float = Field(default=2.0, description="seconds between health checks of each vLLM server")

    # ---- store and routing ---------------------------------------------------------------------------------------
    alias_poll_interval_s: float = Field(
        default=0.25, gt=0, description="seconds between reads of the alias when no change notice arrives"
    )
    retention_purge_interval_s: float = Field(
        default=3600.0, description="seconds between purges of generation records past their retention"
    )

    # ---- auth (secrets: from the environment only) ---------------------------------------------------------------
    api_keys: CliSuppress[Annotated[list[SecretStr], NoDecode]] = Field(
        default_factory=list, description="API keys as name:key pairs (or bare keys), comma-separated"
    )
    admin_key: CliSuppress[SecretStr | None] = Field(default=None, description="the admin endpoints' key")
    user_id_salt: CliSuppress[SecretStr] = Field(
        default=SecretStr(DEFAULT_SALT), description="salt of the hashed user ids in records"
    )
    service_key: CliSuppress[SecretStr | None] = Field(
        default=None,
        description="the key of alignloop's own services (the trainer's gate): no user rate limit, its requests are "
        "not stored as users' generations nor counted in per-version user metrics; `alignloop up` generates one",
    )

    # ---- limits --------------------------------------------------------------------------------------------------
    rate_limit_per_minute: int = Field(default=600, ge=1, description="requests a minute per API key")
    max_concurrent_per_key: int = Field(default=32, ge=1, description="requests in flight per API key")
    max_body_bytes: int = Field(default=16 * 1024 * 1024, description="largest request body")
    max_tokens_cap: int = Field(default=512, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(default=128, ge=1, description="max_tokens of a request that gives none")
    max_images_per_request: int = Field(default=4, description="images in one request")
    max_image_bytes: int = Field(default=8 * 1024 * 1024, description="largest image, encoded")
    max_image_pixels: int = Field(default=4096 * 4096, description="largest image, in pixels")
    image_url_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="hosts whose http(s) image URLs are fetched; empty: data URLs only"
    )
    image_fetch_timeout_s: float = Field(default=5.0, description="seconds to fetch an allowed image URL")
    upstream_timeout_s: float = Field(default=300.0, description="seconds to wait for vLLM's answer")
    max_pending_records: int = Field(
        default=10_000, description="generation records queued for the store; past it, new ones are dropped and counted"
    )

    # ---- replicas (a shared Redis store) and staging ---------------------------------------------------------------
    feedback_wait_s: float = Field(
        default=3.0,
        ge=0,
        description="Redis store: how long feedback waits for a generation record another gateway replica may still "
        "be writing (an unknown response id answers 404 after it)",
    )
    concurrency_lease_s: float = Field(
        default=30.0,
        gt=0,
        description="Redis store: a request's concurrency slot expires after this long unless its replica renews it "
        "(so a crashed replica frees its slots)",
    )
    staging_timeout_s: float = Field(
        default=60.0, gt=0, description="seconds a vLLM replica may take to load and answer a version being staged"
    )

    @field_validator("vllm_urls", "vllm_extra_args", "image_url_allowlist", "api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return _split_list(value)

    @field_validator("vllm_urls")
    @classmethod
    def _strip_slash(cls, urls: list[str]) -> list[str]:
        return [url.rstrip("/").removesuffix("/v1") for url in urls]

    @model_validator(mode="after")
    def _production_secrets(self) -> GatewaySettings:
        if self.environment != "production":
            return self
        problems = []
        if not self.api_keys:
            problems.append("set ALIGNLOOP_API_KEYS")
        if self.admin_key is None or len(self.admin_key.get_secret_value()) < MIN_SECRET_CHARS:
            problems.append(f"set ALIGNLOOP_ADMIN_KEY to at least {MIN_SECRET_CHARS} characters")
        if self.user_id_salt.get_secret_value() == DEFAULT_SALT:
            problems.append("set ALIGNLOOP_USER_ID_SALT")
        service = self.service_key.get_secret_value() if self.service_key else None
        if service is None or len(service) < MIN_SECRET_CHARS:
            problems.append(f"set ALIGNLOOP_SERVICE_KEY (the trainer's key) to at least {MIN_SECRET_CHARS} characters")
        short = [key for key in self.parsed_api_keys() if len(key[1]) < MIN_SECRET_CHARS]
        if short:
            problems.append(f"API key {short[0][0]!r} is shorter than {MIN_SECRET_CHARS} characters")
        admin = self.admin_key.get_secret_value() if self.admin_key else None
        if admin and any(secret == admin for _, secret in self.parsed_api_keys()):
            problems.append("the admin key must not also be an API key")
        if service and (service == admin or any(secret == service for _, secret in self.parsed_api_keys())):
            problems.append("the service key must be a key of its own, neither the admin key nor an API key")
        if problems:
            raise ValueError("refusing to start in production: " + "; ".join(problems))
        return self

    def parsed_api_keys(self) -> list[tuple[str, str]]:
        """(name, key) pairs; a bare key is named after its position."""
        pairs = []
        for index, secret in enumerate(self.api_keys):
            name, sep, key = secret.get_secret_value().partition(":")
            pairs.append((name, key) if sep and key else (f"key{index}", secret.get_secret_value()))
        return pairs

    def api_key_table(self) -> dict[str, ApiKey]:
        """digest -> ApiKey: the only form in which the gateway keeps API keys after start-up."""
        return {key_digest(key): ApiKey(name, key_digest(key)) for name, key in self.parsed_api_keys()}

    @property
    def embedded(self) -> bool:
        return not self.vllm_urls

    @property
    def local_url(self) -> str:
        """The gateway's URL for a process on this machine (a wildcard bind address is reached on 127.0.0.1)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    def redacted(self) -> dict:
        """The settings as a dict fit for a log line: secrets masked."""
        data = self.model_dump()
        data["store_url"] = _without_password(self.store_url)
        for field in ("api_keys", "admin_key", "user_id_salt", "service_key"):
            value = data.get(field)
            data[field] = f"<{len(value)} keys>" if isinstance(value, list) else ("<set>" if value else None)
        return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}


def _without_password(url: str) -> str:
    """A URL fit for a log line: a password in it (redis://:PASSWORD@host) masked."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
