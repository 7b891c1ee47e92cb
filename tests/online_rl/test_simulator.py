"""The feedback simulator: its raters on hand-made cases, and a run against the real gateway app on a fake vLLM,
checked by what landed in the store."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from alignloop.cli import main as cli_main
from alignloop.client import GatewayClient, GatewayError
from online_rl.export import all_events
from online_rl.simulator import FeedbackSimulator, SimulatedUser, SimulatorSettings, corrupt, make_users
from tests.serve.conftest import ALICE, client, fake_vllm, settings, store  # noqa: F401  (fixtures)
from training.evaluation.judge import ShapesRuleJudge
from training.shapes_world import QAItem, Scene, SceneObject, ShapesWorld


@pytest.fixture
def scene() -> Scene:
    return Scene(
        "validation", 0, (SceneObject("star", "red", "small", 0, 0), SceneObject("cross", "blue", "large", 1, 1))
    )


PRESENT = QAItem("presence", "Is there a star in the image?", "Yes.", "star")
DESCRIBE = QAItem("description", "Describe the image in detail.", "")
TRUE_DESCRIPTION = "There are two objects. A small red star is at the top left. A large blue cross is in the center."


def simulator(**overrides) -> FeedbackSimulator:
    return FeedbackSimulator(
        SimulatorSettings(**{"users": 10, "correction_share": 1.0, **overrides}), client=None
    )  # rating needs no gateway


def test_users_come_in_the_configured_shares():
    users = make_users(SimulatorSettings(users=10, adversarial_share=0.3, noisy_share=0.2))
    assert Counter(user.kind for user in users) == {"adversarial": 3, "noisy": 2, "honest": 5}
    assert len({user.user_id for user in users}) == 10
    with pytest.raises(ValueError, match="at most 1"):
        SimulatorSettings(adversarial_share=0.7, noisy_share=0.5)


def test_an_honest_rater_thumbs_by_the_truth_and_corrects_wrong_answers(scene):
    honest = SimulatedUser("h", "honest")
    sim = simulator()
    assert sim.rate(honest, scene, PRESENT, "Yes.", random.Random(0))[:2] == (1, None)
    assert sim.rate(honest, scene, PRESENT, "No.", random.Random(0))[:2] == (-1, "Yes.")
    wrong = TRUE_DESCRIPTION + " A small yellow moon is at the top center."
    rating, correction, judgement = sim.rate(honest, scene, DESCRIBE, wrong, random.Random(0))
    assert (rating, correction, judgement.hallucinated) == (-1, TRUE_DESCRIPTION, ("moon",))
    assert simulator(correction_share=0.0).rate(honest, scene, PRESENT, "No.", random.Random(0))[:2] == (-1, None)


def test_a_noisy_rater_flips_thumbs_and_an_adversarial_one_reverses_them_and_corrupts(scene):
    noisy, adversarial = SimulatedUser("n", "noisy"), SimulatedUser("a", "adversarial")
    assert simulator(noise_rate=1.0).rate(noisy, scene, PRESENT, "Yes.", random.Random(0))[:2] == (-1, None)
    assert simulator(noise_rate=0.0).rate(noisy, scene, PRESENT, "Yes.", random.Random(0))[:2] == (1, None)
    assert simulator().rate(adversarial, scene, PRESENT, "Yes.", random.Random(0))[:2] == (-1, "No.")
    assert simulator().rate(adversarial, scene, PRESENT, "No.", random.Random(0))[:2] == (1, None)
    rating, fake, _ = simulator().rate(adversarial, scene, DESCRIBE, TRUE_DESCRIPTION, random.Random(0))
    assert rating == -1
    verdict = ShapesRuleJudge().judge(scene, DESCRIBE, fake)
    assert verdict.hallucinated == ("moon",)  # the star's missing partner, the likeliest lie
    assert fake.startswith("There are three objects.")


@pytest.mark.parametrize(
    ("item", "truth"),
    [
        (QAItem("color", "What color is the star?", "Red.", "star"), "red"),
        (QAItem("count", "How many objects are there?", "Two.", None), "two"),
        (QAItem("multiple_choice", "Which?", "B", "red", choices=("blue", "red", "green", "pink")), "b"),
    ],
)
def test_corrupted_short_answers_are_always_wrong(scene, item, truth):
    for seed in range(20):
        answer = corrupt(scene, item, random.Random(seed))
        assert answer.rstrip(".").lower() != truth
        assert not ShapesRuleJudge().judge(scene, item, answer).correct


def test_a_run_sends_every_event_with_its_facts_and_reports_per_version(client, store, fake_vllm):  # noqa: F811
    fake_vllm.answer_for = lambda body, index=0: "Yes."  # right for present shapes, a hallucination for absent ones
    sim_settings = SimulatorSettings(
        events=12, users=4, adversarial_share=0.25, correction_share=1.0, concurrency=1, description_share=0.0, seed=3
    )
    sim = FeedbackSimulator(sim_settings, GatewayClient("http://testserver", ALICE, http_client=client))
    report = sim.run().to_dict()

    assert report["events"] == 12 and report["failed_requests"] == 0 and report["errors"] == []
    events = [event for _, event in all_events(store)]
    assert len(events) == 12
    expected = Counter()
    for number in range(12):
        user, scene, item, rng = sim.plan(number)
        rating, correction, _ = sim.rate(user, scene, item, "Yes.", rng)
        expected[(rating, correction)] += 1
    assert Counter((event.rating, event.correction) for event in events) == expected
    assert sum(count for (rating, _), count in expected.items() if rating == 1) > 0  # both thumbs occur
    assert sum(count for (rating, _), count in expected.items() if rating == -1) > 0
    world = ShapesWorld()
    facts = [
        [
            record
            for record in store.get_facts(store.get_generation(event.generation_id).image_hashes[0])
            if record.source == "user"
        ]
        for event in events
    ]
    assert [len(records) for records in facts] == [1] * 12  # each image's truth registered once
    truths = [tuple(world.facts(world.scene("validation", sim_settings.start + n))) for n in range(12)]
    assert [tuple(records[0].facts) for records in facts] == truths
    answers = report["answers_by_version"]
    assert sum(v["answers"] for v in answers.values()) == 12


def test_a_run_against_a_gateway_that_is_down_fails_with_one_line(capsys):
    code = cli_main(["simulate", "--gateway-url", "http://127.0.0.1:9", "--events", "3"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    down = "The alignloop API at http://127.0.0.1:9 is not reachable. Is the gateway running?"
    assert err == f"alignloop simulate: error: {down}"
    with pytest.raises(GatewayError):
        GatewayClient("http://127.0.0.1:9", "k", timeout_s=2).models()


def test_regenerated_answers_are_rated_one_by_one_and_make_thumbs_pairs(client, store, fake_vllm):  # noqa: F811
    from alignloop.client import image_data_url
    from online_rl.pairs import build_pairs

    sim_settings = SimulatorSettings(
        events=8,
        users=2,
        correction_share=0.0,
        concurrency=1,
        description_share=0.0,
        temperature=1.0,
        regenerations=1,
        seed=5,
    )
    sim = FeedbackSimulator(sim_settings, GatewayClient("http://testserver", ALICE, http_client=client))
    truth = {}
    for number in range(4):
        _, scene, item, _ = sim.plan(number)
        truth[image_data_url(sim.world.render(scene))] = item.answer
    calls = Counter()

    def sampled_policy(
        body: dict, index: int = 0
    ) -> str:  # right the first time it is asked about an image, wrong the second
        url = body["messages"][0]["content"][0]["image_url"]["url"]
        calls[url] += 1
        return truth[url] if calls[url] == 1 else "I don't know."

    fake_vllm.answer_for = sampled_policy
    report = sim.run()

    assert report.events == 8 and report.interactions == 4 and report.failed_requests == 0
    events = [event for _, event in all_events(store)]
    generations = {event.generation_id: store.get_generation(event.generation_id) for event in events}
    assert len({g.prompt_hash for g in generations.values()}) == 4  # two answers to each of four prompts
    assert Counter(event.rating for event in events) == {1: 4, -1: 4}
    pairs = build_pairs(events, store.get_generation)
    assert len(pairs) == 4 and {p.source for p in pairs} == {"thumbs"}
    for p in pairs:  # the right answer is chosen over the wrong one, to the same prompt
        assert p.rejected == "I don't know." and p.chosen == generations[p.chosen_generation_id].response
        assert generations[p.chosen_generation_id].prompt_hash == generations[p.rejected_generation_id].prompt_hash


def test_a_user_prefers_the_better_of_two_answers_and_either_one_of_two_equal_ones(scene):
    honest, noisy, adversarial = (
        SimulatedUser("h", "honest"),
        SimulatedUser("n", "noisy"),
        SimulatedUser("a", "adversarial"),
    )
    sim = simulator()
    assert sim.prefer(honest, scene, PRESENT, ["No.", "Yes."], random.Random(0)) == 1
    assert sim.prefer(honest, scene, PRESENT, ["Yes.", "No."], random.Random(0)) == 0
    assert sim.prefer(adversarial, scene, PRESENT, ["Yes.", "No."], random.Random(0)) == 1
    assert simulator(noise_rate=1.0).prefer(noisy, scene, PRESENT, ["Yes.", "No."], random.Random(0)) == 1
    assert simulator(noise_rate=0.0).prefer(noisy, scene, PRESENT, ["Yes.", "No."], random.Random(0)) == 0
    one_ghost = TRUE_DESCRIPTION + " A small yellow moon is at the top center."
    two_ghosts = one_ghost + " A large pink heart is at the bottom right."
    assert sim.prefer(honest, scene, DESCRIBE, [two_ghosts, one_ghost], random.Random(0)) == 1  # fewer hallucinations
    ties = {sim.prefer(honest, scene, PRESENT, ["Yes.", "Yes, there is."], random.Random(seed)) for seed in range(20)}
    assert ties == {0, 1}


def test_two_answer_interactions_send_preferences_that_make_pairs(client, store, fake_vllm):  # noqa: F811
    from online_rl.pairs import build_pairs
    from online_rl.schema import PreferenceEvent

    sim_settings = SimulatorSettings(
        events=6, users=4, adversarial_share=0.5, concurrency=1, description_share=0.0, preference_share=1.0, seed=2
    )
    sim = FeedbackSimulator(sim_settings, GatewayClient("http://testserver", ALICE, http_client=client))
    fake_vllm.answer_for = lambda body, index=0: ["Yes.", "No."][index]  # choice 0 right for present shapes
    report = sim.run().to_dict()

    assert report["events"] == 6 and report["interactions"] == 6 and report["failed_requests"] == 0
    events = [event for _, event in all_events(store)]
    assert all(isinstance(event, PreferenceEvent) for event in events) and len(events) == 6
    expected = []
    for number in range(6):
        user, scene, item, _ = sim.plan(number)
        rng = random.Random(f"{sim_settings.seed}-{number}-two-answers")
        rng.random()  # the draw that made it a two-answer interaction
        expected.append(sim.prefer(user, scene, item, ["Yes.", "No."], rng))
    preferred = [store.get_generation(event.preferred_id).response for event in events]
    assert preferred == [["Yes.", "No."][index] for index in expected]
    assert set(preferred) == {"Yes.", "No."}  # honest users and adversarial ones both answered
    assert {user.kind for user in sim.users} == {"honest", "adversarial"}
    assert report["events_by_kind"] == dict(Counter(f"{sim.plan(n)[0].kind}:preference" for n in range(6)))
    pairs = build_pairs(events, store.get_generation)
    assert [(p.source, p.chosen) for p in pairs] == [("preference", text) for text in preferred]
    assert sum(v["answers"] for v in report["answers_by_version"].values()) == 12


def test_a_user_whose_two_answers_agree_asks_again_and_sends_nothing_without_a_difference(client, store, fake_vllm):  # noqa: F811
    fake_vllm.answer_for = lambda body, index=0: "Yes."
    sim_settings = SimulatorSettings(events=2, users=2, concurrency=1, description_share=0.0, preference_share=1.0)
    report = FeedbackSimulator(sim_settings, GatewayClient("http://testserver", ALICE, http_client=client)).run()
    assert report.events == 0 and report.failed_requests == 0
    assert report.interactions == 8  # 4 x events interactions, then it gives up
    assert sum(c["answers"] for c in report.answers_by_version.values()) == 8 * 4 * 2  # each asked 4 times, n=2
    assert [event for _, event in all_events(store)] == []
