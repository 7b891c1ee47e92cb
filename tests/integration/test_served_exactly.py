"""Served exactly: vLLM's greedy answers with an adapter equal transformers + PEFT's in-process answers, for a LoRA of
the bundled model and for the imported LLaVA-RLHF LoRA (on the tiny original-format release in tests/fixtures), and
the check fails when a LoRA's keys are misnamed (vLLM then silently serves the base model under the adapter's name)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from online_rl.adapters import publish_adapter, register_adapter_dir
from online_rl.served_check import check_served_exactly, served_answers, shapes_probes
from online_rl.store import open_store
from tests.conftest import free_port
from tests.integration.conftest import ALICE, random_lora
from training.evaluation.models import ChatRequest
from training.import_llava import import_llava_rlhf

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "llava_rlhf_tiny"


def misname(adapter: Path, target: Path) -> Path:
    """A copy of `adapter` whose keys use the original LLaVA module names (`model.layers.N...`): the mistake of an
    import that does not rename the LoRA. Both PEFT and vLLM load it without an error and apply nothing."""
    shutil.copytree(adapter, target)
    weights = load_file(str(target / "adapter_model.safetensors"))
    renamed = {k.replace("model.language_model.", "model."): v for k, v in weights.items()}
    save_file(renamed, str(target / "adapter_model.safetensors"))
    return target


@pytest.fixture(scope="module")
def imported_server(tmp_path_factory):
    """The imported tiny LLaVA-RLHF served by a real vLLM, its LoRA registered (and promoted) as policy-v1."""
    from serve.vllm_process import VLLMServer, VLLMServerConfig

    workdir = tmp_path_factory.mktemp("imported")
    result = import_llava_rlhf(
        FIXTURE / "sft_model",
        FIXTURE / "rlhf_lora_adapter_model",
        workdir / "llava-rlhf-tiny",
        vision_tower=FIXTURE / "clip-vit-tiny-patch14",
        progress=False,
    )
    with open_store(f"sqlite:///{workdir / 'store.db'}") as store:
        record = register_adapter_dir(store, result.lora_dir, workdir / "adapters", result.model_dir, "import")
        store.promote("llava-rlhf", record.version)
    config = VLLMServerConfig(
        model=str(result.model_dir),
        served_model_name="llava-rlhf-tiny",
        port=free_port(),
        adapter_dir=str(workdir / "adapters"),
        max_model_len=512,
    )
    server = VLLMServer(config, log_path=workdir / "vllm.log")
    server.start()
    try:
        server.wait_ready(timeout=300)
        yield server, result, Path(record.path)
    finally:
        server.stop()


def fixture_probes() -> list[ChatRequest]:
    meta = json.loads((FIXTURE / "reference.json").read_text())
    return [
        ChatRequest(Image.open(FIXTURE / probe["image"]).convert("RGB"), probe["question"], 12)
        for probe in meta["probes"]
    ]


def served_token_ids(base_url: str, model: str, probe: ChatRequest) -> list[int]:
    from alignloop.client import image_data_url

    content = [
        {"type": "image_url", "image_url": {"url": image_data_url(probe.image)}},
        {"type": "text", "text": probe.question},
    ]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": probe.max_tokens,
        "temperature": 0,
        "logprobs": True,
        "return_tokens_as_token_ids": True,
    }
    answer = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120).json()
    return [int(item["token"].removeprefix("token_id:")) for item in answer["choices"][0]["logprobs"]["content"]]


def test_vllm_serves_the_imported_model_and_lora_as_the_original_llava_code_answers(imported_server):
    """Token for token: vLLM (padding non-square images itself, through the converted processor) gives the greedy
    tokens LLaVA's own code gave on the original checkpoint, with and without the LoRA."""
    server, _, _ = imported_server
    reference = load_file(str(FIXTURE / "reference.safetensors"))
    for model, variant in (("llava-rlhf-tiny", "base"), ("policy-v1", "lora")):
        for index, probe in enumerate(fixture_probes()):
            want = reference[f"generated.{variant}.{index}"].tolist()
            assert served_token_ids(server.base_url, model, probe)[: len(want)] == want, (model, index)


def test_imported_lora_is_served_exactly(imported_server):
    server, result, adapter = imported_server
    probes = fixture_probes() + shapes_probes(3, max_tokens=16)
    assert check_served_exactly(server.base_url, "policy-v1", adapter, result.model_dir, probes) == []
    assert check_served_exactly(server.base_url, "policy-v1", adapter, result.model_dir, probes, merged=True) == []


def test_the_check_fails_on_an_imported_lora_with_misnamed_keys(imported_server):
    server, result, adapter = imported_server
    adapter_dir = Path(server.config.adapter_dir)
    misname(adapter, adapter_dir / "misnamed-import")
    probes = fixture_probes()
    # vLLM loads it without a word and answers exactly as the base model: the adapter is silently ignored
    base = served_answers(server.base_url, "llava-rlhf-tiny", probes)
    assert served_answers(server.base_url, "misnamed-import", probes) == base
    [problem] = check_served_exactly(
        server.base_url, "misnamed-import", adapter_dir / "misnamed-import", result.model_dir, probes
    )
    assert problem.probe is None and "name no linear layer of the base model" in problem.reason
    # served under the name of the correct adapter's version, the answers differ probe by probe
    mismatches = check_served_exactly(server.base_url, "misnamed-import", adapter, result.model_dir, probes)
    assert len(mismatches) == len(probes)


def test_a_bundled_model_lora_is_served_exactly_through_vllm_and_the_gateway(
    vllm_server, bundled_model, gateway, gateway_store, tmp_path
):
    record = publish_adapter(
        gateway_store, random_lora(bundled_model, seed=5), vllm_server.config.adapter_dir, str(bundled_model), "test"
    )
    probes = shapes_probes(6)
    assert check_served_exactly(vllm_server.base_url, record.name, record.path, bundled_model, probes) == []
    via_gateway = check_served_exactly(
        gateway.url, f"llava-rlhf@v{record.version}", record.path, bundled_model, probes, api_key=ALICE
    )
    assert via_gateway == []


def test_the_check_fails_on_a_bundled_model_lora_with_misnamed_keys(vllm_server, bundled_model, tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        record = publish_adapter(
            store, random_lora(bundled_model, seed=6), tmp_path / "adapters", str(bundled_model), "t"
        )
    served_dir = Path(vllm_server.config.adapter_dir)
    misname(Path(record.path), served_dir / "misnamed-bundled")
    probes = shapes_probes(4)
    assert served_answers(vllm_server.base_url, "misnamed-bundled", probes) == served_answers(
        vllm_server.base_url, "shapes-llava", probes
    )
    mismatches = check_served_exactly(vllm_server.base_url, "misnamed-bundled", record.path, bundled_model, probes)
    assert mismatches and all(m.probe is not None for m in mismatches)
    [problem] = check_served_exactly(
        vllm_server.base_url, "misnamed-bundled", served_dir / "misnamed-bundled", bundled_model, probes
    )
    assert problem.probe is None
