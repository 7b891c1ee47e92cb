"""Adapter versions on disk: the LoRA layout vLLM serves, written atomically, then registered.

Version N of the policy is the directory `<adapter_dir>/policy-vN/` and the vLLM model name `policy-vN`
(ARCHITECTURE decision 2). A directory appears under its final name only when it is complete: it is written to a
hidden temporary directory beside it, flushed to disk, then renamed, so vLLM's filesystem resolver (which loads an
adapter the first time a request names it) never sees half a file. The registry record is written after the rename,
so a registered version always has its files.

The LoRA sits on the language model only (attention and MLP projections), the layout vLLM accepts for a LLaVA, and
`adapter_config.json` names the base model exactly as vLLM was started with it (`vllm_base_model`), which vLLM's
resolver requires.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from online_rl.schema import AdapterVersion, adapter_name
from online_rl.store import FeedbackStore

logger = logging.getLogger(__name__)

# Every linear layer of the language model, and nothing in the vision tower or projector.
LANGUAGE_MODEL_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def language_model_lora(rank: int = 8, alpha: int | None = None, dropout: float = 0.0, init_lora_weights=True):
    """The PEFT LoRA config alignloop trains and vLLM serves (`--max-lora-rank` must be >= rank)."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=LANGUAGE_MODEL_LORA_TARGETS,
        init_lora_weights=init_lora_weights,
    )


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    directory = os.open(root, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def vllm_base_model(model: str | Path) -> str:
    """The base model as vLLM is started with it (`--model`): the absolute path of a local directory, else the name.

    vLLM's filesystem resolver loads an adapter only when its `base_model_name_or_path` equals this string (vLLM
    compares it with `model_config.model`, not with the served model name), so the launcher and every publisher
    derive it here.
    """
    path = Path(model)
    return str(path.resolve()) if path.is_dir() else str(model)


def write_adapter(peft_model, adapter_dir: str | Path, name: str, base_model: str) -> Path:
    """Saves the active adapter of `peft_model` as `<adapter_dir>/<name>/`, atomically; returns the final path.

    `base_model` is written as the adapter's `base_model_name_or_path`; pass `vllm_base_model(...)` of the model
    the serving vLLM was started on.

    Raises FileExistsError if the version's directory already exists: versions are immutable.
    """
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    final = adapter_dir / name
    if final.exists():
        raise FileExistsError(f"adapter {final} already exists; adapter versions are immutable")
    staging = adapter_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        peft_model.save_pretrained(str(staging), safe_serialization=True)
        missing = [f for f in ADAPTER_FILES if not (staging / f).is_file()]
        if missing:
            raise RuntimeError(f"PEFT did not write {', '.join(missing)}")
        config_path = staging / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_model
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        _fsync_tree(staging)
        os.rename(staging, final)  # atomic on one filesystem; fails if `final` appeared meanwhile
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_tree(adapter_dir)
    return final


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
) -> AdapterVersion:
    """Allocates the next version N, writes `policy-vN/` atomically and registers it as a candidate.

    `base_model` is the model vLLM serves, as `vllm_base_model` gives it (a local directory becomes its absolute path).

    With `ack=(group, delivery_ids)` the feedback events it was trained on are acknowledged in the same atomic
    registry write, so after a crash they are either both trained-on and acknowledged, or neither.
    """
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
    )
    store.register_adapter(record, ack=ack)
    logger.info("adapter published version=%d path=%s algorithm=%s", version, path, algorithm)
    return record
