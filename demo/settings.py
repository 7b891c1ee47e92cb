"""Demo settings: one pydantic-settings class, read from ALIGNLOOP_DEMO_* environment variables and CLI flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class DemoSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALIGNLOOP_DEMO_", extra="forbid")

    gateway_url: str = Field(default="http://127.0.0.1:8000", description="the alignloop gateway the demo talks to")
    # The gateway ignores keys in development mode; in production give the demo a key of its own.
    api_key: SecretStr = SecretStr("alignloop-demo")
    public_alias: str = "llava-rlhf"
    host: str = "127.0.0.1"
    port: int = Field(default=7860, ge=1, le=65535)
    max_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    request_timeout_s: float = Field(default=120.0, gt=0)
    num_examples: int = Field(default=6, ge=0, le=50, description="ShapesWorld test scenes offered as examples")
    examples_dir: Path = Path("runs/demo-examples")
    recent_versions: int = Field(default=10, ge=1, le=100, description="versions charted in the version panel")
    max_upload_mb: int = Field(default=10, ge=1)

    @field_validator("gateway_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the gateway URL must start with http:// or https://, not {url!r}")
        return url.rstrip("/")
