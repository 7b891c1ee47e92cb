"""An LLM judge of two answers about a real image, for online pairs where ShapesWorld's rule judge cannot grade.

Any OpenAI-compatible vision chat model (an external model, or the gateway itself with a pinned version) sees the
image and reads, in the style of MMHal-Bench's judge prompt, the question, what is known to be true of the image
(its registered facts and users' corrections of earlier answers) and two answers, A and B. It explains briefly and
ends with "Verdict: A", "Verdict: B" or "Verdict: tie".

Each comparison is asked twice, the second time with the answers swapped, so a judge that favours a position is
caught: only the same verdict both times counts. A disagreement, a tie, a refusal ("I can't help with that") or a
reply without exactly one readable verdict gives no winner; each is logged with the reply, never guessed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from typing import Literal

from PIL import Image

logger = logging.getLogger(__name__)

PAIR_JUDGE_PROMPT = """You are an impartial and objective judge. Compare two responses that a Large Multimodal \
Model (LMM) gave to a user's question about the image above. Judge mainly two things: which response contains less \
hallucination, and which is more informative. Hallucination here means that a response states something that is \
neither present in nor implied by the image, such as a false claim about an object, its attributes, a count, a \
position, an action or any other detail that is not grounded in the image.

Base your judgement on the image, and on what is known to be true of it: the facts below, and corrections users made \
to earlier answers about it (a correction states what is true). These lists may not cover every detail of the image, \
so be careful before calling an unmentioned detail a hallucination. Prefer the response without hallucination; \
between two responses equally free of it, prefer the more informative one. Do not prefer a response for its \
length or for its position.

### Facts about the image
{facts}

### Corrections users made to earlier answers
{corrections}

### Question
{question}

### Response A
{first}

### Response B
{second}

First give a short explanation. Then end with exactly one of these lines:
Verdict: A
Verdict: B
Verdict: tie
"""

_VERDICT = re.compile(r"verdict\W{0,6}(a|b|tie)\b", re.IGNORECASE)
_REFUSAL = re.compile(
    r"\b(?:i can(?:no|')t|i am (?:not able|unable)|i'm (?:not able|unable)|i(?: am|'m) sorry|i won't|as an ai)\b",
    re.IGNORECASE,
)
Outcome = Literal["first", "second", "tie", "disagree", "refused", "malformed"]


def parse_verdict(reply: str) -> Literal["A", "B", "tie"] | None:
    """The reply's verdict: "A", "B" or "tie"; None when it gives none, or several different ones."""
    found = {match.lower() for match in _VERDICT.findall(reply)}
    if len(found) != 1:
        return None
    verdict = found.pop()
    return "tie" if verdict == "tie" else verdict.upper()


def judge_prompt(question: str, facts: Sequence[str], corrections: Sequence[str], first: str, second: str) -> str:
    def bullets(lines: Sequence[str]) -> str:
        return "\n".join(f"- {line}" for line in lines) if lines else "(none)"

    return PAIR_JUDGE_PROMPT.format(
        facts=bullets(facts), corrections=bullets(corrections), question=question, first=first, second=second
    )


@dataclasses.dataclass(frozen=True)
class PairVerdict:
    """What the two asks decided: the first or the second answer wins, a tie, a disagreement between the two asks,
    a refusal, or a malformed reply; with the judge's replies."""

    outcome: Outcome
    replies: tuple[str, ...]

    @property
    def winner(self) -> int | None:
        """0 or 1: the index of the better answer; None when no answer won."""
        return {"first": 0, "second": 1}.get(self.outcome)


class LLMPairJudge:
    """Ranks two answers about an image with a chat model behind `endpoint` (`alignloop.client.ChatEndpoint`)."""

    def __init__(self, endpoint, model: str, max_tokens: int = 512):
        self.endpoint = endpoint
        self.model = model
        self.max_tokens = max_tokens

    @classmethod
    def connect(cls, base_url: str, model: str, api_key: str = "EMPTY", http_client=None, timeout: float = 120.0):
        """A judge at an OpenAI-compatible base URL (ending in /v1). Its requests carry the `eval` client mark, so a
        gateway used as the judge neither records them as users' answers nor rate-limits them as a user's."""
        from alignloop.client import EVAL_CLIENT_HEADER, ChatEndpoint

        endpoint = ChatEndpoint(base_url, api_key, timeout, headers=EVAL_CLIENT_HEADER, http_client=http_client)
        return cls(endpoint, model)

    def check(self) -> None:
        """Raises ConnectionError, in one line, unless the judge's endpoint answers; asks only once."""
        try:
            self.endpoint.check()
        except ConnectionError as error:
            raise ConnectionError(f"the pair judge is not reachable: {error}") from error

    def _ask(self, image: Image.Image, prompt: str) -> str:
        from alignloop.client import image_data_url

        content = [
            {"type": "image_url", "image_url": {"url": image_data_url(image)}},
            {"type": "text", "text": prompt},
        ]
        return self.endpoint.chat(self.model, [{"role": "user", "content": content}], self.max_tokens)

    def compare(
        self,
        image: Image.Image,
        question: str,
        facts: Sequence[str],
        corrections: Sequence[str],
        first: str,
        second: str,
    ) -> PairVerdict:
        """Asks with (A=first, B=second), then with the answers swapped; a refusal or malformed reply to the first
        ask ends it there. Every outcome but a win is logged."""
        replies: list[str] = []
        verdicts = []
        for a, b in ((first, second), (second, first)):
            reply = self._ask(image, judge_prompt(question, facts, corrections, a, b))
            replies.append(reply)
            verdict = parse_verdict(reply)
            if verdict is None:
                outcome: Outcome = "refused" if _REFUSAL.search(reply) else "malformed"
                return self._skip(outcome, replies)
            verdicts.append(verdict)
        swapped_back = {"A": "B", "B": "A", "tie": "tie"}[verdicts[1]]
        if verdicts[0] != swapped_back:
            return self._skip("disagree", replies, f"A={verdicts[0]} then, swapped, {verdicts[1]}")
        if verdicts[0] == "tie":
            return self._skip("tie", replies)
        return PairVerdict("first" if verdicts[0] == "A" else "second", tuple(replies))

    def _skip(self, outcome: Outcome, replies: list[str], detail: str = "") -> PairVerdict:
        log = logger.info if outcome in ("tie", "disagree") else logger.warning
        log(
            "pair judge outcome=%s model=%s%s reply=%r",
            outcome,
            self.model,
            f" verdicts={detail!r}" if detail else "",
            replies[-1][:300],
        )
        return PairVerdict(outcome, tuple(replies))
