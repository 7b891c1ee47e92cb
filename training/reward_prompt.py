"""The fact-augmented reward model's input (LLaVA-RLHF, shared/PAPERS.md §1): the conversation being rated, then one
more user turn asking for a rating, which lists the image's facts, then an assistant turn primed with "The quality
score of my last response is". The reward head reads the hidden state of that primer's last token.

The facts come as one bullet each, shuffled every time the prompt is built, so the reward model cannot learn their
order; `with_facts=False` builds the same turn without them, the plain reward model the paper compares against (and
the one that is easier to hack).

Where the facts go (`facts_placement`):
- "rating_turn", the paper's and the default: in the rating turn, after the answer;
- "before_answer": in the question's user turn, after the image, and the rating turn refers to them. The idea was
  that a causal model reading the answer after the facts could check each claim where it stands. Measured on the
  same 1,643 pairs, it does worse: 0.885 held-out accuracy against 0.911 in the rating turn (0.877 plain;
  `training/experiments/fact_rlhf.py`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

# Short on purpose: the whole prompt (image tokens, question, answer, facts, this turn) should stay near the lengths
# the backbone saw in SFT, conversations of ~75 tokens (at most ~150; 512 positions in all). With the first, longer
# wording a fact prompt ran to 400-510 tokens and the reward head read states at positions the model had hardly been
# trained on: 0.826 held-out accuracy with the facts before the answer; this wording (~310 tokens) gives 0.885.
RATING_CRITERIA = (
    "Accurate: nothing that is not in the image.",
    "Helpful: answers the question.",
    "Natural: fluent.",
    "Concise: no more than needed.",
)
SCORE_PRIMER = "The quality score of my last response is"
FACT_PLACEMENTS = ("before_answer", "rating_turn")
DEFAULT_FACT_PLACEMENT = "rating_turn"  # the paper's, and the better one here


def fact_bullets(facts: Sequence[str], rng: random.Random) -> list[str]:
    shuffled = list(facts)
    rng.shuffle(shuffled)
    return [f"- {fact}" for fact in shuffled]


def rating_turn(facts: Sequence[str], rng: random.Random, with_facts: bool = True) -> str:
    """The extra user turn: with facts, the statement that the answer must be fully supported by them, one shuffled
    bullet per fact; then the criteria."""
    lines = ["Please rate your last response."]
    if with_facts and facts:
        lines += ["It must be fully supported by these facts:", *fact_bullets(facts, rng)]
    lines += ["A good response is:"] + [f"- {criterion}" for criterion in RATING_CRITERIA]
    return "\n".join(lines)


def with_facts_before_question(messages: Sequence[dict], facts: Sequence[str], rng: random.Random) -> list[dict]:
    """The conversation with the facts as a text part of its last user turn, after the image, before the question."""
    block = "\n".join(["Facts:", *fact_bullets(facts, rng)]) + "\n"
    conversation = [dict(message) for message in messages]
    last_user = max(i for i, message in enumerate(conversation) if message["role"] == "user")
    content = conversation[last_user]["content"]
    if isinstance(content, str):
        conversation[last_user]["content"] = block + content
    else:
        images = [part for part in content if part.get("type") != "text"]
        texts = [part for part in content if part.get("type") == "text"]
        conversation[last_user]["content"] = [*images, {"type": "text", "text": block}, *texts]
    return conversation


def reward_model_text(tokenizer, messages: Sequence[dict], response: str, facts: Sequence[str], rng: random.Random,
                      with_facts: bool = True, facts_placement: str = DEFAULT_FACT_PLACEMENT) -> str:  # fmt: skip
    """The full text the reward model scores, through the model's own chat template (so image placeholders land
    where the processor expects them); it ends with the score primer."""
    if facts_placement not in FACT_PLACEMENTS:
        raise ValueError(f"facts_placement must be one of {', '.join(FACT_PLACEMENTS)}, not {facts_placement!r}")
    if with_facts and facts and facts_placement == "before_answer":
        rating = "\n".join(["Please rate your last response.", "It must be fully supported by the facts above.",
                             "A good response is:", *(f"- {criterion}" for criterion in RATING_CRITERIA)])  # fmt: skip
        messages = with_facts_before_question(messages, facts, rng)
    else:
        rating = rating_turn(facts, rng, with_facts)
    conversation = [
        *messages,
        {"role": "assistant", "content": response.strip()},
        {"role": "user", "content": [{"type": "text", "text": rating}]},
    ]
    prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return prompt + (" " if not prompt.endswith((" ", "\n")) else "") + SCORE_PRIMER
