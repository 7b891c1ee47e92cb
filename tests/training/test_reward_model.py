"""The reward model: what it reads, where its head looks, that saving loses nothing, and a short recipe run."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from training.evaluation.models import user_turn
from training.ppo_losses import last_token_states
from training.reward_data import RewardPair, kind_weights, load_pairs
from training.reward_model import (
    RewardConfig,
    RewardEncoder,
    load_reward_model,
    new_reward_model,
    pair_accuracy,
    save_reward_model,
    score_rows,
    train,
    without_facts,
)
from training.shapes_world import DESCRIBE_PROMPT, ShapesWorld, WorldConfig

WORLD = ShapesWorld()
SCENE = WORLD.scene("validation", 0)
MESSAGES = tuple(user_turn(DESCRIBE_PROMPT))


@pytest.fixture(scope="module")
def reward_model(bundled_model):
    return new_reward_model(bundled_model, lora_rank=4, seed=0)


def rows(*responses):
    image = WORLD.render(SCENE)
    return [(MESSAGES, response, WORLD.facts(SCENE), image) for response in responses]


def test_the_facts_are_read_only_by_the_fact_augmented_encoder(reward_model):
    _, processor = reward_model
    with_facts, plain = RewardEncoder(processor, True), RewardEncoder(processor, False)
    fact_text = processor.tokenizer.decode(
        with_facts.encode(MESSAGES, "There is a star.", WORLD.facts(SCENE), random.Random(0))
    )
    plain_text = processor.tokenizer.decode(
        plain.encode(MESSAGES, "There is a star.", WORLD.facts(SCENE), random.Random(0))
    )
    assert all(fact in fact_text for fact in WORLD.facts(SCENE)[1:])
    assert not any(fact in plain_text for fact in WORLD.facts(SCENE)[1:])
    ids = with_facts.encode(MESSAGES, "There is a star.", WORLD.facts(SCENE), random.Random(0))
    assert ids.count(with_facts.image_token_id) == with_facts.image_seq_length  # one image, expanded


def test_a_row_scores_the_same_alone_and_padded_in_a_batch(reward_model):
    model, processor = reward_model
    encoder = RewardEncoder(processor)
    short, long = "There is one object.", "There are two objects. A small red star is at the top left. " * 2
    alone = score_rows(model, encoder, rows(short), random.Random(0))
    batched = score_rows(model, encoder, rows(long, short), random.Random(0))
    assert torch.allclose(alone[0], batched[1], atol=1e-4)
    batch = encoder.collate(rows(long, short), random.Random(0))
    with torch.no_grad():
        hidden = model.hidden_states(**batch)
        expected = model.head.linear(last_token_states(hidden, batch["attention_mask"])).squeeze(-1)
        assert torch.allclose(model(**batch), expected)


def test_saving_and_loading_keeps_the_scores_and_the_value_model_starts_at_zero(reward_model, bundled_model, tmp_path):
    model, processor = reward_model
    torch.nn.init.normal_(model.head.linear.weight)  # a head that is not the fresh one
    encoder = RewardEncoder(processor)
    scores = score_rows(model, encoder, rows("There is a star.", "There is a moon."), random.Random(0))
    save_reward_model(model, tmp_path / "rm", {"with_facts": True, "base_model": str(bundled_model)})
    loaded, _, meta = load_reward_model(tmp_path / "rm")
    assert meta["with_facts"] is True and not any(p.requires_grad for p in loaded.parameters())
    assert torch.allclose(
        score_rows(loaded, encoder, rows("There is a star.", "There is a moon."), random.Random(0)), scores
    )
    value, _, _ = load_reward_model(tmp_path / "rm", trainable=True, zero_head=True)
    assert torch.count_nonzero(value.head.linear.weight) == 0 and value.head.linear.weight.requires_grad
    reward_lora = {k: v for k, v in loaded.backbone.state_dict().items() if "lora_" in k}
    value_lora = {k: v for k, v in value.backbone.state_dict().items() if "lora_" in k}
    assert reward_lora.keys() == value_lora.keys() and all(
        torch.equal(reward_lora[k], value_lora[k]) for k in reward_lora
    )
    assert all(p.requires_grad for k, p in value.backbone.named_parameters() if "lora_" in k)


def test_a_reward_model_trained_on_another_rating_prompt_is_refused(reward_model, bundled_model, tmp_path):
    from training.reward_prompt import RATING_PROMPT_VERSION

    model, _ = reward_model
    directory = save_reward_model(model, tmp_path / "rm", {"with_facts": True, "base_model": str(bundled_model)})
    meta = json.loads((directory / "reward_model.json").read_text())
    assert meta["rating_prompt"] == RATING_PROMPT_VERSION
    del meta["rating_prompt"]  # as the models saved before the version was recorded (version 1)
    (directory / "reward_model.json").write_text(json.dumps(meta))
    with pytest.raises(
        ValueError,
        match=f"trained on rating prompt version 1, and this code writes version "
        f"{RATING_PROMPT_VERSION}: train it again",
    ):
        load_reward_model(directory)


class LengthScorer(torch.nn.Module):
    """A stand-in reward model: the longer the input, the higher the score."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, pixel_values):
        return attention_mask.sum(dim=1).float() + self.anchor


