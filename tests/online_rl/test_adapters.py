"""Adapter publishing on disk: the base-model string vLLM's resolver matches, and atomic, immutable versions."""

import json

import pytest
from peft import get_peft_model

from online_rl.adapters import publish_adapter
from online_rl.store import open_store
from training.lora import LANGUAGE_MODEL_LORA_TARGETS, language_model_lora, write_adapter
from training.tiny_llava import TinyLlavaSpec, build_untrained, load_checkpoint


def test_publish_writes_a_complete_version_that_names_the_served_base_model(tmp_path, monkeypatch):
    model_dir = build_untrained(tmp_path / "base", TinyLlavaSpec())
    model, _ = load_checkpoint(model_dir)
    peft_model = get_peft_model(model, language_model_lora(rank=4))
    monkeypatch.chdir(tmp_path)
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        adapter = publish_adapter(store, peft_model, "adapters", "base", algorithm="dpo")
        assert (adapter.version, adapter.name, adapter.status) == (1, "policy-v1", "candidate")
        config = json.loads((tmp_path / "adapters" / "policy-v1" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(tmp_path / "base") == store.get_adapter(1).base_model
        assert config["target_modules"] == LANGUAGE_MODEL_LORA_TARGETS
        assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["policy-v1"]  # no staging left over
        with pytest.raises(FileExistsError):  # versions are immutable
            write_adapter(peft_model, "adapters", "policy-v1", "base")
