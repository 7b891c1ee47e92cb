"""Preference training pieces: pairs encoded as model inputs, DPO equal to TRL's, and a step on the tiny model's
LoRA that moves every trainable parameter and no frozen one."""

from __future__ import annotations

import io
import types
from collections import defaultdict

import pytest
import torch
from peft import get_peft_model
from PIL import Image

from online_rl.dpo import PreferenceLossConfig, preference_loss
from online_rl.pairs import PreferencePair
from online_rl.preference_batch import PreferenceEncoder
from training.lora import language_model_lora
from training.losses import IGNORE_INDEX, dpo_loss, token_logps, weighted_sequence_score
from training.tiny_llava import TinyLlavaSpec, build_untrained, load_checkpoint

SHA = "a" * 64
PROMPT = (
    {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": f"sha256:{SHA}"}},
            {"type": "text", "text": "Describe the image in detail."},
        ],
    },
)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = build_untrained(tmp_path_factory.mktemp("tiny"), TinyLlavaSpec())
    return load_checkpoint(model_dir)


def pair(source="correction") -> PreferencePair:
    return PreferencePair(
        messages=PROMPT,
        chosen="There is one red star.",
        rejected="There is one red star and a moon.",
        source=source,
        chosen_generation_id=None,
        rejected_generation_id="gen-1",
        event_ids=("fb-1",),
    )


def test_labels_cover_only_the_response(tiny):
    _, processor = tiny
    encoded = PreferenceEncoder(processor).encode(PROMPT, "There is one red star.")
    response = [t for t in encoded.labels if t != IGNORE_INDEX]
    assert processor.tokenizer.decode(response) == " There is one red star.</s>"
    assert encoded.weights == [1.0 if t != IGNORE_INDEX else 0.0 for t in encoded.labels]
    assert encoded.input_ids.count(processor.tokenizer.convert_tokens_to_ids("<image>")) == TinyLlavaSpec().image_tokens


def test_dense_weights_mark_the_corrected_tokens(tiny):
    _, processor = tiny
    encoder = PreferenceEncoder(processor, dense_gamma=5.0)
    chosen, rejected = encoder.encode_pair(pair())
    decode = processor.tokenizer.decode
    # The diff keeps " There is one red star" (a run of >= 3 tokens); the rest of each side was changed.
    assert [(decode([t]), w) for t, w in zip(rejected.labels, rejected.weights) if t != IGNORE_INDEX] == [
        (" There", 1.0),
        (" is", 1.0),
        (" one", 1.0),
        (" red", 1.0),
        (" star", 1.0),
        (" and", 5.0),
        (" a", 5.0),
        (" moon", 5.0),
        (".", 5.0),
        ("</s>", 5.0),
    ]
    assert [w for t, w in zip(chosen.labels, chosen.weights) if t != IGNORE_INDEX] == [1.0] * 5 + [5.0, 5.0]
    # Thumbs pairs have no corrected span: plain DPO weights.
    plain_chosen, _ = encoder.encode_pair(pair(source="thumbs"))
    assert {w for w in plain_chosen.weights if w} == {1.0}


def test_batch_puts_chosen_rows_first(tiny):
    _, processor = tiny
    batch = PreferenceEncoder(processor).collate([pair(), pair("thumbs")], lambda sha: png_bytes())
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape == (4, 3, 96, 96)
    assert torch.equal(batch["labels"][0], batch["labels"][1])  # both chosen rows: the same text
    with pytest.raises(ValueError, match="not in the store"):
        PreferenceEncoder(processor).collate([pair()], lambda sha: None)


