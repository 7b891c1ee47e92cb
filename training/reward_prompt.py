"""The fact-augmented reward model's input (LLaVA-RLHF, docs/papers.md §1): the conversation being rated, then one
more user turn asking for a rating, which lists the image's facts, then an assistant turn primed with "The quality
score of my last response is". The reward head reads the hidden state of that primer's last token.

The paper's turn says the answer must be fully supported by the facts and lists the criteria (accurate, helpful,
natural, concise) as bullets; here both are said in fewer words, for the tiny backbone's short context. The facts
come as one bullet each, shuffled every time the prompt is built, so the reward model cannot learn their order;
`with_facts=False` builds the same turn without them, the plain reward model the paper compares against (and the one
that is easier to hack).

Where the facts go (`facts_placement`):
- "rating_turn", the paper's and the default: in the rating turn, after the answer;
- "before_answer": in the question's user turn, after the image, and the rating turn refers to them, so a causal
  model reads each claim of the answer after the facts it should be checked against.
How each wording and placement scored: training/experiments/fact_rlhf/README.md.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

# Short on purpose: the backbone saw conversations of at most ~150 tokens in SFT, and the reward head must read the
# answer from the prompt's last token. Version 2 says the criteria in one line (~37 tokens); version 1's four bullets
# kept the fact reward model from learning presence probes (training/experiments/fact_rlhf/README.md).
RATING_CRITERIA = ("accurate", "helpful", "natural", "concise")
RATING_PROMPT_VERSION = 2  # saved with each reward model: one trained on another wording is refused, not misread
SCORE_PRIMER = "The quality score of my last response is"
FACT_PLACEMENTS = ("before_answer", "rating_turn")
DEFAULT_FACT_PLACEMENT = "rating_turn"  # the paper's, and the better one here


def fact_bullets(facts: Sequence[str], rng: random.Random) -> list[str]:
    shuffled = list(facts)
    rng.shuffle(shuffled)
    return [f"- {fact}" for fact in shuffled]


def criteria_line() -> str:
    return f"A good one is {', '.join(RATING_CRITERIA[:-1])} and {RATING_CRITERIA[-1]}."


def rating_turn(facts: Sequence[str], rng: random.Random, with_facts: bool = True) -> str:
    """The extra user turn: with facts, the statement that the answer must agree with them, one shuffled bullet per
    fact; then the criteria."""
    lines = ["Rate your last response."]
    if with_facts and facts:
        lines += ["It must agree with these facts:", *fact_bullets(facts, rng)]
    return "\n".join([*lines, criteria_line()])


def with_facts_before_question(
    messages: Sequence[dict], facts: Sequence[str], rng: random.Random, user_turn: int = -1
) -> list[dict]:
    """The conversation with the facts as a text part of a user turn (the last one by default; `user_turn` counts
    user turns only), after the image, before the question. The SFT read stage (`training.sft`) puts them in the
    first turn of its conversations the same way, so the layout it teaches is the one this prompt has."""
    block = "\n".join(["Facts:", *fact_bullets(facts, rng)]) + "\n"
    conversation = [dict(message) for message in messages]
    target = [i for i, message in enumerate(conversation) if message["role"] == "user"][user_turn]
    content = conversation[target]["content"]
    if isinstance(content, str):
        conversation[target]["content"] = block + content
    else:
        images = [part for part in content if part.get("type") != "text"]
        texts = [part for part in content if part.get("type") == "text"]
        conversation[target]["content"] = [*images, {"type": "text", "text": block}, *texts]
    return conversation


def reward_model_text(
    tokenizer,
    messages: Sequence[dict],
    response: str,
    facts: Sequence[str],
    rng: random.Random,
    with_facts: bool = True,
    facts_placement: str = DEFAULT_FACT_PLACEMENT,
) -> str:
    """The full text the reward model scores, through the model's own chat template (so image placeholders land
    where the processor expects them); it ends with the score primer."""
    if facts_placement not in FACT_PLACEMENTS:
        raise ValueError(f"facts_placement must be one of {', '.join(FACT_PLACEMENTS)}, not {facts_placement!r}")
    if with_facts and facts and facts_placement == "before_answer":
        rating = f"Rate your last response.\nIt must agree with the facts above.\n{criteria_line()}"
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
