"""`PreferenceTrainer`: DPO / Dense DPO rounds with the model loaded once. On the CPU a round is exactly the trainer's
own loop; bf16 autocast runs (on the CPU here; on CUDA in production); two gloo processes train what one does."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from online_rl.dpo import PreferenceLossConfig, preference_loss
from online_rl.dpo_runner import PreferenceTrainer, RoundConfig
from online_rl.pairs import PreferencePair
from online_rl.preference_batch import PreferenceEncoder
from training.lora import language_model_lora
from training.tiny_llava import TinyLlavaSpec, build_untrained, load_checkpoint

SPEC = TinyLlavaSpec(vision_layers=1, text_layers=2, text_hidden=128, text_heads=2, text_intermediate=256)
COLORS = {"a": (200, 30, 30), "b": (30, 30, 200), "c": (30, 200, 30), "d": (220, 200, 30)}


def image_bytes(sha: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), COLORS[sha[0]]).save(buffer, format="PNG")
    return buffer.getvalue()


def make_pairs() -> list[PreferencePair]:
    pairs = []
    for index, (key, color) in enumerate(zip(COLORS, ("red", "blue", "green", "yellow"))):
        prompt = (
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"sha256:{key * 64}"}},
                    {"type": "text", "text": "Describe the image in detail."},
                ],
            },
        )
        pairs.append(
            PreferencePair(
                messages=prompt,
                chosen=f"There is one {color} square.",
                rejected=f"There is one {color} square and a moon.",
                source="correction" if index % 2 else "thumbs",
                chosen_generation_id=None,
                rejected_generation_id=f"gen-{index}",
                event_ids=(f"fb-{index}",),
            )
        )
    return pairs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_untrained(tmp_path_factory.mktemp("runner"), SPEC)


@pytest.fixture
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def plain_loop(model_dir: Path, config: RoundConfig, pairs):
    """The online trainer's own loop (`OnlineTrainer.train`), written out: what a CPU round must equal."""
    from peft import get_peft_model

    model, processor = load_checkpoint(model_dir)
    torch.manual_seed(config.seed)
    policy = get_peft_model(model, language_model_lora(rank=config.lora_rank))
    torch.manual_seed(config.seed)
    dense = config.algorithm == "dense-dpo"
    encoder = PreferenceEncoder(processor, dense_gamma=config.gamma if dense else None)
    loss_config = PreferenceLossConfig(config.beta, dense and config.dense_normalize, config.sft_weight)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.learning_rate)
    order = random.Random(config.seed)
    policy.train()
    losses = []
    for _ in range(config.epochs):
        shuffled = order.sample(pairs, len(pairs))
        for start in range(0, len(shuffled), config.batch_pairs):
            batch = encoder.collate(shuffled[start : start + config.batch_pairs], image_bytes)
            loss, metrics = preference_loss(policy, batch, loss_config)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(metrics["loss"])
    return {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}, losses


def lora_weights(policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("algorithm", ["dpo", "dense-dpo"])
def test_a_cpu_round_is_exactly_the_trainers_loop(model_dir, algorithm, fresh_accelerator_state):
    config = RoundConfig(algorithm=algorithm, epochs=2, batch_pairs=2, lora_rank=4, learning_rate=1e-3)
    trainer = PreferenceTrainer(model_dir, config, image_bytes)
    assert (trainer.device.type, trainer.accelerator.mixed_precision) == ("cpu", "no")
    output = trainer.train_round(make_pairs())
    want, losses = plain_loop(model_dir, config, make_pairs())
    got = lora_weights(output.policy)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert output.steps == 4 and output.metrics["loss"] == pytest.approx(sum(losses[2:]) / 2, abs=1e-6)


def test_the_model_is_loaded_once_and_each_round_starts_from_its_parent(model_dir, tmp_path, fresh_accelerator_state):
    trainer = PreferenceTrainer(model_dir, RoundConfig(epochs=1, batch_pairs=4, lora_rank=4), image_bytes)
    base = trainer.base
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    first = trainer.train_round(make_pairs())
    fresh = get_fresh_lora(model_dir)
    moved = lora_weights(first.policy)
    assert all(not torch.equal(moved[n], fresh[n]) for n in fresh if "lora_B" in n)  # every LoRA B left zero
    first.policy.save_pretrained(tmp_path / "v1")
    sampler = trainer.wrap(tmp_path / "v1")  # the policy BDHS / online pairs would be sampled from
    assert not sampler.training
    second = trainer.train_round(make_pairs(), parent_adapter=tmp_path / "v1")
    assert second.policy is sampler  # trained in place, not loaded again
    config = json.loads((tmp_path / "v1" / "adapter_config.json").read_text())
    assert second.policy.peft_config["default"].r == config["r"] == 4
    assert trainer.base is base  # the same model object: not loaded again
    trainer.release()
    assert not any("lora_" in n for n, _ in base.named_parameters())  # the LoRA is off again
    assert all(torch.equal(p, frozen[n]) for n, p in base.named_parameters())  # and the base never moved


def get_fresh_lora(model_dir: Path) -> dict[str, torch.Tensor]:
    from peft import get_peft_model

    model, _ = load_checkpoint(model_dir)
    torch.manual_seed(0)
    return lora_weights(get_peft_model(model, language_model_lora(rank=4)))


def test_bf16_autocast_round_runs_and_keeps_fp32_lora_weights(model_dir, fresh_accelerator_state):
    trainer = PreferenceTrainer(model_dir, RoundConfig(epochs=1, lora_rank=4, mixed_precision="bf16"), image_bytes)
    assert trainer.accelerator.mixed_precision == "bf16"
    output = trainer.train_round(make_pairs())
    assert {p.dtype for p in lora_weights(output.policy).values()} == {torch.float32}
    assert torch.isfinite(torch.tensor(output.metrics["loss"]))


WORKER = """
import json, sys, torch
sys.path.insert(0, {repo!r})
from online_rl.dpo_runner import PreferenceTrainer, RoundConfig
from tests.online_rl.test_dpo_runner import image_bytes, make_pairs
trainer = PreferenceTrainer({model!r}, RoundConfig(epochs=1, batch_pairs=4, lora_rank=4, learning_rate=1e-3),
                            image_bytes)
pairs = trainer.share(make_pairs() if trainer.is_main_process else None)  # only the main process reads the store
output = trainer.train_round(pairs)
if trainer.is_main_process:
    weights = {{n: p.detach().double().sum().item() for n, p in output.policy.named_parameters() if "lora_" in n}}
    print(json.dumps({{"processes": trainer.accelerator.num_processes, "loss": output.metrics["loss"],
                      "weights": weights}}))
"""


@pytest.mark.slow
def test_two_gloo_processes_train_what_one_process_trains(model_dir, tmp_path):
    repo = str(Path(__file__).resolve().parents[2])
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=repo, model=str(model_dir)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo)
    results = {}
    for processes in (1, 2):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        done = subprocess.run([*command, str(script)], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results[processes] = json.loads(done.stdout.strip().splitlines()[-1])
    assert results[2]["processes"] == 2
    assert results[2]["loss"] == pytest.approx(results[1]["loss"], abs=1e-4)
    for name, value in results[1]["weights"].items():
        assert results[2]["weights"][name] == pytest.approx(value, rel=1e-3, abs=1e-4), name
