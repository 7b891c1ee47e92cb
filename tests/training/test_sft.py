"""The SFT recipe: labels cover the answers only, a step trains every parameter, a run saves a usable checkpoint."""

import json

import pytest
import torch

from training.sft import (
    IGNORE_INDEX,
    ConversationCollator,
    SFTConfig,
    answer_loss,
    patch_cells,
    prepare_model,
    pretrain_vision_tower,
    scene_graph_targets,
    train,
)
from training.shapes_world import Scene, SceneObject, ShapesWorld
from training.tiny_llava import TinyLlavaSpec, load_checkpoint


def _tiny_setup():
    world = ShapesWorld()
    model, processor = prepare_model(SFTConfig(), world)
    return world, model, processor


def test_labels_cover_exactly_the_answers():
    world, _, processor = _tiny_setup()
    collator = ConversationCollator(world, processor, max_turns=3)
    scene = world.scene("train", 5)
    messages = collator.messages(scene)
    ids, labels, weights = collator.encode(messages)
    supervised = processor.tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert supervised == "".join(f" {answer}</s>" for answer in answers)
    # Every answer weighs 1 in total, spread evenly over its tokens; unsupervised tokens weigh 0.
    assert sum(weights) == pytest.approx(len(answers))
    assert all((w > 0) == (label != IGNORE_INDEX) for w, label in zip(weights, labels))
    first_answer = processor.tokenizer(f" {answers[0]}</s>", add_special_tokens=False)["input_ids"]
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert weights[first : first + len(first_answer)] == pytest.approx([1 / len(first_answer)] * len(first_answer))
    assert ids.count(processor.tokenizer.convert_tokens_to_ids("<image>")) == TinyLlavaSpec().image_tokens
    assert messages[0]["content"][0] == {"type": "image"}
    assert all(part["type"] == "text" for m in messages[1:] if m["role"] == "user" for part in m["content"])


def test_batch_is_right_padded_and_masked():
    world, _, processor = _tiny_setup()
    batch = ConversationCollator(world, processor, max_turns=2)([world.scene("train", i) for i in range(4)])
    pad = processor.tokenizer.pad_token_id
    assert batch["pixel_values"].shape == (4, 3, 96, 96)
    padded = batch["attention_mask"] == 0
    assert bool((batch["input_ids"][padded] == pad).all()) and bool((batch["labels"][padded] == IGNORE_INDEX).all())
    assert bool((batch["loss_weights"][padded] == 0).all())


def test_token_share_mixes_in_the_plain_per_token_loss():
    world, model, processor = _tiny_setup()
    batch = ConversationCollator(world, processor, max_turns=5)([world.scene("train", i) for i in range(2)])
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "loss_weights")}).logits
        targets = batch["labels"][:, 1:]
        per_token = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX
        )
        answer_weighted = answer_loss(model, batch)
        assert float(answer_loss(model, batch, token_share=1.0)) == pytest.approx(float(per_token), rel=1e-5)
        mixed = answer_loss(model, batch, token_share=0.25)
    assert float(mixed) == pytest.approx(0.75 * float(answer_weighted) + 0.25 * float(per_token), rel=1e-5)
    assert float(answer_weighted) != pytest.approx(float(per_token), abs=1e-5)  # the weighting does change the loss


def test_one_step_changes_every_trainable_parameter():
    world, model, processor = _tiny_setup()
    batch = ConversationCollator(world, processor, max_turns=5)([world.scene("train", i) for i in range(8)])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    answer_loss(model, batch).backward()
    optimizer.step()
    unchanged = [name for name, p in model.named_parameters() if torch.equal(before[name], p.detach())]
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert unchanged == frozen == ["model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"]


def test_short_run_writes_metrics_and_a_loadable_checkpoint(tmp_path):
    config = SFTConfig(
        output_dir=str(tmp_path / "out"),
        steps=3,
        batch_size=4,
        eval_every=2,
        val_scenes=4,
        vision_pretrain_steps=2,
        grounding_steps=1,
        polish_steps=2,
        describe_steps=2,
    )
    summary = train(config)
    assert summary["steps"] == 3 and summary["vision_pretrain_steps"] == 2 and summary["grounding_steps"] == 1
    assert summary["polish_steps"] == 2 and summary["describe_steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in records] == [
        ("vision", 1),
        ("vision", 2),
        ("grounding", 1),
        ("sft", 1),
        ("sft", 2),
        ("sft", 3),
        ("polish", 1),
        ("polish", 2),
        ("describe", 1),
        ("describe", 2),
    ]
    assert records[-1]["lr"] == 0.0 and "val_loss" in records[-1]  # the last stage decays to zero and validates
    assert "patch_shape_accuracy" in records[0]
    assert "val_loss" in records[2]  # a stage's last step is always validated
    sft = records[3:6]
    assert "val_loss" in sft[1] and "val_loss" in sft[2] and "val_loss" not in sft[0]
    assert all(r["loss"] > 0 for r in records)
    load_checkpoint(tmp_path / "out")  # the saved checkpoint loads
    assert json.loads((tmp_path / "out" / "training_summary.json").read_text())["steps"] == 3


