"""Adapter versions: the policy's LoRA published as `<adapter_dir>/policy-vN/` and registered in the store.

Version N of the policy is the directory `<adapter_dir>/policy-vN/` and the vLLM model name `policy-vN`. Versions are
immutable: a new policy is a new name, never a reload in place. The files are written atomically
(`training.lora.write_adapter`); the registry record is written after the rename, so a registered version always has
its files.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field

from alignloop.settings import DEFAULT_ADAPTER_DIR, AliasSettings, StoreSettings
from online_rl.schema import AdapterVersion, adapter_name
from online_rl.store import FeedbackStore
from training.lora import (
    check_adapter_matches,
    check_peft_model_matches,
    install_adapter_dir,
    vllm_base_model,
    write_adapter,
)

logger = logging.getLogger(__name__)


def publish_adapter(
    store: FeedbackStore,
    peft_model,
    adapter_dir: str | Path,
    base_model: str,
    algorithm: str,
    parent_version: int | None = None,
    feedback_range: tuple[str, str] | None = None,
    num_feedback_events: int = 0,
    ack: tuple[str, list[str]] | None = None,
    notes: str = "",
    pair_sources: dict[str, int] | None = None,
) -> AdapterVersion:
    """Allocates the next version N, writes `policy-vN/` atomically and registers it as a candidate.

    `base_model` is the model vLLM serves, as `vllm_base_model` gives it (a local directory becomes its absolute path).

    With `ack=(group, delivery_ids)` the feedback events it was trained on are acknowledged in the same atomic
    registry write, so after a crash they are either both trained-on and acknowledged, or neither.

    Raises ValueError, before a version is allocated, if the adapter's LoRA tensors or target modules match no
    linear layer of the base model (`training.lora.check_peft_model_matches`): served, it would be ignored.
    """
    check_peft_model_matches(peft_model, base_model)
    version = store.allocate_adapter_version()
    name = adapter_name(version)
    base_model = vllm_base_model(base_model)
    path = write_adapter(peft_model, adapter_dir, name, base_model)
    record = AdapterVersion(
        version=version,
        name=name,
        parent_version=parent_version,
        path=str(path),
        algorithm=algorithm,
        base_model=base_model,
        feedback_range=feedback_range,
        num_feedback_events=num_feedback_events,
        notes=notes,
        pair_sources=pair_sources or {},
    )
    store.register_adapter(record, ack=ack)
    logger.info("adapter published version=%d path=%s algorithm=%s", version, path, algorithm)
    return record


class RegistrySettings(StoreSettings, AliasSettings):
    """A command that installs adapter versions (`alignloop import ... --register`): the store, the alias it
    promotes, and the adapter directory vLLM resolves versions from (the shared ALIGNLOOP_* settings)."""

    adapter_dir: Path = Field(
        default=DEFAULT_ADAPTER_DIR, description="the directory of adapter versions (policy-vN/), shared with vLLM"
    )


def register_adapter_dir(
    store: FeedbackStore,
    source: str | Path,
    adapter_dir: str | Path,
    base_model: str | Path,
    algorithm: str,
    parent_version: int | None = None,
    notes: str = "",
) -> AdapterVersion:
    """Installs an adapter that already exists on disk (an imported or externally trained PEFT LoRA, safetensors)
    as the next version: checked against `base_model` (ValueError if its modules match nothing there), copied
    atomically to `<adapter_dir>/policy-vN/` with `base_model_name_or_path` set to the served model, then registered
    as a candidate. Promote it with `store.promote(alias, version, ...)`."""
    base_model = vllm_base_model(base_model)
    check_adapter_matches(source, base_model)
    version = store.allocate_adapter_version()
    name = adapter_name(version)
    path = install_adapter_dir(source, adapter_dir, name, base_model)
    record = AdapterVersion(
        version=version,
        name=name,
        parent_version=parent_version,
        path=str(path),
        algorithm=algorithm,
        base_model=base_model,
        notes=notes,
    )
    store.register_adapter(record)
    logger.info("adapter registered version=%d path=%s source=%s algorithm=%s", version, path, source, algorithm)
    return record
