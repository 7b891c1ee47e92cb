"""The demo's actions against the real gateway app on a fake vLLM: what the store holds after each button, and
what the page shows when the API is down or refuses."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from alignloop.client import GatewayClient
from demo.actions import DemoActions, metrics_frame, versions_table
from online_rl.schema import PreferenceEvent
from tests.serve.conftest import ALICE, wait_until
from tests.serve.test_gateway_api import register
from training.shapes_world import ShapesWorld


@pytest.fixture
def actions(client) -> DemoActions:
    return DemoActions(
        GatewayClient("http://testserver", ALICE, http_client=client), ShapesWorld(), max_tokens=16, temperature=0.0
    )


def last_status(updates) -> dict:
    collected = list(updates)
    return {key: value for update in collected for key, value in update.items()}


def events(store) -> list:
    return [event for _, event in store.list_events()]


def test_chat_thumbs_and_correction_reach_the_store(actions, store, fake_vllm):
    image, facts = actions.random_scene(random.Random(3))
    state = actions.new_conversation(image)
    final = last_status(actions.send(state, "What is in the image?", "llava-rlhf"))
    assert final["status"] == "Done: base answered (stop)."
    assert [m["role"] for m in state.display] == ["user", "assistant"]
    assert (
        state.display[1]["content"].startswith("shapes-llava saw 1 image(s).")
        and "answered by base" in state.display[1]["content"]
    )
    assert final["correction"] == "shapes-llava saw 1 image(s)."  # the correction box holds the latest answer
    last_status(actions.send(state, "And its color?", "llava-rlhf"))
    sent = fake_vllm.requests[-1]["messages"]
    assert [type(m["content"]) for m in sent] == [list, str, str]  # the image goes with the first question only
    first, second = state.answers
    record = wait_until(lambda: store.get_generation(first.response_id))
    assert record.client == "demo" and record.adapter_version is None and len(record.image_hashes) == 1
    other_tab = actions.new_conversation(image)
    last_status(actions.send(other_tab, "What is in the image?", "base"))
    other_record = wait_until(lambda: store.get_generation(other_tab.answers[0].response_id))
    assert other_record.user_id != record.user_id  # each tab is its own end user under the demo's key

    assert actions.thumbs(state, first.display_index, liked=False, facts_text=facts).startswith(
        "Done: Thumbs down saved"
    )
    assert actions.thumbs(state, second.display_index, liked=True, facts_text=facts).startswith("Done: Thumbs up")
    assert actions.select(state, first.display_index) == (first.text, "Correcting the selected answer, by **base**.")
    status, diff = actions.correct(state, "shapes-llava saw one red star.", facts)
    assert status.startswith("Done: Correction saved") and ("1 image(s).", "removed") in diff
    stored = events(store)
    assert [(e.generation_id, e.rating, e.correction) for e in stored] == [
        (first.response_id, -1, None),
        (second.response_id, 1, None),
        (first.response_id, None, "shapes-llava saw one red star."),
    ]
    assert stored[0].facts == facts.splitlines() and stored[1].facts is None  # facts go once per text
    sources = sorted(f.source for f in store.get_facts(record.image_hashes[0]))
    assert sources == ["correction", "user"]
    assert {e.user_id for e in stored} == {record.user_id}


def test_regenerate_replaces_the_last_answer(actions, store):
    state = actions.new_conversation(Image.new("RGB", (32, 32), "red"))
    last_status(actions.send(state, "Describe the image.", "llava-rlhf"))
    old = state.answers[0].response_id
    final = last_status(actions.regenerate(state, "base"))
    assert final["status"] == "Done: base answered (stop)."
    assert len(state.answers) == 1 and state.answers[0].response_id != old and len(state.display) == 2
    assert last_status(actions.regenerate(actions.new_conversation(None), "base"))["status"].startswith(
        "Error: There is no answer"
    )


def test_side_by_side_records_a_preference_with_both_versions(actions, client, store, fake_vllm):
    version = register(store, fake_vllm, promote=True)
    wait_until(lambda: client.app.state.table.resolve("llava-rlhf").version == version)  # the alias has moved
    state = actions.new_conversation(Image.new("RGB", (32, 32), "blue"))
    assert actions.prefer(state, "a") == "Error: Ask both versions first."
    updates = list(actions.compare(state, "Describe the image in detail.", "llava-rlhf", "base"))
    assert updates[-2]["answer_b"] == ("shapes-llava saw 1 image(s).", "base")
    assert {k: a.version for k, a in state.compared.items()} == {"a": "policy-v1", "b": "base"}
    assert actions.prefer(state, "b").startswith("Done: Preference saved: B (base) over policy-v1")
    (preference,) = [e for e in events(store) if isinstance(e, PreferenceEvent)]
    assert preference.preferred_id == state.compared["b"].response_id and preference.adapter_versions == (version, None)


def test_the_version_panel_reads_the_registry(actions, client, store, fake_vllm):
    version = register(store, fake_vllm, promote=True)
    wait_until(lambda: client.app.state.table.resolve("llava-rlhf").version == version)
    store.update_adapter(
        version,
        metrics={"pope_random_accuracy": 0.9, "chair_s": 0.2, "object_recall": 0.95},
        gate={
            "passed": True,
            "baseline": "base",
            "seconds": 41.5,
            "reasons": [],
            "differences": {
                "chair_s": {"candidate": 0.2, "baseline": 0.3, "difference": -0.1, "low": -0.16, "high": -0.04}
            },
        },
    )
    store._update_adapter(version, lambda a: a.model_copy(update={"pair_sources": {"correction": 5, "bdhs": 2}}))
    summary, frame, table, names = actions.versions()
    assert "serves:** policy-v1" in summary and "Feedback since then:** 0 events" in summary
    assert frame.to_dict("records") == [  # the gate's metrics only, readable names, the base model first
        {"version": "base", "metric": "CHAIR_s", "value": 0.3},
        {"version": "v1", "metric": "CHAIR_s", "value": 0.2},
        {"version": "v1", "metric": "recall", "value": 0.95},
    ]
    (row,) = table.to_dict("records")
    assert (row["version"], row["status"], row["CHAIR_s"]) == ("v1", "promoted", "0.200 (-0.100; -0.16..-0.04)")
    assert row["decision"] == "vs base | pairs: 2 bdhs, 5 correction | gate 42 s"
    assert names == ["llava-rlhf", "base", "llava-rlhf@v1"]
    assert metrics_frame([]).empty and versions_table([]).empty


def test_api_failures_become_one_status_line_and_leave_the_conversation_as_it_was(actions, client):
    state = actions.new_conversation(None)
    refused = last_status(actions.send(state, "Hello?", "no-such-model"))
    assert (
        refused["status"].startswith("Error: The API refused the request (404)")
        and "no-such-model" in refused["status"]
    )
    assert state.api_messages == [] and state.display == [] and refused["question"] == "Hello?"
    assert last_status(actions.send(state, "   ", "base"))["status"] == "Error: Type a question first."

    down = DemoActions(GatewayClient("http://127.0.0.1:9", ALICE, timeout_s=2), ShapesWorld(), 16, 0.0)
    status = last_status(down.send(down.new_conversation(None), "Hello?", "llava-rlhf"))["status"]
    assert status == "Error: The alignloop API at http://127.0.0.1:9 is not reachable. Is the gateway running?"
    assert actions.correct(state, "x") == ("Error: There is no answer to correct yet.", [])


def test_two_answers_of_one_version_and_the_better_one_recorded(actions, store, fake_vllm):
    state = actions.new_conversation(Image.new("RGB", (32, 32), "red"))
    updates = list(actions.two_answers(state, "Describe the image in detail.", "base"))
    assert updates[-2] == {
        "answer_a": ("shapes-llava saw 1 image(s).", "base"),
        "answer_b": ("shapes-llava saw 1 image(s), take 2.", "base"),
    }
    assert updates[-1]["status"] == "Done: Two answers by base. Which one is better?"
    sent = fake_vllm.requests[-1]
    assert sent["n"] == 2 and sent["temperature"] == 0.8  # the actions' temperature is 0: raised so they can differ
    a, b = state.compared["a"].response_id, state.compared["b"].response_id
    assert b == f"{a}-1"  # the choices' record ids
    assert actions.prefer(state, "b").startswith("Done: Preference saved: B (base) over base")
    (preference,) = [e for e in events(store) if isinstance(e, PreferenceEvent)]
    assert preference.generation_ids == (a, b) and preference.preferred_id == b
    assert last_status(actions.two_answers(state, " ", "base"))["status"] == "Error: Type a question first."


def test_a_wrong_yes_or_no_is_flipped_in_one_click(actions, store, fake_vllm):
    image, _ = actions.random_scene(random.Random(4))
    state = actions.new_conversation(image)
    fake_vllm.answer_for = lambda body, index=0: "Yes."
    last_status(actions.send(state, "Is there a moon in the image?", "llava-rlhf"))
    status, changes = actions.flip_yes_no(state)
    assert status.startswith("Done: Correction saved") and changes
    event = wait_until(lambda: [e for e in events(store) if getattr(e, "correction", None)])
    assert event[0].correction == "No." and event[0].generation_id == state.answers[0].response_id
    fake_vllm.answer_for = lambda body, index=0: "A red star."
    last_status(actions.send(state, "Describe it.", "llava-rlhf"))
    assert actions.flip_yes_no(state)[0].startswith("Error: The answer is not a plain yes or no")
