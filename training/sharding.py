"""Sharded data parallelism (FSDP2: torch's `fully_shard`) for the recipes' LoRA'd LLaVA models.

Under torchrun the recipes run data-parallel. With DDP (`--sharding ddp`, accelerate's default) every process holds
a whole copy of each model. With `--sharding fsdp` each decoder layer of the language model is one FSDP unit, the
LlavaModel around them (vision tower, projector, embeddings) another, also gathered when transformers' `generate`
calls its `get_image_features` outside any forward (and left gathered between passes), and the rest (LM or scalar
heads) the root unit: every process keeps 1/N of the
parameters, and a unit's full weights exist only while it runs forward or backward. The gradients of the LoRA and
head parameters are reduce-scattered, which averages them over the processes as DDP's all-reduce does; the frozen
base weights are sharded too, which is where the memory goes on a real checkpoint.

FSDP's rules, which the recipes keep:
- every process runs the same number of forward passes, in the same order (each unit all-gathers its weights);
- saving gathers the whole state dict onto process 0's CPU (`gathered_state_dict`), which loads it into an unsharded
  copy of the model and writes that copy the usual way.
It runs the same on GPUs (NCCL) and on CPUs (gloo): CI trains the reward model with 2 gloo processes.
"""

from __future__ import annotations

import inspect

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

SHARDINGS = ("ddp", "fsdp")


def is_sharded(accelerator, sharding: str) -> bool:
    """Whether a recipe shards its models: `--sharding fsdp` over several processes. Mixed precision comes from
    accelerate's prepared (DDP) models, which a sharded run does not use, so that pairing is refused rather than
    silently run in fp32."""
    sharded = sharding == "fsdp" and accelerator.num_processes > 1
    if sharded and accelerator.mixed_precision != "no":
        raise ValueError(f"--mixed_precision {accelerator.mixed_precision} runs with --sharding ddp, not fsdp")
    return sharded


def shard(root: torch.nn.Module, llava) -> torch.nn.Module:
    """Applies FSDP2 in place to `llava` (a LlavaForConditionalGeneration, PEFT-wrapped or not) and `root`, a
    module containing it whose forward every pass goes through. Needs the process group (torchrun; accelerate's
    Accelerator starts it); build the optimizer after this."""
    llava_model = (llava.get_base_model() if hasattr(llava, "get_base_model") else llava).model
    for layer in llava_model.language_model.layers:
        fully_shard(layer)
    # Kept gathered after its forward: get_image_features also runs inside LlavaModel.forward, and resharding when
    # that inner call returns would pull the embeddings away from the rest of the forward. (It costs the memory of
    # this unit's own weights, the vision tower and the embeddings, not the decoder layers'.)
    fully_shard(llava_model, reshard_after_forward=False)
    register_fsdp_forward_method(llava_model, "get_image_features")
    # The patched method reports its signature without its first argument (pixel_values); `generate` reads that
    # signature to pass the pixels, so give it the real one back.
    llava_model.get_image_features.__func__.__signature__ = inspect.signature(type(llava_model).get_image_features)
    fully_shard(root)
    return root


@torch.no_grad()
def ready_to_generate(llava, device: torch.device) -> None:
    """FSDP sets itself up on its root's first forward, and refuses to start from an inner unit; `generate` starts
    from `get_image_features`. One text-only token through the model (on every process) does the set-up first."""
    llava(input_ids=torch.ones((1, 1), dtype=torch.long, device=device))


def gathered_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole sharded model's state dict on process 0's CPU, by the unsharded names (empty on the other
    processes). Every process must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
