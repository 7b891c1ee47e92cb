"""PPO rollout benchmark: one rollout batch sampled in-process (transformers, `training.rollouts.generate`) against
the same batch sampled by a vLLM server that loads the rollout adapter by name, in one run. Prints JSON.

Every PPO step changes the policy, so the vLLM path pays, each step, for writing the new LoRA (`write_adapter`, the
trainer's publishing code) and for vLLM loading it on the first request that names it (the filesystem resolver),
then samples the batch as concurrent requests (temperature 1, the prompt's own max_tokens, token ids returned as
PPO needs them). The in-process path samples the batch in one left-padded `generate`. Both use the bundled model,
`--batch` ShapesWorld train prompts (half descriptions), the median of `--repeats` steps.

    .venv/bin/python bench/ppo_rollouts.py --batch 32 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/...`

from alignloop.client import image_data_url
from serve.vllm_process import VLLMServer, VLLMServerConfig
from training.lora import language_model_lora, vllm_base_model, write_adapter
from training.ppo import shapes_prompts
from training.rollouts import generate
from training.shapes_world import ShapesWorld
from training.tiny_llava import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def openai_messages(prompt) -> list[dict]:
    """The prompt's chat messages with the image as a data URL content part."""
    question = next(part["text"] for part in prompt.messages[0]["content"] if part["type"] == "text")
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(prompt.image)}},
                {"type": "text", "text": question},
            ],
        }
    ]


async def sample_through_vllm(base_url: str, model: str, prompts) -> list[int]:
    """All prompts as concurrent chat completions; returns each response's token count."""
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:

        async def one(prompt) -> int:
            body = {
                "model": model,
                "messages": openai_messages(prompt),
                "temperature": 1.0,
                "top_p": 1.0,
                "max_tokens": prompt.max_new_tokens,
                "logprobs": True,
                "return_tokens_as_token_ids": True,
            }
            response = await client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            return len(response.json()["choices"][0]["logprobs"]["content"])

        return await asyncio.gather(*(one(prompt) for prompt in prompts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "models" / "shapes-llava"))
    parser.add_argument("--batch", type=int, default=32, help="prompts per rollout batch")
    parser.add_argument("--repeats", type=int, default=3, help="rollout batches per path (median reported)")
    parser.add_argument("--lora-rank", type=int, default=8)
    args = parser.parse_args()

    from peft import get_peft_model

    torch.manual_seed(0)
    base, processor = load_checkpoint(args.model)
    policy = get_peft_model(base, language_model_lora(rank=args.lora_rank, init_lora_weights="gaussian"))
    prompts = [p.prompt for p in shapes_prompts(ShapesWorld(), "train", 0, args.batch, random.Random(0), 0.5)]

    in_process, in_process_tokens = [], []
    generate(policy, processor, prompts[:2])  # warm-up
    for _ in range(args.repeats):
        started = time.perf_counter()
        rollouts = generate(policy, processor, prompts)
        in_process.append(time.perf_counter() - started)
        in_process_tokens.append(int(rollouts.response_lengths.sum()))

    with tempfile.TemporaryDirectory() as workdir:
        adapter_dir = Path(workdir) / "adapters"
        config = VLLMServerConfig(
            model=args.model,
            served_model_name="shapes-llava",
            port=free_port(),
            adapter_dir=str(adapter_dir),
            max_lora_rank=max(8, args.lora_rank),
            max_loras=args.repeats + 1,
        )
        server = VLLMServer(config, log_path=Path(workdir) / "vllm.log")
        server.start()
        try:
            server.wait_ready(timeout=300)
            asyncio.run(sample_through_vllm(config.base_url, "shapes-llava", prompts[:2]))  # warm-up, base model
            save, step, vllm_tokens = [], [], []
            for repeat in range(args.repeats):
                started = time.perf_counter()
                write_adapter(policy, adapter_dir, f"rollout-{repeat}", vllm_base_model(args.model))
                saved = time.perf_counter()
                tokens = asyncio.run(sample_through_vllm(config.base_url, f"rollout-{repeat}", prompts))
                step.append(time.perf_counter() - started)
                save.append(saved - started)
                vllm_tokens.append(sum(tokens))
        finally:
            server.stop()

    in_process_s, vllm_s = statistics.median(in_process), statistics.median(step)
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
                "batch": args.batch,
                "repeats": args.repeats,
                "lora_rank": args.lora_rank,
                "in_process": {"seconds_per_batch": round(in_process_s, 3), "response_tokens": in_process_tokens},
                "vllm": {
                    "seconds_per_batch": round(vllm_s, 3),
                    "adapter_write_seconds": round(statistics.median(save), 3),
                    "response_tokens": vllm_tokens,
                },
                "vllm_over_in_process": round(vllm_s / in_process_s, 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