def test_pair_accuracy_counts_pairs_whose_chosen_answer_scores_higher(reward_model):
    _, processor = reward_model
    image = WORLD.render(SCENE)
    pairs = [
        RewardPair(MESSAGES, "a longer answer here", "short", (), image, "description"),
        RewardPair(MESSAGES, "short", "a longer answer here", (), image, "description"),
        RewardPair(MESSAGES, "Yes, there is one.", "No.", (), image, "presence"),
    ]
    report = pair_accuracy(LengthScorer(), RewardEncoder(processor, with_facts=False), pairs)
    assert report["accuracy"] == round(2 / 3, 4) and report["pairs"] == 3
    assert report["accuracy_description"] == 0.5 and report["accuracy_presence"] == 1.0
    assert report["balanced_accuracy"] == 0.75  # the mean over the two kinds, where the overall accuracy is 2/3


def test_a_short_recipe_run_writes_a_loadable_reward_model(bundled_model, tmp_path):
    config = RewardConfig(
        output_dir=str(tmp_path / "rm"),
        model=str(bundled_model),
        pairs_dir=str(tmp_path / "pairs"),
        train_scenes=6,
        eval_scenes=4,
        samples=3,
        probe_samples=3,
        epochs=1,
        batch_pairs=4,
        lora_rank=4,
        cpu=True,
    )
    summary = train(config)
    assert summary["processes"] == 1 and summary["train_pairs"] > 0 and summary["with_facts"] is True
    assert 0.0 <= summary["held_out"]["accuracy"] <= 1.0
    assert (tmp_path / "pairs" / "train" / "pairs.jsonl").is_file()
    records = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, summary["steps"] + 1))
    _, _, meta = load_reward_model(tmp_path / "rm")
    assert meta["held_out"] == summary["held_out"]


def test_balance_kinds_weights_the_loss_by_kind_and_records_the_weights(bundled_model, tmp_path):
    config = RewardConfig(
        output_dir=str(tmp_path / "plain"),
        model=str(bundled_model),
        pairs_dir=str(tmp_path / "pairs"),
        train_scenes=10,
        eval_scenes=4,
        samples=3,
        probe_samples=3,
        epochs=1,
        batch_pairs=4,
        lora_rank=4,
        cpu=True,
    )
    plain = train(config)
    balanced = train(dataclasses.replace(config, output_dir=str(tmp_path / "balanced"), balance_kinds=True))
    pairs = load_pairs(tmp_path / "pairs" / "train")
    weights = kind_weights([p.kind for p in pairs])
    assert set(weights.values()) != {1.0}  # kinds of unequal counts, else the two runs would be the same
    assert plain["balance_kinds"] is False and plain["kind_weights"] == {}
    assert balanced["balance_kinds"] is True
    assert balanced["kind_weights"] == {kind: round(weight, 4) for kind, weight in sorted(weights.items())}

    def first_loss(name):
        return json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    # the same seed, so the same initial model and the same first batch: only the weights differ
    assert first_loss("balanced") != first_loss("plain")


def test_without_facts_leaves_the_facts_out_of_about_the_share_asked_and_nothing_else(reward_model):
    image = WORLD.render(SCENE)
    pairs = [
        RewardPair(MESSAGES, f"chosen {i}", f"rejected {i}", tuple(WORLD.facts(SCENE)), image, "description_object")
        for i in range(1000)
    ]
    assert without_facts(pairs, 0.0, random.Random(0)) == pairs
    assert all(pair.facts == () for pair in without_facts(pairs, 1.0, random.Random(0)))
    half = without_facts(pairs, 0.5, random.Random(0))
    assert 450 < sum(pair.facts == () for pair in half) < 550
    assert [(p.messages, p.chosen, p.rejected, p.image, p.kind) for p in half] == [
        (p.messages, p.chosen, p.rejected, p.image, p.kind) for p in pairs
    ]
    assert {p.facts for p in half} == {(), tuple(WORLD.facts(SCENE))}
    # a pair without facts is the plain reward model's row, token for token, in either placement
    _, processor = reward_model
    dropped = next(pair for pair in half if pair.facts == ())
    plain = RewardEncoder(processor, with_facts=False).encode(dropped.messages, dropped.chosen, (), random.Random(0))
    for placement in ("rating_turn", "before_answer"):
        fact_encoder = RewardEncoder(processor, with_facts=True, facts_placement=placement)
        assert fact_encoder.encode(dropped.messages, dropped.chosen, dropped.facts, random.Random(0)) == plain


