"""`alignloop import llava-rlhf`: the released LLaVA-RLHF checkpoints, converted to the llava-hf layout that
transformers and vLLM load, with the RLHF LoRA renamed onto the converted model.

The release (docs/papers.md §5) is an `sft_model/` in the original LLaVA format (`LlavaLlamaForCausalLM`: pickled
`pytorch_model-*.bin` shards with an index, a SentencePiece tokenizer, the CLIP tower named by `mm_vision_tower`) and
a PEFT LoRA (`adapter_model.bin`, keys `base_model.model.model.layers.N...`). The conversion:

1. weights, shard by shard (never the whole model in memory), renamed by the key table of transformers'
   `convert_llava_weights_to_hf.py` (copied below: transformers 5 no longer ships the script) into the llava-hf
   checkpoint layout (`language_model.model.*`, `language_model.lm_head`, `vision_tower.vision_model.*`,
   `multi_modal_projector.linear_{1,2}`), which is what transformers 5 writes and vLLM reads. The vision tower
   comes from the CLIP checkpoint that `mm_vision_tower` names, as LLaVA loads it (a copy inside the shards is
   ignored, as LLaVA ignores it); it must be a local directory (`--vision-tower`). Tensors keep their stored dtype;
   nothing is rounded;
2. as that script does, an `<image>` token and a `<pad>` token are added and the vocabulary is padded to a multiple
   of 64, the new embedding and output rows drawn from a normal around the mean embedding (seeded);
3. the processor pads images to a square with the CLIP mean colour before resizing (`image_aspect_ratio pad`,
   LLaVA's `expand2square`): `LlavaImageProcessor(do_pad=True)`. transformers' PIL backend reproduces LLaVA's
   pixels exactly; its default torchvision backend resizes slightly differently (see `IMAGE_BACKEND_NOTE`);
4. the chat template is LLaVA-1.5's conversation `v1` (the system prompt, `USER: <image>\\n... ASSISTANT:`), written
   so that the fast tokenizer yields exactly the token ids of LLaVA's `tokenizer_image_token`: LLaVA tokenizes the
   text before and after `<image>` as two separate SentencePiece calls, each with its dummy-prefix `▁`, which the
   template reproduces with one space after the BOS token and one after each image;
5. the LoRA's keys are renamed to the converted model's module names (the same table, then transformers 5's own
   loading map, `get_model_conversion_mapping`, to the in-memory names PEFT uses), checked against the converted
   model's modules (a target that matches nothing is an error, not a silently ignored adapter), and saved as
   safetensors with an `adapter_config.json` whose `base_model_name_or_path` is the converted model's absolute
   path, as vLLM's filesystem resolver requires.

Everything is written into a hidden temporary directory beside `--output` and renamed into place at the end, so a
failed import leaves nothing behind. The output:

    OUTPUT/model/   the llava-hf checkpoint (serve it with `alignloop up --model OUTPUT/model`)
    OUTPUT/lora/    the RLHF LoRA for it (`--register` installs it as the next adapter version)
    OUTPUT/import.json  provenance: the source files, their sizes and the LoRA's sha256

    alignloop import llava-rlhf --sft-model LLaVA-RLHF-7b-v1.5-224/sft_model \\
        --lora LLaVA-RLHF-7b-v1.5-224/rlhf_lora_adapter_model --vision-tower clip-vit-large-patch14 \\
        --output runs/llava-rlhf-7b
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from training.lora import target_matches

logger = logging.getLogger(__name__)

ORIGINAL_ARCHITECTURES = ("LlavaLlamaForCausalLM",)
# LLaVA's projector types that transformers' `LlavaMultiModalProjector` (linear, GELU, linear) can hold.
PROJECTOR_ACTIVATIONS = {"mlp2x_gelu": "gelu"}
SELECT_STRATEGIES = {"patch": "default", "cls_patch": "full"}
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
PAD_VOCAB_MULTIPLE = 64
IMAGE_BACKEND_NOTE = (
    "pixels match LLaVA's preprocessing exactly with transformers' PIL image backend (backend='pil'); the default "
    "torchvision backend resizes non-square images slightly differently (up to ~0.015 in normalized units)"
)

# transformers' src/transformers/models/llava/convert_llava_weights_to_hf.py (Apache-2.0), verbatim: applied in
# order, each a plain substring replacement, as `convert_state_dict_to_hf` there does.
KEYS_TO_MODIFY_MAPPING = {
    "model.vision_tower.": "",
    ".vision_resampler": "",  # all lmms-lab models do avg pooling, so no vision_resampler
    "model.mm_projector": "multi_modal_projector",
    "model": "model.model",
    "vision_model.model": "vision_model",
    "lm_head": "language_model.lm_head",
    "model.model": "language_model.model",
    "multi_modal_projector.0": "multi_modal_projector.linear_1",
    "multi_modal_projector.2": "multi_modal_projector.linear_2",
}
ORIGINAL_VISION_PREFIX = "model.vision_tower.vision_tower."  # where LLaVA's state dict holds the CLIP tower

# LLaVA-1.5's conversation "v1" (llava/conversation.py conv_vicuna_v1), which LLaVA-RLHF trained with.
LLAVA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '" + LLAVA_V1_SYSTEM.replace("'", "\\'") + "' -%}{%- endif -%}"
    "{{ ' ' + system + ' ' }}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] | replace('<image>\\n', '<image> \\n') -%}"
    "{%- else -%}{%- set text = namespace(v='') -%}"
    "{%- for part in message['content'] if part['type'] in ('image', 'image_url') -%}"
    "{%- set text.v = text.v + '<image> \\n' -%}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}"
    "{%- set text.v = text.v + part['text'] -%}{%- endfor -%}"
    "{%- set text = text.v -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' + text + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + text + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


@dataclasses.dataclass
class OriginalRelease:
    """An original-format LLaVA-RLHF checkpoint and LoRA, validated but not yet read."""

    sft_model: Path
    config: dict
    shards: list[Path]
    weight_map: dict[str, str]  # original key -> shard file name
    vision_tower: Path
    lora: Path | None
    lora_config: dict
    lora_file: Path | None


@dataclasses.dataclass
class ImportResult:
    output: Path
    model_dir: Path
    lora_dir: Path | None
    lora_rank: int | None
    provenance: dict


# ---- reading and validating the original release -------------------------------------------------------------------
def convert_key(key: str) -> str:
    """One original LLaVA key in the llava-hf checkpoint layout (transformers' table, in its order)."""
    for old, new in KEYS_TO_MODIFY_MAPPING.items():
        if old in key:
            key = key.replace(old, new)
    return key


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{what}: {path} is not valid JSON ({error})") from None


def _weight_files(directory: Path, what: str) -> tuple[list[Path], dict[str, str] | None]:
    """The checkpoint's weight files, in order, and its index's weight map (None for a single file)."""
    for index_name in ("pytorch_model.bin.index.json", "model.safetensors.index.json"):
        index_path = directory / index_name
        if index_path.is_file():
            weight_map = _read_json(index_path, what).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{what}: {index_path} has no weight_map")
            names = sorted(set(weight_map.values()))
            missing = [name for name in names if not (directory / name).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{what}: shard {directory / missing[0]} is missing ({len(missing)} of {len(names)} shards "
                    f"listed in {index_name} are absent)"
                )
            return [directory / name for name in names], weight_map
    for single in ("pytorch_model.bin", "model.safetensors"):
        if (directory / single).is_file():
            return [directory / single], None
    raise FileNotFoundError(f"{what}: no weights in {directory} (pytorch_model.bin[.index.json] or model.safetensors)")


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)


def _resolve_vision_tower(config: dict, override: str | Path | None) -> Path:
    name = str(override) if override else config.get("mm_vision_tower") or config.get("vision_tower")
    if not name:
        raise ValueError("the sft model's config.json names no mm_vision_tower; pass --vision-tower DIR")
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        hint = "" if override else " (pass --vision-tower DIR: a local copy of it)"
        raise FileNotFoundError(f"vision tower {name} not found locally: {path / 'config.json'} is missing{hint}")
    if not (path / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"vision tower {path}: preprocessor_config.json is missing")
    _weight_files(path, f"vision tower {path}")
    return path


def inspect_release(
    sft_model: str | Path, lora: str | Path | None, vision_tower: str | Path | None = None
) -> OriginalRelease:
    """Checks everything that can be checked without reading the weights; raises FileNotFoundError or ValueError
    with one clear line."""
    sft_model = Path(sft_model)
    if not sft_model.is_dir():
        raise FileNotFoundError(f"--sft-model {sft_model} is not a directory")
    config = _read_json(sft_model / "config.json", "sft model")
    architectures = config.get("architectures") or []
    if not set(architectures) & set(ORIGINAL_ARCHITECTURES):
        raise ValueError(
            f"{sft_model} is not an original-format LLaVA checkpoint: architectures {architectures}, expected "
            f"{ORIGINAL_ARCHITECTURES[0]}"
        )
    projector = config.get("mm_projector_type", "linear")
    if projector not in PROJECTOR_ACTIVATIONS:
        raise ValueError(
            f"unknown projector type {projector!r} in {sft_model / 'config.json'}: the llava-hf layout holds "
            f"{', '.join(PROJECTOR_ACTIVATIONS)} only"
        )
    if config.get("mm_vision_select_feature", "patch") not in SELECT_STRATEGIES:
        raise ValueError(f"unknown mm_vision_select_feature {config.get('mm_vision_select_feature')!r}")
    for flag in ("mm_use_im_start_end", "mm_use_im_patch_token", "tune_mm_mlp_adapter"):
        if config.get(flag):
            raise ValueError(f"{flag} is true in {sft_model / 'config.json'}: the llava-hf layout has no such tokens")
    if config.get("image_aspect_ratio", "square") not in ("pad", "square"):
        raise ValueError(f"image_aspect_ratio {config.get('image_aspect_ratio')!r} is not LLaVA-1.5's (pad)")
    if config.get("mm_patch_merge_type", "flat") != "flat":
        raise ValueError(f"mm_patch_merge_type {config['mm_patch_merge_type']!r} is LLaVA-NeXT's, not LLaVA-1.5's")
    if not any((sft_model / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        raise FileNotFoundError(f"sft model: no tokenizer in {sft_model} (tokenizer.model or tokenizer.json)")
    shards, weight_map = _weight_files(sft_model, "sft model")
    if weight_map is None:
        weight_map = dict.fromkeys(_load_weights(shards[0]), shards[0].name)
    tower = _resolve_vision_tower(config, vision_tower)
    lora_config, lora_file = {}, None
    if lora is not None:
        lora = Path(lora)
        lora_config = _read_json(lora / "adapter_config.json", "LoRA")
        if lora_config.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"LoRA: {lora} is a {lora_config.get('peft_type')} adapter, not LORA")
        if lora_config.get("bias", "none") != "none" or lora_config.get("modules_to_save"):
            raise ValueError("LoRA: trained biases or modules_to_save cannot be served by vLLM as a LoRA")
        if lora_config.get("fan_in_fan_out") or lora_config.get("layers_to_transform") is not None:
            raise ValueError("LoRA: fan_in_fan_out / layers_to_transform adapters are not supported")
        lora_file = next(
            (lora / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (lora / n).is_file()), None
        )
        if lora_file is None:
            raise FileNotFoundError(f"LoRA: {lora} has no adapter_model.bin or adapter_model.safetensors")
    return OriginalRelease(sft_model, config, shards, weight_map, tower, lora, lora_config, lora_file)


# ---- the converted configuration, tokenizer and processor ----------------------------------------------------------
def _vision_config(tower: Path):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig.from_pretrained(str(tower))  # reads vision_config from a full CLIP checkpoint too


def _tokenizer(release: OriginalRelease):
    """The original tokenizer with `<image>` and `<pad>` added, as transformers' conversion script adds them."""
    from transformers import AddedToken, AutoTokenizer, LlamaTokenizer

    tokenizer_config = {}
    if (release.sft_model / "tokenizer_config.json").is_file():
        tokenizer_config = _read_json(release.sft_model / "tokenizer_config.json", "tokenizer")
    # AutoTokenizer in transformers 5 turns a LLaMA SentencePiece model into a generic tokenizer without the
    # Metaspace pre-tokenizer; LlamaTokenizer keeps LLaMA's dummy prefix.
    loader = (
        LlamaTokenizer
        if tokenizer_config.get("tokenizer_class", "").startswith("LlamaTokenizer")
        or (release.sft_model / "tokenizer.model").is_file()
        else AutoTokenizer
    )
    tokenizer = loader.from_pretrained(str(release.sft_model))
    tokenizer.add_tokens(AddedToken(IMAGE_TOKEN, special=True, normalized=False), special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.add_bos_token = False  # the chat template writes it, so every caller gets exactly one
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def _llava_config(release: OriginalRelease, tokenizer, vision_config):
    from transformers import LlamaConfig, LlavaConfig

    original = release.config
    if original.get("mm_hidden_size", vision_config.hidden_size) != vision_config.hidden_size:
        raise ValueError(
            f"mm_hidden_size {original['mm_hidden_size']} differs from the vision tower's width "
            f"{vision_config.hidden_size}: --vision-tower names another CLIP than the one this model was trained with"
        )
    vocab = _padded_vocab(len(tokenizer))
    heads = original["num_attention_heads"]
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=original["hidden_size"],
        intermediate_size=original["intermediate_size"],
        num_hidden_layers=original["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=original.get("num_key_value_heads") or heads,
        head_dim=original["hidden_size"] // heads,
        hidden_act=original.get("hidden_act", "silu"),
        max_position_embeddings=original.get("max_position_embeddings", 2048),
        rms_norm_eps=original.get("rms_norm_eps", 1e-6),
        rope_theta=original.get("rope_theta", 10000.0),
        rope_scaling=original.get("rope_scaling"),
        attention_bias=original.get("attention_bias", False),
        initializer_range=original.get("initializer_range", 0.02),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    strategy = SELECT_STRATEGIES[original.get("mm_vision_select_feature", "patch")]
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act=PROJECTOR_ACTIVATIONS[original["mm_projector_type"]],
        vision_feature_select_strategy=strategy,
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        image_seq_length=patches + (1 if strategy == "full" else 0),
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    dtype = original.get("torch_dtype") or original.get("dtype")
    if dtype:
        config.dtype = dtype
    return config


def _processor(release: OriginalRelease, tokenizer, vision_config, strategy: str):
    from transformers import CLIPImageProcessor, LlavaImageProcessor, LlavaProcessor

    clip = CLIPImageProcessor.from_pretrained(str(release.vision_tower))
    size = clip.size.shortest_edge or vision_config.image_size
    crop = clip.crop_size.height or vision_config.image_size
    image_processor = LlavaImageProcessor(
        do_pad=release.config.get("image_aspect_ratio") == "pad",
        size={"shortest_edge": size},
        crop_size={"height": crop, "width": crop},
        do_center_crop=clip.do_center_crop,
        do_resize=clip.do_resize,
        resample=clip.resample,
        do_rescale=clip.do_rescale,
        rescale_factor=clip.rescale_factor,
        do_normalize=clip.do_normalize,
        image_mean=list(clip.image_mean),
        image_std=list(clip.image_std),
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def _padded_vocab(size: int) -> int:
    return -(-size // PAD_VOCAB_MULTIPLE) * PAD_VOCAB_MULTIPLE


def meta_model(config):
    """The converted model with no weights (meta device): its module names and parameter shapes, for checking."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def in_memory_namer(model) -> Callable[[str], str]:
    """Maps a llava-hf checkpoint key to the name transformers 5 gives it once loaded (`model.language_model.*`,
    `lm_head`, ...), with transformers' own loading map for `model`, so the LoRA is named as PEFT names the loaded
    model's modules."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    return lambda key: rename_source_key(key, renamings, converters)[0]


# ---- the weights ----------------------------------------------------------------------------------------------------
def _extra_rows(embeddings: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """`count` rows drawn from N(mean, 1e-5 * covariance) of `embeddings`, as transformers' conversion draws the new
    tokens' rows (seeded here); the mean alone if the covariance is not positive definite."""
    data = embeddings.float()
    mean = data.mean(dim=0)
    centred = data - mean
    covariance = 1e-5 * (centred.T @ centred) / data.shape[0]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((count, data.shape[1]), generator=generator, dtype=torch.float32)
    try:
        factor = torch.linalg.cholesky(covariance)
    except RuntimeError:
        logger.warning("embedding covariance is not positive definite: new rows take the mean embedding")
        return mean.expand(count, -1).to(embeddings.dtype).clone()
    return (mean + noise @ factor.T).to(embeddings.dtype)


def _language_shards(release: OriginalRelease, vocab: int) -> Iterator[dict[str, torch.Tensor]]:
    """The sft model's tensors, shard by shard, renamed, with the embedding and output matrices padded."""
    embed_key = "model.embed_tokens.weight"
    if embed_key not in release.weight_map:
        raise ValueError(f"sft model: {embed_key} is not in the checkpoint")
    embed_shard = _load_weights(release.sft_model / release.weight_map[embed_key])
    embeddings = embed_shard[embed_key]
    extra = _extra_rows(embeddings, vocab - embeddings.shape[0]) if vocab > embeddings.shape[0] else None
    del embed_shard
    tied = "lm_head.weight" not in release.weight_map
    for shard in release.shards:
        tensors = _load_weights(shard)
        converted: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            if key.endswith(".inv_freq") or key.startswith("model.vision_tower.") or key == "model.image_newline":
                continue  # rotary caches; the tower comes from mm_vision_tower, as LLaVA loads it
            if key == embed_key and tied:
                converted[convert_key("lm_head.weight")] = _pad_rows(tensor, extra)
            padded = key in (embed_key, "lm_head.weight")
            converted[convert_key(key)] = _pad_rows(tensor, extra) if padded else tensor.contiguous()
        yield converted


def _pad_rows(tensor: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    return tensor.contiguous() if extra is None else torch.cat([tensor, extra.to(tensor.dtype)], dim=0)


def _vision_tensors(tower: Path) -> dict[str, torch.Tensor]:
    """The CLIP tower's vision weights under their LLaVA names, then renamed like the rest: `vision_model.X` becomes
    `model.vision_tower.vision_tower.vision_model.X` and then `vision_tower.vision_model.X`."""
    files, _ = _weight_files(tower, f"vision tower {tower}")
    tensors = {}
    for path in files:
        for key, tensor in _load_weights(path).items():
            if key.startswith("vision_model."):
                tensors[convert_key(ORIGINAL_VISION_PREFIX + key)] = tensor.contiguous()
    if not tensors:
        raise ValueError(f"vision tower {tower}: no vision_model.* weights (is it a CLIP checkpoint?)")
    return tensors


def _write_weights(release: OriginalRelease, model, config, model_dir: Path, progress: bool) -> dict[str, tuple]:
    """Writes the converted shards and their index; checks that the tensors are exactly the model's parameters."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    loaded_name = in_memory_namer(model)
    shards = itertools.chain(
        _language_shards(release, config.text_config.vocab_size), (_vision_tensors(release.vision_tower),)
    )
    count = len(release.shards) + 1
    weight_map, seen, total = {}, {}, 0
    for number, tensors in enumerate(tqdm(shards, total=count, desc="converting", disable=not progress), start=1):
        name = f"model-{number:05d}-of-{count:05d}.safetensors"
        for key, tensor in tensors.items():
            loaded = loaded_name(key)
            if loaded not in expected:
                raise ValueError(
                    f"converted weight {key} ({loaded}) is not a parameter of LlavaForConditionalGeneration"
                )
            if tuple(tensor.shape) != expected[loaded]:
                raise ValueError(f"converted weight {key} has shape {tuple(tensor.shape)}, expected {expected[loaded]}")
            weight_map[key], seen[loaded] = name, tuple(tensor.shape)
            total += tensor.numel() * tensor.element_size()
        save_file(tensors, str(model_dir / name), metadata={"format": "pt"})
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise ValueError(f"the converted checkpoint lacks {len(missing)} parameters, e.g. {missing[0]}")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return seen


# ---- the LoRA -------------------------------------------------------------------------------------------------------
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<which>lora_[AB])(?:\.[^.]+)?\.weight$")


def _convert_lora(release: OriginalRelease, model, lora_dir: Path, base_model: str) -> int:
    """Writes the renamed LoRA; returns its rank. Every original tensor must land on a linear layer of the converted
    language model, and every target module must match one."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    original_config = release.lora_config
    rank, alpha = int(original_config.get("r", 8)), original_config.get("lora_alpha", 8)
    targets = original_config.get("target_modules")
    if not targets:
        raise ValueError("LoRA: adapter_config.json lists no target_modules")
    linear = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    loaded_name = in_memory_namer(model)
    original_modules = {k.removesuffix(".weight") for k in release.weight_map if k.endswith(".weight")}
    language = {m for m in original_modules if m.startswith("model.layers.") or m == "lm_head"}
    for target in [targets] if isinstance(targets, str) else targets:
        if not any(target_matches(target if isinstance(targets, str) else [target], m) for m in language):
            raise ValueError(f"LoRA target {target!r} matches no module of the language model")
    tensors, leaves = {}, set()
    for key, tensor in _load_weights(release.lora_file).items():
        match = LORA_KEY.match(key)
        if match is None:
            raise ValueError(f"LoRA: unsupported tensor {key} (only lora_A / lora_B weights can be served)")
        module = loaded_name(convert_key(match["module"] + ".weight")).removesuffix(".weight")
        layer = linear.get(module)
        if layer is None or ".language_model." not in f".{module}":
            raise ValueError(f"LoRA tensor {key} matches no linear module of the converted language model ({module})")
        want = (rank, layer.in_features) if match["which"] == "lora_A" else (layer.out_features, rank)
        if tuple(tensor.shape) != want:
            raise ValueError(f"LoRA tensor {key} has shape {tuple(tensor.shape)}, expected {want} (r={rank})")
        tensors[f"base_model.model.{module}.{match['which']}.weight"] = tensor.contiguous()
        leaves.add(module.rsplit(".", 1)[-1])
    if not tensors:
        raise ValueError(f"LoRA: {release.lora_file} holds no LoRA weights")
    lora_dir.mkdir(parents=True)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=original_config.get("lora_dropout", 0.0),
        target_modules=rf".*language_model.*\.({'|'.join(sorted(leaves))})",
        bias="none",
    )
    config.save_pretrained(str(lora_dir))
    config_path = lora_dir / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["base_model_name_or_path"] = base_model
    config_path.write_text(json.dumps(saved, indent=2) + "\n")
    save_file(dict(sorted(tensors.items())), str(lora_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return rank


# ---- the whole import -----------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _provenance(release: OriginalRelease, rank: int | None) -> dict:
    files = {str(path): path.stat().st_size for path in release.shards}
    return {
        "source": "LLaVA-RLHF (original LLaVA format)",
        "sft_model": str(release.sft_model.resolve()),
        "sft_shards": files,
        "vision_tower": str(release.vision_tower.resolve()),
        "mm_vision_tower": release.config.get("mm_vision_tower"),
        "lora": str(release.lora.resolve()) if release.lora else None,
        "lora_sha256": _sha256(release.lora_file) if release.lora_file else None,
        "lora_rank": rank,
        "lora_alpha": release.lora_config.get("lora_alpha"),
        "image_processing": IMAGE_BACKEND_NOTE,
        "conversation": "LLaVA v1 (vicuna_v1), system prompt included by the chat template",
    }


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def import_llava_rlhf(
    sft_model: str | Path,
    lora: str | Path | None,
    output: str | Path,
    vision_tower: str | Path | None = None,
    progress: bool = True,
) -> ImportResult:
    """Converts the release into `output/model` (and `output/lora`); see the module docstring. `output` must not
    exist or be empty; nothing appears there unless the whole import succeeds."""
    release = inspect_release(sft_model, lora, vision_tower)
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"--output {output} exists and is not empty")
    output.parent.mkdir(parents=True, exist_ok=True)
    final_model = output.resolve() / "model"
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would keep other users (a vLLM service user) out
    try:
        tokenizer = _tokenizer(release)
        vision_config = _vision_config(release.vision_tower)
        config = _llava_config(release, tokenizer, vision_config)
        model = meta_model(config)
        model_dir = staging / "model"
        model_dir.mkdir()
        config.save_pretrained(str(model_dir))
        _write_weights(release, model, config, model_dir, progress)
        _processor(release, tokenizer, vision_config, config.vision_feature_select_strategy).save_pretrained(
            str(model_dir)
        )
        generation = _read_json_or_empty(release.sft_model / "generation_config.json")
        from transformers import GenerationConfig

        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=generation.get("eos_token_id", tokenizer.eos_token_id),
            pad_token_id=tokenizer.pad_token_id,
            do_sample=False,
        ).save_pretrained(str(model_dir))
        rank = None
        if release.lora is not None:
            rank = _convert_lora(release, model, staging / "lora", str(final_model))
        provenance = _provenance(release, rank)
        (staging / "import.json").write_text(json.dumps(provenance, indent=2) + "\n")
        _fsync_tree(staging)
        if output.exists():
            output.rmdir()
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("imported llava-rlhf sft_model=%s lora=%s output=%s", release.sft_model, release.lora, output)
    return ImportResult(output, output / "model", output / "lora" if rank else None, rank, provenance)


def _read_json_or_empty(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
