"""Is an adapter version served exactly? The served model's greedy answers against transformers + PEFT's, in-process.

A LoRA can be published and still not be what users get: vLLM (some versions, and LLaVA wrappers) skips LoRA
weights whose module names match no layer and answers with the base model under the adapter's name; a processor
or chat template can differ between the two stacks. `check_served_exactly` asks the served model (vLLM, or the
gateway with `llava-rlhf@vN`) for greedy answers to a few probes and compares them with the answers of the same
base model with the same adapter loaded by PEFT in this process, one request at a time (no padding). It first
checks that every LoRA tensor names a linear layer of the base model, since PEFT, like vLLM, would silently skip the
others and both sides would then agree on the wrong answers.

    from online_rl.served_check import check_served_exactly, shapes_probes

    mismatches = check_served_exactly("http://127.0.0.1:8000", "llava-rlhf@v3", "runs/adapters/policy-v3",
                                      "models/shapes-llava", shapes_probes(), api_key=key)
    if mismatches: ...  # do not gate or promote the version
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from training.evaluation.models import ChatRequest

logger = logging.getLogger(__name__)

PROBE_QUESTIONS = ("Describe the image in detail.", "What color is the largest object?", "Is there a red circle?")


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """One probe whose served answer differs from the in-process one (`probe` None: the adapter itself is wrong)."""

    probe: int | None
    question: str
    served: str
    expected: str
    reason: str = "the served greedy answer differs from transformers + PEFT's"


def shapes_probes(count: int = 6, split: str = "validation", max_tokens: int = 32) -> list[ChatRequest]:
    """`count` ShapesWorld images from `split` (never trained on), each with one of a few question kinds."""
    from training.shapes_world import ShapesWorld

    world = ShapesWorld()
    scenes = world.scenes(split, count)
    return [
        ChatRequest(world.render(scene), PROBE_QUESTIONS[index % len(PROBE_QUESTIONS)], max_tokens)
        for index, scene in enumerate(scenes)
    ]


def reference_answers(
    adapter_dir: str | Path | None, base_model: str | Path, probes: Sequence[ChatRequest], merged: bool = False
) -> list[str]:
    """Greedy answers of `base_model` with the adapter loaded by PEFT (unmerged, or merged into the weights), one
    probe at a time; no adapter: the base model's own answers."""
    import torch

    from training.evaluation.models import TransformersChatModel
    from training.tiny_llava import load_checkpoint

    model, processor = load_checkpoint(base_model, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
        if merged:
            model = model.merge_and_unload()
    chat = TransformersChatModel.from_loaded(model.eval(), processor, batch_size=1)
    with torch.no_grad():
        return chat.answer(list(probes))


def served_answers(endpoint: str, model_name: str, probes: Sequence[ChatRequest], api_key: str = "EMPTY") -> list[str]:
    """Greedy (temperature 0) answers of `model_name` behind an OpenAI-compatible `endpoint` (with or without /v1)."""
    from training.evaluation.models import OpenAIChatModel

    base_url = endpoint.rstrip("/")
    base_url = base_url if base_url.endswith("/v1") else f"{base_url}/v1"
    return OpenAIChatModel(base_url, model_name, api_key=api_key, concurrency=4).answer(list(probes))


def _comparable(text: str) -> str:
    """An answer cut at max_tokens inside a multi-byte character ends in a partial UTF-8 sequence: transformers
    decodes it as U+FFFD, vLLM's incremental detokenizer holds it back. Neither is part of the answer."""
    return text.strip().rstrip("\ufffd").rstrip()


def check_served_exactly(
    endpoint: str,
    model_name: str,
    adapter_dir: str | Path,
    base_model: str | Path,
    probes: Sequence[ChatRequest] | None = None,
    api_key: str = "EMPTY",
    merged: bool = False,
) -> list[Mismatch]:
    """The probes whose served greedy answer differs from transformers + PEFT's; empty when served exactly.

    `endpoint`: a vLLM server or the gateway (`http://HOST:PORT`); `model_name`: what to ask it for (`policy-vN` from
    vLLM, `llava-rlhf@vN` from the gateway); `adapter_dir`: the version's directory; `base_model`: the model directory
    vLLM serves; `probes`: default `shapes_probes()`. An adapter whose tensors name modules the base model does not
    have yields one Mismatch with `probe=None` (it would be silently ignored by both stacks).
    """
    from training.lora import check_adapter_matches

    probes = list(probes) if probes is not None else shapes_probes()
    try:
        check_adapter_matches(adapter_dir, base_model)
    except (ValueError, FileNotFoundError) as error:
        return [Mismatch(None, "", "", "", f"adapter does not match the base model: {error}")]
    expected = reference_answers(adapter_dir, base_model, probes, merged=merged)
    served = served_answers(endpoint, model_name, probes, api_key)
    mismatches = [
        Mismatch(index, probe.question, got, want)
        for index, (probe, got, want) in enumerate(zip(probes, served, expected, strict=True))
        if _comparable(got) != _comparable(want)
    ]
    logger.info(
        "served check model=%s probes=%d mismatches=%d adapter=%s",
        model_name,
        len(probes),
        len(mismatches),
        adapter_dir,
    )
    return mismatches
