"""LoRA adapters as training writes them and vLLM serves them: which modules they sit on, and how one is saved.

The LoRA sits on the language model only (attention and MLP projections), the layout vLLM accepts for a LLaVA.
`write_adapter` saves one as a directory that appears under its final name only when it is complete: it is written
to a hidden temporary directory beside it, flushed to disk, then renamed, so vLLM's filesystem resolver (which loads
an adapter the first time a request names it) never sees half a file. `adapter_config.json` names the base model
exactly as vLLM was started with it (`vllm_base_model`), which vLLM's resolver requires.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

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
