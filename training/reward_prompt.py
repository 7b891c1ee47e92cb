"""The fact-augmented reward model's input (LLaVA-RLHF, shared/PAPERS.md §1): the conversation being rated, then one
more user turn asking for a rating, which lists the image's facts, then an assistant turn primed with "The quality
score of my last response is". The reward head reads the hidden state of that primer's last token.

The facts come as one bullet each, shuffled every time the prompt is built, so the reward model cannot learn their
order; `with_facts=False` builds the same turn without them, the plain reward model the paper compares against (and
the one that is easier to hack).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

RATING_CRITERIA = (
    "Accurate: it describes only what is in the image, and names no object, color, count or place that is not there.",
    "Helpful: it answers the question that was asked.",
    "Natural: it reads as fluent, well-formed language.",
    "Concise: it says what is needed and no more.",
)
SCORE_PRIMER = "The quality score of my last response is"


def rating_turn(facts: Sequence[str], rng: random.Random, with_facts: bool = True) -> str:
    """The extra user turn: with facts, the statement that the answer must be fully supported by them, one shuffled
    bullet per fact; then the criteria."""
    lines = ["Please rate your last response."]
    if with_facts and facts:
        shuffled = list(facts)
        rng.shuffle(shuffled)
        lines += ["The response must be fully supported by these facts about the image:"]
        lines += [f"- {fact}" for fact in shuffled]
    lines += ["A good response is:"] + [f"- {criterion}" for criterion in RATING_CRITERIA]
    return "\n".join(lines)


def reward_model_text(tokenizer, messages: Sequence[dict], response: str, facts: Sequence[str], rng: random.Random,
                      with_facts: bool = True) -> str:  # fmt: skip
    """The full text the reward model scores, through the model's own chat template (so image placeholders land
    where the processor expects them); it ends with the score primer."""
    conversation = [
        *messages,
        {"role": "assistant", "content": response.strip()},
        {"role": "user", "content": [{"type": "text", "text": rating_turn(facts, rng, with_facts)}]},
    ]
    prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return prompt + (" " if not prompt.endswith((" ", "\n")) else "") + SCORE_PRIMER
