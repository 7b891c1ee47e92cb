"""The tiny LLaVA: a CLIP-ViT vision tower and a Llama language model of a few million parameters.

It is a plain `LlavaForConditionalGeneration` with a byte-level BPE tokenizer trained on ShapesWorld text, a
`LlavaProcessor` and a LLaVA-1.5 chat template (`USER: <image>\\n... ASSISTANT:`), so the same directory loads
unchanged in transformers and in vLLM. Two vLLM constraints shape it (docs/install-cpu.md): the language
model's head_dim is 64 (the CPU attention kernels reject smaller heads), and the checkpoint uses the llava-hf key
layout `vision_tower.vision_model.*`, which `save_checkpoint` enforces.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from training.shapes_world import MC_SUFFIX, ShapesWorld

IMAGE_TOKEN = "<image>"
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IMAGE_TOKEN]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# LLaVA-1.5 conversation format. Content may be a string or OpenAI-style parts ({"type": "image"} /
# {"type": "image_url"} / {"type": "text"}), which is how both transformers and vLLM's server pass it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = namespace(v='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') -%}{%- set text.v = text.v + '<image>\\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set text.v = text.v + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = text.v -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ text + ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' + text + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + text + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


@dataclasses.dataclass
class TinyLlavaSpec:
    """Sizes of the tiny model. The defaults give about 4.6M parameters and 36 image tokens."""

    image_size: int = 96
    patch_size: int = 16
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 2
    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 4  # head_dim = 64, the smallest the vLLM CPU kernels accept
    text_intermediate: int = 768
    vocab_size: int = 1024
    max_positions: int = 512

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def tokenizer_corpus(world: ShapesWorld, num_scenes: int = 3000) -> list[str]:
    """Every kind of ShapesWorld text the model will read or write, plus the chat words."""
    texts = ["USER: ASSISTANT:", MC_SUFFIX, "Describe the image in detail."]
    rng = random.Random(0)
    for scene in world.scenes("train", num_scenes):
        texts.append(world.caption(scene))
        texts.extend(world.facts(scene))
        for item in world.questions(scene, rng):
            texts.append(f"USER: {item.question} ASSISTANT: {item.answer}")
    return texts


def train_tokenizer(world: ShapesWorld, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer: whole ShapesWorld words as tokens, any other text through byte fallback."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus(world), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=512,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )
    return fast


def build_processor(tokenizer: PreTrainedTokenizerFast, spec: TinyLlavaSpec) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=True,
        do_convert_rgb=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast, spec: TinyLlavaSpec, seed: int = 0
) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        head_dim=spec.text_hidden // spec.text_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=spec.image_tokens,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=96,
    )
    return model


def image_token_count(processor) -> int:
    """How many positions one image takes in the language model's input: one per vision patch."""
    side = processor.image_processor.crop_size["height"] // processor.patch_size
    return side * side


def save_checkpoint(model: LlavaForConditionalGeneration, processor: LlavaProcessor, output_dir: str | Path) -> Path:
    """Saves model, tokenizer and processor, with the vision tower in the llava-hf key layout vLLM expects.

    transformers 5 writes a from-scratch vision tower as `...vision_tower.encoder.*` (and `embeddings`,
    `pre_layrnorm`, `post_layernorm` beside it); llava-hf checkpoints, and vLLM, use
    `...vision_tower.vision_model.*`. Both libraries load the renamed file.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)
    weights_path = output_dir / "model.safetensors"
    state = load_file(weights_path)
    renamed = {}
    for key, tensor in state.items():
        head, sep, rest = key.partition("vision_tower.")
        if sep and not rest.startswith("vision_model."):
            rest = f"vision_model.{rest}"
        renamed[head + sep + rest] = tensor.contiguous()  # the key itself when it needs no rename
    save_file(renamed, weights_path, metadata={"format": "pt"})
    return output_dir


def load_checkpoint(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """Loads (model, processor) from a local directory; raises FileNotFoundError with a clear message."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no model at {model_dir}: config.json is missing")
    processor = LlavaProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
    return model, processor


def build_untrained(output_dir: str | Path, spec: TinyLlavaSpec | None = None, seed: int = 0) -> Path:
    """Writes a randomly initialised tiny LLaVA with its tokenizer and processor (for tests and as SFT's start)."""
    spec = spec or TinyLlavaSpec()
    tokenizer = train_tokenizer(ShapesWorld(), spec.vocab_size)
    processor = build_processor(tokenizer, spec)
    model = build_model(tokenizer, spec, seed)
    return save_checkpoint(model, processor, output_dir)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
