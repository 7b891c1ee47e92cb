"""The LoRA layout alignloop trains and vLLM serves: the base-model string vLLM's resolver matches."""

from training.lora import vllm_base_model


def test_a_local_model_directory_is_named_by_its_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "models" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert vllm_base_model("models/base") == str(tmp_path / "models" / "base")
    assert vllm_base_model("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"  # a hub id stays as it is
