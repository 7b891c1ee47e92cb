"""The record schema: ids, hashes, references and validation rules, without a store."""

import pydantic
import pytest

from online_rl.schema import (
    AdapterVersion,
    FactsRecord,
    FeedbackEvent,
    GenerationRecord,
    PreferenceEvent,
    event_fingerprint,
    hash_user_id,
    image_refs,
    parse_stream_event,
    prompt_hash,
)

SHA = "c" * 64


def messages(question="What color?", sha=SHA):
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"sha256:{sha}"}},
                {"type": "text", "text": question},
            ],
        }
    ]


def test_user_ids_are_salted_hashes():
    assert hash_user_id("alice", "s1") == hash_user_id("alice", "s1")
    assert hash_user_id("alice", "s1") != hash_user_id("alice", "s2") != hash_user_id("bob", "s2")
    assert "alice" not in hash_user_id("alice", "s1") and hash_user_id("alice", "s1").startswith("u-")


def test_prompt_hash_ignores_key_order_but_not_content():
    a = [{"role": "user", "content": "hi"}]
    b = [{"content": "hi", "role": "user"}]
    assert prompt_hash(a) == prompt_hash(b) != prompt_hash([{"role": "user", "content": "hi!"}])


def test_image_refs_are_read_from_stored_messages():
    two = [*messages(), {"role": "assistant", "content": "Red."}, *messages(sha="d" * 64), *messages()]
    assert image_refs(two) == [SHA, "d" * 64]


def test_generation_records_fill_their_prompt_hash_and_check_references():
    record = GenerationRecord(id="x", alias="llava-rlhf", messages=messages(), user_id="u-1")
    assert record.prompt_hash == prompt_hash(messages()) and record.adapter_name == "base"
    with pytest.raises(pydantic.ValidationError, match="not a sha256"):
        GenerationRecord(id="x", alias="a", messages=messages(sha="http://evil"), user_id="u-1")
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "sha256:xyz"}}]}]
    with pytest.raises(pydantic.ValidationError, match="not a sha256"):
        GenerationRecord(id="x", alias="a", messages=bad, user_id="u-1")


def test_adapter_names_follow_their_version():
    AdapterVersion(version=3, name="policy-v3", path="adapters/policy-v3", algorithm="dpo")
    with pytest.raises(pydantic.ValidationError, match="must be named policy-v3"):
        AdapterVersion(version=3, name="policy-v4", path="p", algorithm="dpo")


def test_facts_need_content_and_a_real_hash():
    with pytest.raises(pydantic.ValidationError, match="caption or at least one fact"):
        FactsRecord(image_sha256=SHA)
    with pytest.raises(pydantic.ValidationError, match="64 lowercase hex"):
        FactsRecord(image_sha256="ABC", caption="x")


def test_stream_events_round_trip_through_json_by_kind():
    feedback = FeedbackEvent(generation_id="g", rating=1, user_id="u")
    preference = PreferenceEvent(generation_ids=("a", "b"), preferred_id="b", user_id="u")
    assert parse_stream_event(feedback.to_json()) == feedback
    assert parse_stream_event(preference.to_json()) == preference


def test_fingerprints_cover_content_not_identity():
    a = FeedbackEvent(generation_id="g", rating=1, user_id="u", idempotency_key="k")
    b = FeedbackEvent(generation_id="g", rating=1, user_id="u", idempotency_key="k")
    c = FeedbackEvent(generation_id="g", rating=-1, user_id="u", idempotency_key="k")
    assert a.id != b.id and event_fingerprint(a) == event_fingerprint(b) != event_fingerprint(c)
