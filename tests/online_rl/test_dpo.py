"""Preference training pieces: pairs encoded as model inputs, DPO equal to TRL's, and a step on the tiny model's
LoRA that moves every trainable parameter and no frozen one."""

from __future__ import annotations

import io

import pytest
import torch
from peft import get_peft_model
from PIL import Image

from online_rl.dpo import PreferenceLossConfig, preference_loss
from online_rl.pairs import PreferencePair
from online_rl.preference_batch import PreferenceEncoder
from training.lora import language_model_lora
from training.losses import IGNORE_INDEX, token_logps
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


def tiny_causal_lm(seed: int, vocab_size: int):
    """A one-layer Llama with random weights, large enough (init std 0.5) that policy and reference disagree."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        initializer_range=0.5,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


def test_dpo_equals_trls_sigmoid_loss(tmp_path):
    """Our plain DPO (`preference_loss` with weights 1 and no normalisation, i.e. `dpo_loss` on summed response
    log-probs) equals TRL's sigmoid DPO loss, through TRL's public API only.

    TRL 1.16 has no public loss function (the loss lives in the private `DPOTrainer._compute_loss`), so the test
    builds a real `DPOTrainer` with its public constructor on a tiny local Llama, a reference model with other
    weights (with equal weights every pair's loss is log 2 whatever beta) and a word-level tokenizer, takes one batch
    from `get_train_dataloader()` and calls the public `compute_loss`. Our loss runs on the same batch (chosen rows
    first, labels = the completion tokens), the same policy and the same reference; the two losses and their
    gradients on every policy parameter must agree within float32 tolerance."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    words = ["<pad>", "</s>", "<unk>", "the", "sky", "is", "blue", "green", "grass", "red", "sun", "a", "star", "moon"]
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    data = Dataset.from_dict(
        {
            "prompt": ["the sky is", "the grass is", "the sun is"],
            "chosen": [" blue", " green", " a red star"],
            "rejected": [" green moon", " red", " blue"],
        }
    )
    beta = 0.5
    args = DPOConfig(
        output_dir=str(tmp_path),
        beta=beta,
        loss_type=["sigmoid"],
        per_device_train_batch_size=3,
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=tiny_causal_lm(0, len(words)),
        ref_model=tiny_causal_lm(1, len(words)),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    policy = trainer.model
    trl_loss = trainer.compute_loss(policy, batch)
    trl_loss.backward()
    trl_grads = {name: p.grad.clone() for name, p in policy.named_parameters()}
    policy.zero_grad()

    ours_batch = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "pixel_values": None,  # a text-only model: the Llama forward ignores it
        "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX),
        "token_weights": batch["completion_mask"].float(),
    }
    ours, metrics = preference_loss(policy, ours_batch, PreferenceLossConfig(beta=beta), reference=trainer.ref_model)
    ours.backward()

    assert trl_loss.item() > 1.0  # far from log 2: policy and reference disagree, so beta matters
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert metrics["loss"] == pytest.approx(trl_loss.item(), rel=1e-5)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)


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
