"""The fact-augmented reward model prompt: facts as shuffled bullets, the criteria, the score primer at the end."""

import random

from transformers import AutoTokenizer

from training.reward_prompt import RATING_CRITERIA, SCORE_PRIMER, rating_turn, reward_model_text

FACTS = ["There are two objects in the image.", "There is a small red star at the top left.",
         "There is a large blue cross in the center."]  # fmt: skip


def bullets(turn: str) -> list[str]:
    return [line[2:] for line in turn.splitlines() if line.startswith("- ")]


def test_every_fact_is_one_bullet_and_the_order_changes():
    orders = set()
    for seed in range(20):
        turn = rating_turn(FACTS, random.Random(seed))
        facts = bullets(turn)[: len(FACTS)]
        assert sorted(facts) == sorted(FACTS)
        assert bullets(turn)[len(FACTS) :] == list(RATING_CRITERIA)
        assert "fully supported by these facts" in turn
        orders.add(tuple(facts))
    assert len(orders) > 1


def test_without_facts_only_the_criteria_remain():
    turn = rating_turn(FACTS, random.Random(0), with_facts=False)
    assert bullets(turn) == list(RATING_CRITERIA) and "facts" not in turn


def test_the_text_is_the_conversation_then_the_rating_turn_then_the_primer():
    tokenizer = AutoTokenizer.from_pretrained("models/shapes-llava")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    text = reward_model_text(tokenizer, messages, " There is a red star. ", FACTS, random.Random(0))
    assert text.endswith("ASSISTANT: " + SCORE_PRIMER)
    assert text.count("<image>") == 1
    assert text.index("Describe the image.") < text.index("There is a red star.") < text.index(FACTS[1])
