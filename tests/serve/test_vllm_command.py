"""How the embedded vLLM is launched: the command line and environment built from its config."""

from __future__ import annotations

import sys

from serve.vllm_process import VLLMServerConfig, vllm_command, vllm_environment


def test_cpus_pin_vllm_and_its_threads_to_those_cores():
    config = VLLMServerConfig(model="models/shapes-llava", cpus="2-3")
    assert vllm_command(config)[:4] == ["taskset", "-c", "2-3", sys.executable]
    assert vllm_environment(config)["VLLM_CPU_OMP_THREADS_BIND"] == "2-3"


def test_without_cpus_vllm_starts_unpinned():
    config = VLLMServerConfig(model="models/shapes-llava", adapter_dir="runs/adapters")
    command = vllm_command(config)
    assert command[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert "--enable-lora" in command and "taskset" not in command


def test_engine_cpus_bind_only_the_engine_threads():
    config = VLLMServerConfig(model="models/shapes-llava", engine_cpus="0")
    assert vllm_command(config)[0] == sys.executable  # the API server is not pinned
    assert vllm_environment(config)["VLLM_CPU_OMP_THREADS_BIND"] == "0"
