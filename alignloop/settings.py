"""The settings every alignloop process shares: one base class, and the order settings are read in.

Each process has one pydantic-settings class that extends these (the gateway's `GatewaySettings`, the trainer's
`TrainerSettings`, the demo's `DemoSettings`, the simulator's `SimulatorSettings`). A setting is read from, first
to last:
1. the command line (flags are generated from the fields by `alignloop.cli`);
2. the process's own environment prefix: `ALIGNLOOP_TRAINER_ROUND_MIN_PAIRS`, `ALIGNLOOP_DEMO_PORT`, ... (the
   gateway's is plain `ALIGNLOOP_`);
3. for the shared fields declared here (store URL, model, public alias, adapter directory, gateway URL), the shared
   `ALIGNLOOP_` prefix: one `ALIGNLOOP_STORE_URL` reaches the gateway, the trainer and the feedback commands alike;
4. the field's default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    CliSuppress,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

SHARED_ENV_PREFIX = "ALIGNLOOP_"
DEFAULT_STORE_URL = "sqlite:///runs/alignloop.db"
DEFAULT_MODEL = "models/shapes-llava"
DEFAULT_PUBLIC_ALIAS = "llava-rlhf"
DEFAULT_ADAPTER_DIR = Path("runs/adapters")
DEFAULT_GATEWAY_URL = "http://127.0.0.1:8000"
SHARED_FIELDS = frozenset({"store_url", "model", "public_alias", "adapter_dir", "gateway_url"})


class SharedEnvSource(EnvSettingsSource):
    """The shared fields a settings class has, read under the shared `ALIGNLOOP_` prefix."""

    def __init__(self, settings_cls: type[BaseSettings]):
        super().__init__(settings_cls, env_prefix=SHARED_ENV_PREFIX)

    def __call__(self) -> dict[str, Any]:
        return {name: value for name, value in super().__call__().items() if name in SHARED_FIELDS}


class AlignloopSettings(BaseSettings):
    """The base of every process's settings: the reading order above."""

    model_config = SettingsConfigDict(env_prefix=SHARED_ENV_PREFIX, extra="forbid", validate_default=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, SharedEnvSource(settings_cls), dotenv_settings, file_secret_settings

    @classmethod
    def env_prefix(cls) -> str:
        return cls.model_config.get("env_prefix", SHARED_ENV_PREFIX)


class AliasSettings(AlignloopSettings):
    """A process that names the served model by its public alias."""

    public_alias: str = Field(
        default=DEFAULT_PUBLIC_ALIAS, description="the model name clients ask for: the promoted adapter version"
    )


class StoreSettings(AlignloopSettings):
    """A process that opens the feedback store."""

    store_url: str = Field(
        default=DEFAULT_STORE_URL,
        description="the feedback store: sqlite:///PATH (one file, the default) or redis://HOST:PORT/DB",
    )


class ModelSettings(StoreSettings, AliasSettings):
    """A process that serves or trains the model: the base checkpoint and where adapter versions live."""

    model: str = Field(default=DEFAULT_MODEL, description="the base model directory vLLM serves and the trainer trains")
    adapter_dir: Path = Field(
        default=DEFAULT_ADAPTER_DIR, description="the directory of adapter versions (policy-vN/), shared with vLLM"
    )


class ClientSettings(AliasSettings):
    """A process that talks to the gateway over HTTP (`alignloop.client`)."""

    gateway_url: str = Field(default=DEFAULT_GATEWAY_URL, description="the alignloop gateway")
    api_key: CliSuppress[SecretStr] = Field(
        default=SecretStr("alignloop-dev"), description="an API key of the gateway (development mode needs none)"
    )

    @field_validator("gateway_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the gateway URL must start with http:// or https://, not {url!r}")
        return url.rstrip("/")
