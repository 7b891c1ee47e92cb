"""A LoRA whose modules match nothing in the served base model is refused before it becomes a version: vLLM would
serve the base model under its name."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model

from online_rl.adapters import publish_adapter, register_adapter_dir
from online_rl.store import open_store
from training.lora import check_adapter_matches, language_model_lora
from training.tiny_llava import TinyLlavaSpec, build_untrained, load_checkpoint

SMALL = TinyLlavaSpec(vision_layers=1, text_layers=2, text_hidden=128, text_heads=2, text_intermediate=256)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return build_untrained(root / "two-layers", SMALL), build_untrained(
        root / "one-layer", TinyLlavaSpec(vision_layers=1, text_layers=1, text_hidden=128, text_heads=2)
    )


def test_publish_refuses_a_lora_on_layers_the_served_base_does_not_have(bases, tmp_path):
    two, one = bases
    model, _ = load_checkpoint(two)
    peft_model = get_peft_model(model, language_model_lora(rank=2))
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        with pytest.raises(
            ValueError, match=r"LoRA tensors name no linear layer of the base model \(e.g\. .*layers\.1"
        ):
            publish_adapter(store, peft_model, tmp_path / "adapters", str(one), algorithm="dpo")
        assert store.last_allocated_version() == 0  # refused before a version number was spent
        assert not (tmp_path / "adapters").exists()
        assert publish_adapter(store, peft_model, tmp_path / "adapters", str(two), algorithm="dpo").version == 1


def test_publish_refuses_a_target_module_that_matches_nothing(bases, tmp_path):
    two, _ = bases
    model, _ = load_checkpoint(two)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "qkv_proj"]))  # PEFT only warns
    with (
        open_store(f"sqlite:///{tmp_path / 'store.db'}") as store,
        pytest.raises(ValueError, match="target module 'qkv_proj' matches nothing in the base model"),
    ):
        publish_adapter(store, peft_model, tmp_path / "adapters", str(two), algorithm="dpo")


def test_register_installs_an_existing_adapter_only_if_it_matches_the_base(bases, tmp_path):
    two, one = bases
    model, _ = load_checkpoint(two)
    get_peft_model(model, language_model_lora(rank=2)).save_pretrained(tmp_path / "external")
    assert check_adapter_matches(tmp_path / "external", two) == 2 * 7
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        with pytest.raises(ValueError, match="name no linear layer"):
            register_adapter_dir(store, tmp_path / "external", tmp_path / "adapters", one, "external")
        record = register_adapter_dir(store, tmp_path / "external", tmp_path / "adapters", two, "external")
        assert (record.name, record.status, record.base_model) == ("policy-v1", "candidate", str(two.resolve()))
        assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["policy-v1"]