def test_lora_option_trains_the_adapter_and_freezes_the_rest():
    world = ShapesWorld()
    model, processor = prepare_model(SFTConfig(lora_rank=4), world)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "multi_modal_projector" in name for name in trainable)
    assert any("language_model" in name and "lora_A" in name for name in trainable)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = ConversationCollator(world, processor, max_turns=3)([world.scene("train", i) for i in range(4)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    answer_loss(model, batch).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        # LoRA B starts at zero, so after one step every trainable tensor has moved, and nothing frozen has.
        assert changed == (name in trainable), name


def test_scene_graph_targets_by_hand():
    scene = Scene("test", 0, (SceneObject("star", "blue", "large", 0, 2), SceneObject("circle", "red", "small", 2, 0)))
    targets = scene_graph_targets([scene])
    # cells are row-major; 0 means empty; classes are 1 + the index in SHAPES / COLORS / SIZES
    assert targets["shape"].tolist() == [[0, 0, 4, 0, 0, 0, 1, 0, 0]]
    assert targets["color"].tolist() == [[0, 0, 3, 0, 0, 0, 1, 0, 0]]
    assert targets["size"].tolist() == [[0, 0, 2, 0, 0, 0, 1, 0, 0]]


def test_patch_cells_maps_a_6x6_patch_grid_onto_the_3x3_scene_grid():
    assert patch_cells(6).view(6, 6).tolist() == [
        [0, 0, 1, 1, 2, 2],
        [0, 0, 1, 1, 2, 2],
        [3, 3, 4, 4, 5, 5],
        [3, 3, 4, 4, 5, 5],
        [6, 6, 7, 7, 8, 8],
        [6, 6, 7, 7, 8, 8],
    ]
    assert patch_cells(3).tolist() == list(range(9))


def test_vision_stage_trains_the_tower_only():
    world = ShapesWorld()
    config = SFTConfig(vision_pretrain_steps=2, batch_size=4, warmup_steps=1)
    model, processor = prepare_model(config, world)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    records = pretrain_vision_tower(model, processor, world, config)
    assert [r["step"] for r in records] == [1, 2]
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}
    tower = {name for name, p in model.named_parameters() if ".vision_tower." in name and p.requires_grad}
    assert changed == tower


def test_sft_keeps_the_frozen_vision_tower(tmp_path):
    config = SFTConfig(
        output_dir=str(tmp_path / "out"),
        steps=2,
        batch_size=4,
        val_scenes=4,
        vision_pretrain_steps=0,
        grounding_steps=1,
        polish_steps=1,
        describe_steps=1,
    )  # every stage after the tower's, briefly
    initial, _ = prepare_model(config, ShapesWorld())  # same seed, same initial weights as the run
    train(config)
    trained, _ = load_checkpoint(tmp_path / "out")
    initial_tower, trained_tower = initial.model.vision_tower.state_dict(), trained.model.vision_tower.state_dict()
    assert all(torch.equal(initial_tower[k], trained_tower[k]) for k in initial_tower)
    assert not torch.equal(
        initial.model.multi_modal_projector.linear_1.weight, trained.model.multi_modal_projector.linear_1.weight
    )


def test_chat_share_makes_that_share_of_the_conversations_long_chats():
    world, _, processor = _tiny_setup()
    scenes = list(world.scenes("train", 200))
    plain = ConversationCollator(world, processor, max_turns=8)
    chats = ConversationCollator(world, processor, max_turns=8, chat_share=0.5, chat_turns=12)
    long_ones = 0
    for scene in scenes:
        messages = chats.messages(scene)
        questions = [m["content"][-1]["text"] for m in messages[::2]]
        if len(questions) > 8:  # a chat: up to 12 turns, the description among them (SFT's have at most 8)
            long_ones += 1
            assert questions.count("Describe the image in detail.") == 1 and len(questions) <= 12
        else:
            assert messages == plain.messages(scene)  # the rest exactly as in SFT
    assert 80 <= long_ones <= 120
    assert chats.messages(scenes[0]) == chats.messages(scenes[0])  # drawn per scene, the same every time


def test_chat_stage_continues_a_checkpoint_alone(tmp_path):
    start = SFTConfig(
        output_dir=str(tmp_path / "start"),
        steps=1,
        batch_size=4,
        val_scenes=4,
        vision_pretrain_steps=0,
        grounding_steps=0,
        polish_steps=0,
        describe_steps=0,
    )
    train(start)
    config = SFTConfig(
        output_dir=str(tmp_path / "chat"), init=start.output_dir, steps=0, chat_steps=2, batch_size=4, val_scenes=4
    )
    summary = train(config)
    assert (summary["steps"], summary["chat_steps"], summary["polish_steps"], summary["describe_steps"]) == (0, 2, 0, 0)
    records = [json.loads(line) for line in (tmp_path / "chat" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in records] == [("chat", 1), ("chat", 2)]
    assert records[-1]["lr"] == 0.0 and "val_loss" in records[-1]
    before, _ = load_checkpoint(tmp_path / "start")
    after, _ = load_checkpoint(tmp_path / "chat")
    assert not torch.equal(before.lm_head.weight, after.lm_head.weight)
    assert torch.equal(
        before.model.vision_tower.state_dict()["embeddings.patch_embedding.weight"],
        after.model.vision_tower.state_dict()["embeddings.patch_embedding.weight"],
    )


def test_read_share_puts_the_scene_facts_before_the_first_question_and_answers_them_truly():
    world, _, processor = _tiny_setup()
    scenes = list(world.scenes("train", 200))
    plain = ConversationCollator(world, processor, max_turns=8)
    readings = ConversationCollator(world, processor, max_turns=8, read_share=0.5, read_blank_share=0.5)
    modes = [readings.reading(scene) for scene in scenes]
    assert 80 <= sum(m is not None for m in modes) <= 120 and 30 <= modes.count("blank") <= 70
    for scene, mode in zip(scenes, modes):
        messages = readings.messages(scene)
        if mode is None:
            assert messages == plain.messages(scene)  # the rest exactly as in SFT
            continue
        first = messages[0]["content"]
        assert [part["type"] for part in first] == ["image", "text", "text"]
        facts = first[1]["text"].splitlines()
        assert facts[0] == "Facts:" and sorted(facts[1:]) == sorted(f"- {fact}" for fact in world.facts(scene))
        assert all(len(m["content"]) == 1 for m in messages[2::2])  # no facts and no image after the first turn
        for question, answer in zip(messages[::2], messages[1::2]):
            text = question["content"][-1]["text"]
            if text == "Describe the image in detail.":
                assert answer["content"] == world.description(scene, noisy=False)
            if text.startswith("Is there a "):
                shape = text.removeprefix("Is there a ").removesuffix(" in the image?")
                assert answer["content"] == ("Yes." if shape in scene.shapes else "No.")
    batch_scenes = scenes[:8]
    batch = readings(batch_scenes)
    for row, scene in enumerate(batch_scenes):
        shown = world.render(scene, blank=readings.reading(scene) == "blank")
        expected = processor.image_processor([shown], return_tensors="pt")["pixel_values"][0]
        assert torch.equal(batch["pixel_values"][row], expected)
    assert {readings.reading(s) for s in batch_scenes} >= {"blank"}  # the batch holds a blank image to check


def test_read_description_share_sets_how_many_reading_conversations_are_a_description():
    world, _, processor = _tiny_setup()
    scenes = list(world.scenes("train", 300))

    def descriptions(share: float) -> tuple[int, int]:
        readings = ConversationCollator(world, processor, max_turns=8, read_share=1.0, read_description_share=share)
        conversations = [readings.messages(scene) for scene in scenes]
        described = [m for m in conversations if m[0]["content"][-1]["text"] == "Describe the image in detail."]
        assert all(len(m) == 2 for m in described)  # a description is the whole conversation
        return len(described), len(conversations)

    assert descriptions(0.0) == (0, 300) and descriptions(1.0) == (300, 300)
    assert 120 <= descriptions(0.5)[0] <= 180 and 70 <= descriptions(1 / 3)[0] <= 130


def test_read_quiz_share_makes_reading_conversations_attribute_quizzes_with_the_facts_first():
    world, _, processor = _tiny_setup()
    scenes = list(world.scenes("train", 200))
    quizzes = ConversationCollator(world, processor, max_turns=8, read_share=1.0, read_quiz_share=0.5)
    quizzed = 0
    for scene in scenes:
        messages = quizzes.messages(scene)
        asked = [(q["content"][-1]["text"], a["content"]) for q, a in zip(messages[::2], messages[1::2])]
        quiz = [(item.question, item.answer) for item in world.quiz(scene, 8)]
        if asked == quiz:
            quizzed += 1
            assert messages[0]["content"][1]["text"].startswith("Facts:\n")
    assert 70 <= quizzed <= 130
    none = ConversationCollator(world, processor, max_turns=8, read_share=1.0)
    assert not any(
        [m["content"] for m in none.messages(s)[1::2]] == [i.answer for i in world.quiz(s, 8)] for s in scenes
    )


def test_read_stage_runs_after_the_chat_stage(tmp_path):
    start = SFTConfig(
        output_dir=str(tmp_path / "start"),
        steps=1,
        batch_size=4,
        val_scenes=4,
        vision_pretrain_steps=0,
        grounding_steps=0,
        polish_steps=0,
        describe_steps=0,
    )
    train(start)
    config = SFTConfig(
        output_dir=str(tmp_path / "plus"),
        init=start.output_dir,
        steps=0,
        chat_steps=1,
        read_steps=2,
        batch_size=4,
        val_scenes=4,
    )
    summary = train(config)
    assert (summary["steps"], summary["chat_steps"], summary["read_steps"]) == (0, 1, 2)
    records = [json.loads(line) for line in (tmp_path / "plus" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in records] == [("chat", 1), ("read", 1), ("read", 2)]
    before, _ = load_checkpoint(tmp_path / "start")
    after, _ = load_checkpoint(tmp_path / "plus")
    assert not torch.equal(before.lm_head.weight, after.lm_head.weight)
