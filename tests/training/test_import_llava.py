"""`alignloop import llava-rlhf` on a tiny release in exactly the original format (tests/fixtures/llava_rlhf_tiny,
made by its make_fixture.py with LLaVA's own code), against the logits and greedy tokens LLaVA's code produced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from alignloop.cli import main
from training.import_llava import import_llava_rlhf
from training.lora import language_model_lora

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "llava_rlhf_tiny"
SFT, LORA, TOWER = FIXTURE / "sft_model", FIXTURE / "rlhf_lora_adapter_model", FIXTURE / "clip-vit-tiny-patch14"
IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id for the image in its input ids


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("import") / "llava-rlhf-tiny"
    import_llava_rlhf(SFT, LORA, output, vision_tower=TOWER, progress=False)
    return output


@pytest.fixture(scope="module")
def reference():
    return load_file(str(FIXTURE / "reference.safetensors")), json.loads((FIXTURE / "reference.json").read_text())


def load(imported: Path, lora: str = "none"):
    model = LlavaForConditionalGeneration.from_pretrained(imported / "model", dtype=torch.float32)
    if lora != "none":
        model = PeftModel.from_pretrained(model, str(imported / "lora"))
        model = model.merge_and_unload() if lora == "merged" else model
    return model.eval()


def expanded_ids(model, original_ids: torch.Tensor) -> torch.Tensor:
    """LLaVA's input ids with its image placeholder replaced by the image tokens the llava-hf model expects."""
    ids = []
    for token in original_ids.tolist():
        ids += [model.config.image_token_id] * model.config.image_seq_length if token == IMAGE_TOKEN_INDEX else [token]
    return torch.tensor([ids])


def chat_inputs(processor, probe: dict):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": probe["question"]}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.open(FIXTURE / probe["image"]).convert("RGB")
    return processor(images=image, text=text, return_tensors="pt")


@pytest.mark.parametrize("lora", ["none", "unmerged", "merged"])
def test_converted_logits_match_the_original_llava_code(imported, reference, lora):
    tensors, meta = reference
    model = load(imported, lora)
    variant = "base" if lora == "none" else "lora"
    for index in range(len(meta["probes"])):
        want = tensors[f"logits.{variant}.{index}"]
        with torch.no_grad():
            logits = model(
                input_ids=expanded_ids(model, tensors[f"input_ids.{index}"]),
                pixel_values=tensors[f"pixel_values.{index}"][None],
            ).logits[0, -want.shape[0] :, : want.shape[1]]
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=2e-4)


def test_processor_and_chat_template_reproduce_llavas_inputs(imported, reference):
    """The chat template + tokenizer give LLaVA's `tokenizer_image_token` ids; the PIL image backend gives its
    `process_images` (pad to square) pixels exactly, the default torchvision one within its resize difference."""
    tensors, meta = reference
    exact = LlavaProcessor.from_pretrained(imported / "model", backend="pil")
    default = LlavaProcessor.from_pretrained(imported / "model")
    model = load(imported)
    for index, probe in enumerate(meta["probes"]):
        inputs = chat_inputs(exact, probe)
        assert inputs["input_ids"].tolist() == expanded_ids(model, tensors[f"input_ids.{index}"]).tolist()
        torch.testing.assert_close(inputs["pixel_values"][0], tensors[f"pixel_values.{index}"], rtol=0, atol=0)
        pixels = chat_inputs(default, probe)["pixel_values"][0]
        assert (pixels - tensors[f"pixel_values.{index}"]).abs().max() < 0.02  # padded too: unpadded differs by ~1


def test_a_two_turn_conversation_is_tokenized_as_llava_trained_on_it(imported, reference):
    tensors, meta = reference
    processor = LlavaProcessor.from_pretrained(imported / "model")
    first, answer, second = meta["multi_turn"]["turns"]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": first.split("\n", 1)[1]}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        {"role": "user", "content": [{"type": "text", "text": second}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    original = tensors["input_ids.multi_turn"].tolist()
    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert ids == [image if token == IMAGE_TOKEN_INDEX else token for token in original]


def test_greedy_answers_match_the_original_llava_code(imported, reference):
    tensors, meta = reference
    processor = LlavaProcessor.from_pretrained(imported / "model", backend="pil")
    for lora, variant in (("none", "base"), ("unmerged", "lora")):
        model = load(imported, lora)
        for index, probe in enumerate(meta["probes"]):
            inputs = chat_inputs(processor, probe)
            want = tensors[f"generated.{variant}.{index}"].tolist()
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=len(want), do_sample=False)
            assert out[0, inputs["input_ids"].shape[1] :].tolist() == want, (variant, index)


