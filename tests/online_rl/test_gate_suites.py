"""The gate's suites on real-format data: POPE files with rendered images, an MMHal-Bench file with a fake judge
server, a COCO-style instances file, and a store with held-out pairs; exact scores by hand, each suite's metrics and
intervals in the gate record, the held-out slice, and one clear line for each kind of bad input."""

from __future__ import annotations

import io
import types

import pytest
from PIL import Image

from online_rl.gate import DEFAULT_SUITE, Gate, ScorerSuite
from online_rl.gate_suites import ChairSuite, FeedbackHoldoutSuite, MMHalSuite, PopeSuite, build_suites
from online_rl.holdout import held_out_pairs, implicit_reward_margins, is_held_out, pair_key
from online_rl.pairs import PreferencePair
from online_rl.schema import AdapterVersion, FeedbackEvent, GenerationRecord
from online_rl.store import open_store
from tests.fake_judge import FakeJudge
from tests.online_rl.store_helpers import image_message
from tests.real_data import QUESTIONS, Served, answerer, write_coco, write_mmhal, write_pope
from training.evaluation.mmhal import OpenAIJudge


@pytest.fixture
def store(tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as opened:
        yield opened


def add_pairs(store, count: int, start: int = 0) -> list[PreferencePair]:
    """`count` correction pairs on one image, each its own prompt; returns them as the trainer builds them."""
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), (40, 160, 40)).save(buffer, format="PNG")
    sha = store.put_image(buffer.getvalue())
    for index in range(start, start + count):
        store.add_generation(
            GenerationRecord(
                id=f"g{index}",
                alias="llava-rlhf",
                messages=image_message(sha, f"What is on the sofa? ({index})"),
                response="A dog and a cat.",
                user_id="u-1",
            )
        )
        store.add_feedback(FeedbackEvent(generation_id=f"g{index}", correction="A dog.", user_id="u-1"))
    from online_rl.holdout import all_pairs

    return all_pairs(store)


def register(store, path: str = "/nowhere") -> AdapterVersion:
    version = store.allocate_adapter_version()
    return store.register_adapter(
        AdapterVersion(version=version, name=f"policy-v{version}", path=path, algorithm="dpo")
    )


def test_the_held_out_slice_is_stable_and_about_its_share(store):
    pairs = add_pairs(store, 40)
    held = [p for p in pairs if is_held_out(p, 0.5)]
    assert 10 <= len(held) <= 30  # about half of 40
    again = held_out_pairs(store, 0.5)
    assert [pair_key(p) for p in again] == sorted(pair_key(p) for p in held)  # ordered by key, each once
    assert held_out_pairs(store, 0.5, max_pairs=3) == again[:3]  # the lowest keys
    padded = PreferencePair(held[0].messages, f" {held[0].chosen} ", held[0].rejected, "thumbs", None, None, ())
    assert pair_key(padded) == pair_key(held[0])  # the same texts are the same pair, whatever their source
    assert not [p for p in pairs if is_held_out(p, 0.0)] and all(is_held_out(p, 1.0) for p in pairs)


def test_the_holdout_suite_counts_a_zero_margin_as_half_and_the_base_model_is_at_chance(store):
    pairs = add_pairs(store, 3)
    adapter = register(store, "/adapters/policy-v1")
    asked = []

    def rewards(scored, path):
        asked.append((len(scored), path))
        return [0.3, -0.1, 0.0]

    suite = FeedbackHoldoutSuite(store, rewards, share=0.999999, beta=0.1)
    described = suite.scored_with()
    assert described["num_pairs"] == 3 and described["beta"] == 0.1
    candidate = suite.score("llava-rlhf@v1", adapter.name)
    assert asked == [(3, "/adapters/policy-v1")]
    assert candidate["reward_accuracy"] == (1 + 0 + 0.5) / 3 and candidate["reward_margin"] == pytest.approx(0.2 / 3)
    keys = sorted(pair_key(p) for p in pairs)
    assert candidate["per_scene"]["scenes"] == [key[:16] for key in keys]
    assert candidate["per_scene"]["reward_accuracy"] == [[1.0, 1], [0.0, 1], [0.5, 1]]
    base = suite.score("base", "base")  # its own reference: never computed, every margin 0
    assert asked == [(3, "/adapters/policy-v1")] and base["reward_accuracy"] == 0.5
    add_pairs(store, 4, start=3)  # new feedback: a new slice, so cached scores of the old one are not used
    assert suite.scored_with()["pairs"] != described["pairs"]


