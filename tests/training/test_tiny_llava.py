"""The tiny LLaVA builder: llava-hf checkpoint layout, chat template, tokenizer and processor."""

import json

import pytest
from safetensors.torch import load_file

from training.tiny_llava import CHAT_TEMPLATE, build_untrained, load_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_untrained(tmp_path_factory.mktemp("tiny") / "model")


def test_checkpoint_uses_llava_hf_layout(checkpoint):
    keys = load_file(checkpoint / "model.safetensors").keys()
    vision = [k for k in keys if "vision_tower" in k]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    assert any(k.startswith("multi_modal_projector.") for k in keys)


def test_language_model_head_dim_is_64_and_size_is_tiny(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    text = config["text_config"]
    assert text["hidden_size"] // text["num_attention_heads"] == 64
    model, _ = load_checkpoint(checkpoint)
    assert 2_000_000 < sum(p.numel() for p in model.parameters()) < 6_000_000


def test_round_trip_loads_every_weight(checkpoint):
    model, _ = load_checkpoint(checkpoint)
    saved = load_file(checkpoint / "model.safetensors")
    patch = saved["vision_tower.vision_model.embeddings.patch_embedding.weight"]
    loaded = model.model.vision_tower.embeddings.patch_embedding.weight  # transformers maps the layout back
    assert loaded.shape == patch.shape and bool((loaded == patch).all())


def test_chat_template_is_llava_15(checkpoint):
    _, processor = load_checkpoint(checkpoint)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the star?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Is there a moon?"},
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s>USER: <image>\nWhat color is the star? ASSISTANT: Red.</s>USER: Is there a moon? ASSISTANT:"
    assert processor.tokenizer.chat_template == CHAT_TEMPLATE


def test_processor_expands_image_to_36_tokens(checkpoint):
    from PIL import Image

    _, processor = load_checkpoint(checkpoint)
    image = Image.new("RGB", (200, 150), "white")
    batch = processor(images=[image], text=["USER: <image>\nHi ASSISTANT:"], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == 36
    assert tuple(batch["pixel_values"].shape) == (1, 3, 96, 96)


def test_tokenizer_handles_any_text(checkpoint):
    _, processor = load_checkpoint(checkpoint)
    tokenizer = processor.tokenizer
    text = "Is there a purple moon? Zebra café 🙂"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer("purple moon")["input_ids"]) == ["purple", "Ġmoon"]
