"""The fact-augmented reward model prompt: facts as shuffled bullets, the criteria in one line, the score primer at the
end, and short enough for the tiny backbone."""

import random

import pytest
from transformers import AutoTokenizer, LlavaProcessor

from training.reward_model import RewardEncoder
from training.reward_prompt import (
    SCORE_PRIMER,
    criteria_line,
    rating_turn,
    reward_model_text,
    with_facts_before_question,
)
from training.shapes_world import ShapesWorld

FACTS = [
    "There are two objects in the image.",
    "There is a small red star at the top left.",
    "There is a large blue cross in the center.",
]


def bullets(turn: str) -> list[str]:
    return [line[2:] for line in turn.splitlines() if line.startswith("- ")]


def test_every_fact_is_one_bullet_and_the_order_changes():
    orders = set()
    for seed in range(20):
        turn = rating_turn(FACTS, random.Random(seed))
        facts = bullets(turn)
        assert sorted(facts) == sorted(FACTS)
        assert turn.splitlines()[:2] == ["Rate your last response.", "It must agree with these facts:"]
        assert turn.splitlines()[-1] == criteria_line() == "A good one is accurate, helpful, natural and concise."
        orders.add(tuple(facts))
    assert len(orders) > 1


def test_without_facts_only_the_criteria_remain():
    turn = rating_turn(FACTS, random.Random(0), with_facts=False)
    assert turn == "Rate your last response.\n" + criteria_line()


def test_the_text_is_the_conversation_then_the_rating_turn_then_the_primer():
    tokenizer = AutoTokenizer.from_pretrained("models/shapes-llava")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    text = reward_model_text(tokenizer, messages, " There is a red star. ", FACTS, random.Random(0))
    assert text.endswith("ASSISTANT: " + SCORE_PRIMER)
    assert text.count("<image>") == 1
    assert text.index("Describe the image.") < text.index("There is a red star.") < text.index(FACTS[1])


def test_before_answer_puts_the_facts_between_the_image_and_the_question():
    tokenizer = AutoTokenizer.from_pretrained("models/shapes-llava")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    orders = set()
    for seed in range(10):
        text = reward_model_text(
            tokenizer, messages, "There is a red star.", FACTS, random.Random(seed), facts_placement="before_answer"
        )
        positions = [text.index(fact) for fact in FACTS]
        assert text.index("<image>") < text.index("Facts:") < min(positions)
        assert max(positions) < text.index("Describe the image.") < text.index("There is a red star.")
        assert text.count(FACTS[1]) == 1 and "It must agree with the facts above." in text
        assert text.endswith("ASSISTANT: " + SCORE_PRIMER)
        orders.add(tuple(sorted(range(len(FACTS)), key=positions.__getitem__)))
    assert len(orders) > 1
    assert messages[0]["content"][1]["text"] == "Describe the image."  # the caller's conversation is not changed


def test_before_answer_with_a_text_only_turn_and_without_facts():
    tokenizer = AutoTokenizer.from_pretrained("models/shapes-llava")
    messages = [{"role": "user", "content": "Is there a star?"}]
    text = reward_model_text(tokenizer, messages, "Yes.", FACTS, random.Random(0), facts_placement="before_answer")
    assert text.index("Facts:") < text.index("Is there a star?") < text.index("Yes.")
    plain = reward_model_text(
        tokenizer, messages, "Yes.", FACTS, random.Random(0), with_facts=False, facts_placement="before_answer"
    )
    assert "facts" not in plain.lower() and plain == reward_model_text(
        tokenizer, messages, "Yes.", FACTS, random.Random(0), with_facts=False
    )


def test_facts_go_into_the_user_turn_asked_for_and_no_other():
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a star?"}]},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "What color is it?"},
    ]
    first = with_facts_before_question(conversation, FACTS, random.Random(0), user_turn=0)
    assert [part["type"] for part in first[0]["content"]] == ["image", "text", "text"]
    block = first[0]["content"][1]["text"]
    assert block.startswith("Facts:\n") and sorted(bullets(block)) == sorted(FACTS)
    assert first[1:] == conversation[1:]
    last = with_facts_before_question(conversation, FACTS, random.Random(0))
    assert last[:2] == conversation[:2] and last[2]["content"] == block + "What color is it?"


def test_an_unknown_placement_is_refused():
    tokenizer = AutoTokenizer.from_pretrained("models/shapes-llava")
    with pytest.raises(ValueError, match="before_answer, rating_turn"):
        reward_model_text(
            tokenizer,
            [{"role": "user", "content": "Q?"}],
            "A.",
            FACTS,
            random.Random(0),
            facts_placement="after_everything",
        )


def test_a_presence_probe_with_its_facts_stays_within_the_context_the_backbone_handles():
    """The reward head reads the answer from the last token; with the version-1 wording a fact prompt about a
    presence probe ran to ~296 tokens and the fact reward model could not learn such pairs (reward_prompt.py)."""
    world, processor = ShapesWorld(), LlavaProcessor.from_pretrained("models/shapes-llava")
    scene = max(world.scenes("validation", 50), key=lambda s: len(s.objects))  # the most facts
    question = {"type": "text", "text": "Is there a star in the image?"}
    messages = [{"role": "user", "content": [{"type": "image"}, question]}]
    fact_ids = RewardEncoder(processor, with_facts=True).encode(messages, "No.", world.facts(scene), random.Random(0))
    plain_ids = RewardEncoder(processor, with_facts=False).encode(messages, "No.", world.facts(scene), random.Random(0))
    assert len(plain_ids) < len(fact_ids) <= 230