def test_implicit_reward_margins_are_dpos_and_dense_dpos_and_the_base_comes_back_untouched(tmp_path, store):
    import torch
    from peft import get_peft_model

    from online_rl.adapters import publish_adapter
    from online_rl.dpo import PreferenceLossConfig, preference_loss
    from online_rl.preference_batch import PreferenceEncoder
    from training.lora import language_model_lora
    from training.tiny_llava import TinyLlavaSpec, build_untrained, load_checkpoint

    base_dir = build_untrained(tmp_path / "base", TinyLlavaSpec())
    pairs = add_pairs(store, 3)
    model, processor = load_checkpoint(base_dir)
    torch.manual_seed(0)
    policy = get_peft_model(model, language_model_lora(rank=2))
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:  # a fresh LoRA changes nothing; this one does
            torch.nn.init.normal_(parameter, std=0.5)
    adapter = publish_adapter(store, policy, tmp_path / "adapters", str(base_dir), "dpo")
    fresh = publish_adapter(
        store,
        get_peft_model(load_checkpoint(base_dir)[0], language_model_lora(2)),
        tmp_path / "adapters",
        str(base_dir),
        "dpo",
    )

    base, processor = load_checkpoint(base_dir)
    batch = PreferenceEncoder(processor).collate(pairs[:1], store.get_image)
    before = base(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
    margins, base = implicit_reward_margins(
        base, processor, pairs, store.get_image, adapter.path, beta=0.1, batch_pairs=2
    )
    assert len(margins) == 3 and all(m != 0 for m in margins)
    after = base(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
    assert torch.equal(before, after) and not hasattr(base, "peft_config")  # the adapter is off the base again
    # each margin is the reward margin DPO's own loss reports for that pair alone
    from peft import PeftModel

    scored = PeftModel.from_pretrained(base, adapter.path).eval()
    for pair, margin in zip(pairs, margins, strict=True):
        one = PreferenceEncoder(processor).collate([pair], store.get_image)
        with torch.no_grad():
            _, metrics = preference_loss(scored, one, PreferenceLossConfig(beta=0.1))
        assert margin == pytest.approx(metrics["reward_margin"], abs=1e-5)
    base = scored.unload()
    # Dense DPO's score (corrected tokens weigh gamma, normalised), as a dense-dpo trainer trains
    dense, base = implicit_reward_margins(
        base, processor, pairs, store.get_image, adapter.path, beta=0.1, dense_gamma=5.0, normalize=True
    )
    scored = PeftModel.from_pretrained(base, adapter.path).eval()
    for pair, margin in zip(pairs, dense, strict=True):
        one = PreferenceEncoder(processor, dense_gamma=5.0).collate([pair], store.get_image)
        with torch.no_grad():
            _, metrics = preference_loss(scored, one, PreferenceLossConfig(beta=0.1, normalize=True))
        assert margin == pytest.approx(metrics["reward_margin"], abs=1e-5) and margin != pytest.approx(margins[0])
    base = scored.unload()
    zero, _ = implicit_reward_margins(base, processor, pairs, store.get_image, fresh.path, beta=0.1)
    assert zero == [0.0, 0.0, 0.0]  # LoRA B starts at zero: the policy is its reference


def test_a_gate_on_pope_mmhal_chair_and_the_holdout_records_each_suites_metrics_and_intervals(tmp_path, store):
    pope_files, pope_images = write_pope(tmp_path, QUESTIONS)
    mmhal_file, mmhal_images = write_mmhal(tmp_path)
    instances, _, coco_images = write_coco(tmp_path)
    server = FakeJudge(
        lambda prompt, _: "Rating: 5" if "Evaluate\ngood answer" in prompt else "Hallucinates.\nRating: 1"
    )
    judge = OpenAIJudge("http://judge.test/v1", "judge-model", http_client=server.client())
    add_pairs(store, 6)
    adapter = register(store)
    suites = [
        PopeSuite(pope_files, pope_images, answerer),
        MMHalSuite(mmhal_file, mmhal_images, answerer, judge),
        ChairSuite([instances], coco_images, answerer),
        FeedbackHoldoutSuite(store, lambda pairs, path: [1.0] * len(pairs), share=0.999999),
    ]
    gate = Gate(None, tmp_path / "scores", {}, resamples=500, suites=suites)
    result = gate.compare(("llava-rlhf@v1", adapter.name), ("base", "base"))
    assert result.passed, result.reasons
    record = result.record("base")
    differences = record["differences"]
    assert set(differences) == {
        "pope/random_accuracy",
        "pope/adversarial_accuracy",
        "pope/f1",
        "mmhal/average_score",
        "mmhal/hallucination_rate",
        "chair/chair_s",
        "chair/object_recall",
        "feedback-holdout/reward_accuracy",
    }
    # POPE: the baseline says yes to everything: random 2/4, adversarial 1/3, F1 6/10 (TP 3, FP 4)
    assert differences["pope/random_accuracy"]["baseline"] == 0.5
    assert differences["pope/random_accuracy"]["candidate"] == 0.75
    assert differences["pope/adversarial_accuracy"]["baseline"] == pytest.approx(1 / 3, abs=1e-6)
    assert differences["pope/f1"]["baseline"] == 0.6 and differences["pope/f1"]["candidate"] == pytest.approx(2 / 3)
    # MMHal: every good answer is rated 5, every bad one 1
    assert (differences["mmhal/average_score"]["candidate"], differences["mmhal/average_score"]["baseline"]) == (5, 1)
    assert differences["mmhal/hallucination_rate"]["difference"] == -1.0
    assert all(body["model"] == "judge-model" for body in server.requests) and len(server.requests) == 6
    # CHAIR: "A cat and a dog." everywhere against the three descriptions
    assert differences["chair/chair_s"]["baseline"] == 1.0
    assert differences["chair/chair_s"]["candidate"] == pytest.approx(1 / 3, abs=1e-6)
    assert differences["chair/object_recall"]["baseline"] == pytest.approx(1 / 6, abs=1e-6)
    # the held-out pairs: every margin positive against the base model's ties
    assert differences["feedback-holdout/reward_accuracy"]["difference"] == 0.5
    for difference in differences.values():
        assert difference["low"] <= difference["difference"] <= difference["high"]
    suites_record = record["suites"]
    assert suites_record["pope"]["metrics"]["adversarial_yes_ratio"] == pytest.approx(2 / 3, abs=1e-6)
    assert suites_record["chair"]["metrics"]["chair_i"] == pytest.approx(1 / 7, abs=1e-6)
    assert suites_record["feedback-holdout"]["metrics"]["num_pairs"] == 6
    assert suites_record["mmhal"]["passed"] and result.candidate["pope/random_accuracy"] == 0.75
    # the baseline's scores are cached per suite: a second gate asks only the candidate
    server.requests.clear()
    again = gate.compare(("llava-rlhf@v1", adapter.name), ("base", "base"))
    assert again.baseline_cached and len(server.requests) == 0  # the candidate's were cached too


def test_a_worse_candidate_is_rejected_with_the_suites_reasons(tmp_path, store):
    add_pairs(store, 30)
    adapter = register(store)
    suite = FeedbackHoldoutSuite(store, lambda pairs, path: [-1.0] * len(pairs), share=0.999999)
    result = Gate(None, tmp_path / "scores", {}, suites=[suite]).compare(("v1", adapter.name), ("base", "base"))
    assert not result.passed
    assert result.reasons == [
        "held-out feedback ranking accuracy fell 0.500 -> 0.000 (95% interval of the difference [-0.500, -0.500])"
    ]


def settings(**values) -> types.SimpleNamespace:
    defaults = {
        "gate_suites": ("pope",),
        "gate_pope_files": (),
        "gate_pope_image_dir": None,
        "gate_pope_images": 0,
        "gate_pope_question_suffix": "",
        "gate_pope_margin": 0.0,
    }
    return types.SimpleNamespace(**(defaults | values))


def test_bad_suite_input_is_one_clear_line(tmp_path, store):
    shapes = ScorerSuite(DEFAULT_SUITE, lambda name: {}, {"base_model": "m"})
    with pytest.raises(ValueError, match=r"^the pope gate suite needs --gate-pope-files and --gate-pope-image-dir$"):
        build_suites(settings(), store, shapes, answerer, lambda p, a: [])
    files, image_dir = write_pope(tmp_path, QUESTIONS)
    (image_dir / "COCO_val2014_000000000003.jpg").unlink()
    with pytest.raises(ValueError, match=r"coco_pope_adversarial\.json: line 3: image COCO_val2014_000000000003\.jpg"):
        build_suites(
            settings(gate_pope_files=tuple(files), gate_pope_image_dir=image_dir), store, shapes, answerer, None
        )
    mmhal_file, mmhal_images = write_mmhal(tmp_path)
    mmhal_file.write_text(mmhal_file.read_text().replace('"image_src"', '"image_url"'))
    with pytest.raises(ValueError, match=r"response_template\.json: entry 0 lacks the key\(s\) image_src$"):
        MMHalSuite(mmhal_file, mmhal_images, answerer, OpenAIJudge("http://127.0.0.1:9/v1", "judge-model"))


def test_an_mmhal_judge_that_is_down_fails_the_gate_in_one_line_before_any_answer(tmp_path, store):
    mmhal_file, mmhal_images = write_mmhal(tmp_path)
    asked = []

    def counting(model_name):
        asked.append(model_name)
        return Served(True)

    suite = MMHalSuite(mmhal_file, mmhal_images, counting, OpenAIJudge("http://127.0.0.1:9/v1", "judge-model"))
    with pytest.raises(
        ConnectionError, match=r"^the judge is not reachable: cannot reach endpoint http://127\.0\.0\.1:9"
    ):
        Gate(None, tmp_path / "scores", {}, suites=[suite]).compare(("v1", "policy-v1"), ("base", "base"))
    assert asked == []
