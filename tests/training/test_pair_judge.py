"""The LLM pair judge against a fake judge server: a win (in both orders), a tie, a disagreement between the two
orders, a refusal and a malformed reply, each with what was asked; and a judge that is down is one clear line."""

import logging

import pytest
from PIL import Image

from tests.fake_judge import FakeJudge, response_a
from training.evaluation.pair_judge import LLMPairJudge, parse_verdict

TRUE = "A dog sleeps on a red sofa."
GHOST = "A dog sleeps on a red sofa next to a cat."
FACTS = ["A brown dog lies on a red sofa."]
CORRECTIONS = ["There is no cat."]


def judge_with(reply) -> tuple[LLMPairJudge, FakeJudge]:
    fake = FakeJudge(reply)
    return LLMPairJudge.connect("http://judge.test/v1", "judge-model", "sk-judge", http_client=fake.client()), fake


def compare(judge: LLMPairJudge, first: str = GHOST, second: str = TRUE):
    return judge.compare(
        Image.new("RGB", (16, 16), (200, 10, 10)), "Describe the image.", FACTS, CORRECTIONS, first, second
    )


def test_a_win_holds_in_both_orders_and_the_judge_sees_the_image_facts_and_corrections():
    judge, fake = judge_with(
        lambda prompt, _: f"The other invents a cat.\nVerdict: {'A' if response_a(prompt) == TRUE else 'B'}"
    )
    verdict = compare(judge)
    assert (verdict.outcome, verdict.winner) == ("second", 1) and len(verdict.replies) == 2
    first, swapped = fake.requests
    assert first["model"] == "judge-model" and first["temperature"] == 0.0
    content = first["messages"][0]["content"]
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    prompt = content[1]["text"]
    assert "- A brown dog lies on a red sofa." in prompt and "- There is no cat." in prompt
    assert "### Question\nDescribe the image." in prompt
    assert response_a(prompt) == GHOST and response_a(swapped["messages"][0]["content"][1]["text"]) == TRUE
    assert compare(judge, TRUE, GHOST).winner == 0


@pytest.mark.parametrize(
    "reply, outcome, asks",
    [
        (lambda prompt, _: "Both are equally accurate. Verdict: tie", "tie", 2),
        (lambda prompt, _: "Verdict: A", "disagree", 2),  # always the first position: the swap catches it
        (lambda prompt, _: "I'm sorry, but I can't help with evaluating this image.", "refused", 1),
        (lambda prompt, _: "Response A seems slightly better overall.", "malformed", 1),
        (lambda prompt, _: "Verdict: A ... on reflection, Verdict: B", "malformed", 1),
    ],
)
def test_no_winner_is_logged_and_never_guessed(reply, outcome, asks, caplog):
    judge, fake = judge_with(reply)
    with caplog.at_level(logging.INFO, logger="training.evaluation.pair_judge"):
        verdict = compare(judge)
    assert (verdict.outcome, verdict.winner, len(fake.requests)) == (outcome, None, asks)
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"pair judge outcome={outcome} model=judge-model" in line


def test_verdicts_are_read_from_the_last_line_style():
    assert [parse_verdict(t) for t in ("Verdict: B", "verdict - tie", "**Verdict:** a", "no verdict here")] == [
        "B",
        "tie",
        "A",
        None,
    ]


def test_a_judge_that_is_down_is_one_clear_line():
    judge = LLMPairJudge.connect("http://127.0.0.1:9/v1", "judge-model")
    with pytest.raises(ConnectionError, match=r"^the pair judge is not reachable: cannot reach endpoint") as error:
        judge.check()
    assert "\n" not in str(error.value)