def test_output_layout_loads_and_the_lora_is_named_as_peft_names_the_converted_model(imported):
    model_dir, lora_dir = imported / "model", imported / "lora"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["text_config"]["vocab_size"] % 64 == 0 and config["vision_feature_layer"] == -2
    processor = LlavaProcessor.from_pretrained(model_dir)
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<image>") == config["image_token_index"] == 320
    assert tokenizer.pad_token == "<pad>" and processor.image_processor.do_pad
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.startswith("language_model.model.layers.") for k in index)  # the layout vLLM reads
    assert any(k.startswith("vision_tower.vision_model.") for k in index)
    assert {"multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.bias"} <= set(index)

    adapter_config = json.loads((lora_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(model_dir.resolve())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 16)
    with safe_open(str(lora_dir / "adapter_model.safetensors"), "pt") as handle:
        imported_keys = set(handle.keys())
    fresh = get_peft_model(load(imported), language_model_lora(rank=4, alpha=16))
    assert imported_keys == set(get_peft_model_state_dict(fresh))  # exactly what PEFT saves for this model
    assert json.loads((imported / "import.json").read_text())["lora_rank"] == 4


def copy_release(tmp_path: Path) -> tuple[Path, Path]:
    sft, lora = tmp_path / "sft_model", tmp_path / "lora"
    shutil.copytree(SFT, sft)
    shutil.copytree(LORA, lora)
    return sft, lora


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("breakage", "error", "message"),
    [
        ("missing-shard", FileNotFoundError, "shard .*pytorch_model-00002-of-00003.bin is missing"),
        ("lora-target", ValueError, "LoRA target 'qkv_proj' matches no module"),
        ("lora-key", ValueError, "LoRA tensor .*matches no linear module"),
        ("projector", ValueError, "unknown projector type 'mlp3x_relu'"),
        ("vision-tower", FileNotFoundError, "vision tower openai/clip-vit-large-patch14 not found locally"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, breakage, error, message):
    sft, lora = copy_release(tmp_path)
    tower = TOWER
    if breakage == "missing-shard":
        (sft / "pytorch_model-00002-of-00003.bin").unlink()
    elif breakage == "lora-target":
        targets = json.loads((lora / "adapter_config.json").read_text())["target_modules"]
        edit_json(lora / "adapter_config.json", target_modules=[*targets, "qkv_proj"])
    elif breakage == "lora-key":
        weights = torch.load(lora / "adapter_model.bin", weights_only=True)
        weights = {k.replace("self_attn.q_proj", "self_attn.qkv"): v for k, v in weights.items()}
        torch.save(weights, lora / "adapter_model.bin")
    elif breakage == "projector":
        edit_json(sft / "config.json", mm_projector_type="mlp3x_relu")
    else:
        tower = None
    output = tmp_path / "out"
    with pytest.raises(error, match=message):
        import_llava_rlhf(sft, lora, output, vision_tower=tower, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "sft_model"]  # no output, no staging left


def test_cli_imports_registers_and_promotes_and_reports_bad_input_in_one_line(tmp_path, capsys):
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    common = ["--sft-model", str(SFT), "--lora", str(LORA), "--store-url", store_url]
    assert main(["import", "llava-rlhf", *common, "--output", str(tmp_path / "a"), "--register"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "alignloop import: error: vision tower openai/clip-vit-large-patch14 not found locally: "
        "openai/clip-vit-large-patch14/config.json is missing (pass --vision-tower DIR: a local copy of it)"
    ]
    args = [*common, "--vision-tower", str(TOWER), "--adapter-dir", str(tmp_path / "adapters"), "--register"]
    assert main(["import", "llava-rlhf", *args, "--output", str(tmp_path / "b")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["registered"], summary["promoted"]) == ("policy-v1", "llava-rlhf")
    from online_rl.store import open_store

    with open_store(store_url) as store:
        record = store.get_adapter(1)
        assert store.promoted_version("llava-rlhf") == 1 and record.algorithm == "llava-rlhf-import"
        assert record.base_model == str((tmp_path / "b" / "model").resolve())
        assert json.loads(record.notes)["imported"]["lora_sha256"]
    installed = json.loads((tmp_path / "adapters" / "policy-v1" / "adapter_config.json").read_text())
    assert installed["base_model_name_or_path"] == record.base_model
