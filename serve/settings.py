"""Gateway settings: one pydantic-settings class, read from ALIGNLOOP_* environment variables and CLI flags.

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

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALIGNLOOP_", extra="ignore", validate_default=True)

    environment: Literal["development", "production"] = "development"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    log_level: str = "INFO"

    # ---- the engine: vLLM started here (embedded) or elsewhere (external) ----------------------------------------
    vllm_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="external vLLM OpenAI servers; empty starts one here on `model`"
    )
    model: str = "models/shapes-llava"
    base_model_name: str = Field(default="shapes-llava", description="the name vLLM serves the base model under")
    adapter_dir: Path = Path("runs/adapters")
    vllm_host: str = "127.0.0.1"
    vllm_port: int = 8100
    vllm_dtype: str = "float32"
    vllm_max_model_len: int = 512
    vllm_max_lora_rank: int = 16
    vllm_max_loras: int = 4
    vllm_enforce_eager: bool = True
    vllm_cpu_kv_cache_gib: int = 1
    vllm_extra_args: Annotated[list[str], NoDecode] = Field(default_factory=list)
    vllm_startup_timeout_s: float = 600.0
    vllm_log: Path | None = Path("runs/vllm.log")
    health_interval_s: float = 2.0

    # ---- store and routing ---------------------------------------------------------------------------------------
    store_url: str = "sqlite:///runs/alignloop.db"
    public_alias: str = "llava-rlhf"
    alias_poll_interval_s: float = Field(default=0.25, gt=0)
    retention_purge_interval_s: float = 3600.0

    # ---- auth ----------------------------------------------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    admin_key: SecretStr | None = None
    user_id_salt: SecretStr = SecretStr(DEFAULT_SALT)

    # ---- limits --------------------------------------------------------------------------------------------------
    rate_limit_per_minute: int = Field(default=600, ge=1)
    max_concurrent_per_key: int = Field(default=32, ge=1)
    max_body_bytes: int = 16 * 1024 * 1024
    max_tokens_cap: int = Field(default=512, ge=1)
    default_max_tokens: int = Field(default=128, ge=1)
    max_images_per_request: int = 4
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    image_url_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    image_fetch_timeout_s: float = 5.0
    upstream_timeout_s: float = 300.0
    max_pending_records: int = 10_000

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
        short = [key for key in self.parsed_api_keys() if len(key[1]) < MIN_SECRET_CHARS]
        if short:
            problems.append(f"API key {short[0][0]!r} is shorter than {MIN_SECRET_CHARS} characters")
        admin = self.admin_key.get_secret_value() if self.admin_key else None
        if admin and any(secret == admin for _, secret in self.parsed_api_keys()):
            problems.append("the admin key must not also be an API key")
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

    def redacted(self) -> dict:
        """The settings as a dict fit for a log line: secrets masked."""
        data = self.model_dump()
        for field in ("api_keys", "admin_key", "user_id_salt"):
            value = data.get(field)
            data[field] = f"<{len(value)} keys>" if isinstance(value, list) else ("<set>" if value else None)
        return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}
