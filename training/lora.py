"""LoRA adapters as training writes them and vLLM serves them: which modules they sit on, and how one is saved.

The LoRA sits on the language model only (attention and MLP projections), the layout vLLM accepts for a LLaVA.
`write_adapter` saves one as a directory that appears under its final name only when it is complete: it is written
to a hidden temporary directory beside it, flushed to disk, then renamed, so vLLM's filesystem resolver (which loads
an adapter the first time a request names it) never sees half a file. `adapter_config.json` names the base model
exactly as vLLM was started with it (`vllm_base_model`), which vLLM's resolver requires.
"""

from __future__ import annotations

import functools
import json
import os
import re
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


# ---- does an adapter sit on the base model it is served with? -------------------------------------------------------
# vLLM (some versions, and LLaVA wrappers) skips LoRA weights whose module names match nothing, serving the base model
# under the adapter's name; PEFT only warns. These checks make that an error before a version is published.
LORA_TENSOR = re.compile(r"^base_model\.model\.(?P<module>.+?)\.(?:lora_A|lora_B|lora_embedding_A|lora_embedding_B)")


@functools.lru_cache(maxsize=8)
def _linear_modules_of_directory(path: str, stamp: float) -> frozenset[str]:
    import torch
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    architecture = (getattr(config, "architectures", None) or ["LlavaForConditionalGeneration"])[0]
    model_class = getattr(transformers, architecture, None)
    if model_class is None:
        raise ValueError(f"{path}: unknown architecture {architecture}")
    with torch.device("meta"):
        model = model_class(config)
    return frozenset(name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear))


def base_linear_modules(base_model) -> frozenset[str]:
    """The names of the linear layers of `base_model` as transformers loads it (PEFT's names, without the
    `base_model.model.` prefix): a model directory (instantiated without weights) or a loaded model."""
    import torch

    if isinstance(base_model, str | Path):
        path = Path(base_model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no model at {path}: config.json is missing")
        return _linear_modules_of_directory(str(path.resolve()), (path / "config.json").stat().st_mtime)
    if hasattr(base_model, "get_base_model"):  # a PeftModel: its LoRA layers keep their wrapped module's name
        base_model = base_model.get_base_model()
    names = set()
    for name, module in base_model.named_modules():
        if isinstance(module, torch.nn.Linear) and not re.search(r"\.lora_[AB](\.|$)|\.lora_dropout", name):
            names.add(name.removesuffix(".base_layer"))
    return frozenset(names)


def target_matches(target: str | list[str], module: str) -> bool:
    """PEFT's rule: a string is a full-match regular expression; a list names modules by their last components."""
    if isinstance(target, str):
        return re.fullmatch(target, module) is not None
    return any(module == entry or module.endswith("." + entry) for entry in target)


def check_lora_matches(tensor_names, target_modules, base_modules: frozenset[str], what: str) -> int:
    """Raises ValueError unless every LoRA tensor sits on a linear layer in `base_modules` and the targets match
    one; returns how many layers the LoRA adapts."""
    modules, stray = set(), []
    for tensor in tensor_names:
        match = LORA_TENSOR.match(tensor)
        module = match["module"] if match else tensor
        if module in base_modules:
            modules.add(module)
        else:
            stray.append(module)
    if stray:
        raise ValueError(
            f"{what}: {len(stray)} LoRA tensors name no linear layer of the base model (e.g. {stray[0]}); "
            "served, they would be silently ignored"
        )
    if not modules:
        raise ValueError(f"{what}: the adapter holds no LoRA weights")
    if target_modules:
        entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        for entry in entries:
            pattern = entry if isinstance(target_modules, str) else [entry]
            if not any(target_matches(pattern, module) for module in base_modules):
                raise ValueError(f"{what}: target module {entry!r} matches nothing in the base model")
    return len(modules)


def check_adapter_matches(adapter_path: str | Path, base_model) -> int:
    """Checks a saved adapter directory against `base_model` (see `check_lora_matches`)."""
    from safetensors import safe_open

    adapter_path = Path(adapter_path)
    weights = adapter_path / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"adapter {adapter_path}: adapter_model.safetensors is missing")
    config = json.loads((adapter_path / "adapter_config.json").read_text())
    with safe_open(str(weights), "pt") as handle:
        names = list(handle.keys())
    return check_lora_matches(names, config.get("target_modules"), base_linear_modules(base_model), str(adapter_path))


def check_peft_model_matches(peft_model, base_model) -> int:
    """Checks an in-memory PEFT model's adapter, as it would be saved, against `base_model` (a model directory, or
    anything `base_linear_modules` takes; a name that is no local directory is checked against the model itself)."""
    from peft import get_peft_model_state_dict

    names = list(get_peft_model_state_dict(peft_model).keys())
    config = peft_model.peft_config[peft_model.active_adapter]
    reference = base_model if Path(str(base_model)).is_dir() else peft_model
    targets = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
    return check_lora_matches(names, targets, base_linear_modules(reference), f"adapter for {base_model}")


def install_adapter_dir(source: str | Path, adapter_dir: str | Path, name: str, base_model: str) -> Path:
    """Copies an existing adapter directory to `<adapter_dir>/<name>/` atomically (as `write_adapter` writes), with
    `base_model_name_or_path` set to `base_model`; FileExistsError if that version exists."""
    source, adapter_dir = Path(source), Path(adapter_dir)
    missing = [f for f in ADAPTER_FILES if not (source / f).is_file()]
    if missing:
        raise FileNotFoundError(f"adapter {source}: {', '.join(missing)} missing")
    adapter_dir.mkdir(parents=True, exist_ok=True)
    final = adapter_dir / name
    if final.exists():
        raise FileExistsError(f"adapter {final} already exists; adapter versions are immutable")
    staging = adapter_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        for file in ADAPTER_FILES:
            shutil.copyfile(source / file, staging / file)
        config_path = staging / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_model
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        _fsync_tree(staging)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_tree(adapter_dir)
    return final