def test_dpo_equals_trls_sigmoid_loss():
    """TRL's DPOTrainer._compute_loss on fixed per-token log-probs (reference log-probs precomputed) and ours agree."""
    from trl import DPOTrainer

    torch.manual_seed(0)
    pairs, length, beta = 3, 7, 0.1
    mask = (torch.rand(2 * pairs, length) > 0.3).long()
    policy_token_logps = -torch.rand(2 * pairs, length - 1) * mask[:, 1:]
    ref_logps = -torch.rand(2 * pairs) * 4

    trainer = DPOTrainer.__new__(DPOTrainer)
    accelerator = types.SimpleNamespace(
        device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x, unwrap_model=lambda m: m
    )
    trainer.__dict__.update(
        dict(
            model=types.SimpleNamespace(training=True),
            accelerator=accelerator,
            aux_loss_enabled=False,
            ld_alpha=None,
            precompute_ref_logps=True,
            f_divergence_type="reverse_kl",
            loss_types=["sigmoid"],
            loss_weights=[1.0],
            beta=beta,
            use_weighting=False,
            label_smoothing=0.0,
            _metrics=defaultdict(lambda: defaultdict(list)),
            _total_train_tokens=0,
            _tp_size=1,
        )
    )
    outputs = types.SimpleNamespace(
        log_probs=policy_token_logps,
        entropy=torch.zeros(2 * pairs, length - 1),
        mean_logits=torch.zeros(2 * pairs, length - 1),
        is_top1=torch.zeros(2 * pairs, length - 1, dtype=torch.bool),
    )
    inputs = {
        "input_ids": torch.ones(2 * pairs, length, dtype=torch.long),
        "attention_mask": mask,
        "completion_mask": mask,
        "ref_chosen_logps": ref_logps[:pairs],
        "ref_rejected_logps": ref_logps[pairs:],
    }
    trl_loss = trainer._compute_loss(lambda **kwargs: outputs, inputs, return_outputs=False)

    scores = weighted_sequence_score(policy_token_logps, mask[:, 1:].float(), normalize=False)
    ours, _, _ = dpo_loss(scores[:pairs], scores[pairs:], ref_logps[:pairs], ref_logps[pairs:], beta)
    assert float(ours.mean()) == pytest.approx(float(trl_loss), rel=1e-6)


def test_a_step_moves_every_lora_parameter_and_nothing_frozen(tiny):
    model, processor = tiny
    policy = get_peft_model(model, language_model_lora(rank=4))
    batch = PreferenceEncoder(processor, dense_gamma=2.0).collate([pair(), pair("thumbs")], lambda sha: png_bytes())
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    start, _ = preference_loss(policy, batch, PreferenceLossConfig(beta=0.1))
    assert float(start.detach()) == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-6)  # policy == reference
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):  # LoRA B starts at 0, so A moves only from the second step on
        loss, metrics = preference_loss(policy, batch, PreferenceLossConfig(beta=0.1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # At the start the policy equals the reference: the loss is log 2.
    moved = {name for name, p in policy.named_parameters() if not torch.equal(before[name], p.detach())}
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable and moved == trainable
    assert all("lora_" in name for name in trainable)
    assert set(metrics) >= {"loss", "reward_accuracy", "reward_margin"}


def test_sft_weight_adds_the_chosen_answers_token_nll(tiny):
    model, processor = tiny
    policy = get_peft_model(model, language_model_lora(rank=4))
    batch = PreferenceEncoder(processor).collate([pair(), pair("thumbs")], lambda sha: png_bytes())
    plain, metrics = preference_loss(policy, batch, PreferenceLossConfig(beta=0.1))
    with_sft, _ = preference_loss(policy, batch, PreferenceLossConfig(beta=0.1, sft_weight=0.5))
    assert metrics["chosen_nll"] > 0
    assert float(with_sft.detach()) == pytest.approx(float(plain.detach()) + 0.5 * metrics["chosen_nll"], rel=1e-5)
    # The NLL is the chosen rows' (the first half's) mean token NLL under the policy.
    with torch.no_grad():
        logps = token_logps(
            policy(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits, batch["labels"]
        )
    labels = batch["labels"][:2, 1:]
    expected = (-logps[:2].sum(-1) / (labels != IGNORE_INDEX).sum(-1)).mean()
    assert metrics["chosen_nll"] == pytest.approx(float(expected), rel=1e-5)