def test_cached_pairs_are_reused_only_when_made_with_the_same_settings(bundled_model, tmp_path, caplog):
    from accelerate import Accelerator

    from training.reward_data import MADE_WITH_FILE
    from training.reward_model import reward_pairs

    config = RewardConfig(
        model=str(bundled_model), pairs_dir=str(tmp_path / "pairs"), train_scenes=3, samples=2, probe_samples=3
    )
    accelerator = Accelerator(cpu=True)
    first = reward_pairs(config, "train", accelerator)
    made_with = json.loads((tmp_path / "pairs" / "train" / MADE_WITH_FILE).read_text())
    assert [made_with[key] for key in ("scenes", "samples", "probe_samples", "questions")] == [3, 2, 3, 3]
    stamp = (tmp_path / "pairs" / "train" / "pairs.jsonl").stat().st_mtime_ns
    # same settings, or another seed for the model only: read back, not sampled again
    again = reward_pairs(dataclasses.replace(config, seed=1), "train", accelerator)
    assert (tmp_path / "pairs" / "train" / "pairs.jsonl").stat().st_mtime_ns == stamp
    assert [(p.chosen, p.rejected) for p in again] == [(p.chosen, p.rejected) for p in first]
    with caplog.at_level("INFO", logger="training.reward_model"):
        reward_pairs(dataclasses.replace(config, train_scenes=4), "train", accelerator)
    assert "sampled with other settings (scenes=3)" in caplog.text
    assert json.loads((tmp_path / "pairs" / "train" / MADE_WITH_FILE).read_text())["scenes"] == 4
    with caplog.at_level("INFO", logger="training.reward_model"):
        reward_pairs(dataclasses.replace(config, train_scenes=4, probe_samples=2), "train", accelerator)
    assert "sampled with other settings (probe_samples=3)" in caplog.text
    # noisier images: sampled again, and every pair's image is its scene rendered with that noise
    with caplog.at_level("INFO", logger="training.reward_model"):
        noisy = reward_pairs(
            dataclasses.replace(config, train_scenes=4, probe_samples=2, pixel_noise_std=70.0), "train", accelerator
        )
    assert "sampled with other settings (pixel_noise_std=6.0)" in caplog.text
    noisy_world = ShapesWorld(WorldConfig(pixel_noise_std=70.0))
    renders = {noisy_world.render(scene).tobytes() for scene in noisy_world.scenes("train", 4)}
    assert noisy and {pair.image.tobytes() for pair in noisy} <= renders
    assert not {pair.image.tobytes() for pair in noisy} & {WORLD.render(s).tobytes() for s in WORLD.scenes("train", 4)}


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one precision per process; these tests ask for another, so they start and end clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_computes_in_bf16_and_saves_fp32_weights(
    bundled_model, tmp_path, monkeypatch, fresh_accelerator_state
):
    from safetensors.torch import load_file

    import training.reward_model as recipe

    mlp_outputs = set()  # a decoder layer's own output is fp32 either way: the residual stream stays fp32

    def recorded(*args, **kwargs):
        model, processor = new_reward_model(*args, **kwargs)
        mlp = model.backbone.get_base_model().model.language_model.layers[0].mlp
        mlp.register_forward_hook(lambda module, inputs, output: mlp_outputs.add(output.dtype))
        return model, processor

    monkeypatch.setattr(recipe, "new_reward_model", recorded)
    config = RewardConfig(
        output_dir=str(tmp_path / "rm"),
        model=str(bundled_model),
        pairs_dir=str(tmp_path / "pairs"),
        train_scenes=4,
        eval_scenes=2,
        samples=3,
        probe_samples=3,
        epochs=1,
        batch_pairs=4,
        lora_rank=4,
        cpu=True,
        mixed_precision="bf16",
    )
    summary = train(config)
    assert summary["mixed_precision"] == "bf16" and summary["device"] == "cpu"
    assert mlp_outputs == {torch.bfloat16}  # training and the held-out scoring both ran under autocast
    saved = load_file(str(tmp_path / "rm" / "adapter_model.safetensors"))
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}


def test_mixed_precision_with_fsdp_is_refused_not_run_in_fp32():
    from types import SimpleNamespace

    from training.sharding import is_sharded

    assert is_sharded(SimpleNamespace(num_processes=2, mixed_precision="no"), "fsdp") is True
    assert is_sharded(SimpleNamespace(num_processes=2, mixed_precision="bf16"), "ddp") is False
    assert is_sharded(SimpleNamespace(num_processes=1, mixed_precision="bf16"), "fsdp") is False
    with pytest.raises(ValueError, match="--mixed_precision bf16 runs with --sharding ddp, not fsdp"):
        is_sharded(SimpleNamespace(num_processes=2, mixed_precision="bf16"), "fsdp")
