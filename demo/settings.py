"""Demo settings: one pydantic-settings class, read from flags and ALIGNLOOP_DEMO_* environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from alignloop.settings import ClientSettings


class DemoSettings(ClientSettings):
    """The demo page's settings, besides the gateway, its key and the alias (give the page an API key of its own in
    production: ALIGNLOOP_DEMO_API_KEY)."""

    model_config = SettingsConfigDict(env_prefix="ALIGNLOOP_DEMO_")

    host: str = Field(default="127.0.0.1", description="the address `alignloop demo` binds")
    port: int = Field(default=7860, ge=1, le=65535, description="the port `alignloop demo` listens on")
    max_tokens: int = Field(default=128, ge=1, description="max_tokens of each answer")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="sampling temperature of the answers")
    request_timeout_s: float = Field(default=120.0, gt=0, description="seconds to wait for the gateway")
    num_examples: int = Field(default=6, ge=0, le=50, description="ShapesWorld test scenes offered as examples")
    examples_dir: Path = Field(default=Path("runs/demo-examples"), description="where the example images are written")
    recent_versions: int = Field(default=10, ge=1, le=100, description="versions charted in the version panel")
    max_upload_mb: int = Field(default=10, ge=1, description="largest image a user may upload, in MB")
