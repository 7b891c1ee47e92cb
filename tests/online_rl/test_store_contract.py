"""The store contract: every test runs on SQLite and on a real Redis server, and both must behave the same."""

from __future__ import annotations

import time

import pydantic
import pytest

from online_rl.schema import AdapterVersion, FactsRecord, FeedbackEvent, PreferenceEvent, StoreLimits, adapter_name
from online_rl.store import ConflictError, InvalidInputError, NotFoundError, StoreOptions, open_store
from tests.online_rl.store_helpers import image_message, make_generation, png_bytes, thumbs


def adapter(version: int, **fields) -> AdapterVersion:
    return AdapterVersion(
        version=version, name=adapter_name(version), path=f"adapters/{adapter_name(version)}", algorithm="dpo", **fields
    )


# ---- images and generation records -------------------------------------------------------------------------------
def test_images_are_content_addressed_and_stored_once(store):
    data = png_bytes()
    sha = store.put_image(data)
    assert store.put_image(data) == sha
    assert store.get_image(sha) == data
    info = store.image_info(sha)
    assert (info.sha256, info.mime_type, info.size) == (sha, "image/png", len(data))
    assert store.get_image("0" * 64) is None and store.image_info("0" * 64) is None


@pytest.mark.parametrize("data, message", [(b"", "empty"), (b"not an image at all", "not an image")])
def test_non_images_are_refused(store, data, message):
    with pytest.raises(InvalidInputError, match=message):
        store.put_image(data)


def test_oversized_images_are_refused_and_not_stored(store):
    import hashlib

    store.options = StoreOptions(limits=StoreLimits(max_image_bytes=100))
    data = png_bytes(size=64)
    with pytest.raises(InvalidInputError, match="limit is 100"):
        store.put_image(data)
    assert store.image_info(hashlib.sha256(data).hexdigest()) is None


def test_generation_records_round_trip(store):
    record = make_generation(store, "chatcmpl-1", version=3)
    loaded = store.get_generation("chatcmpl-1")
    assert loaded == record
    assert loaded.adapter_name == "policy-v3" and loaded.question == "What color is the square?"
    assert store.get_generation("chatcmpl-missing") is None


def test_a_generation_id_is_written_once(store):
    make_generation(store, "chatcmpl-1")
    with pytest.raises(ConflictError):
        make_generation(store, "chatcmpl-1", response="Blue.")
    assert store.get_generation("chatcmpl-1").response == "Red."


def test_a_generation_needs_its_images_stored_first(store):
    from online_rl.schema import GenerationRecord

    record = GenerationRecord(id="chatcmpl-x", alias="base", messages=image_message("a" * 64, "Hi?"), user_id="u-a")
    with pytest.raises(NotFoundError, match="not in the store"):
        store.add_generation(record)
    assert store.get_generation("chatcmpl-x") is None


def test_generations_are_grouped_by_prompt_and_listed_by_user(store):
    a = make_generation(store, "chatcmpl-a", user="u-alice", version=1)
    b = make_generation(store, "chatcmpl-b", user="u-bob", version=2, response="Blue.")
    c = make_generation(store, "chatcmpl-c", user="u-alice", question="Is there a star?")
    assert a.prompt_hash == b.prompt_hash != c.prompt_hash
    assert [g.id for g in store.generations_for_prompt(a.prompt_hash)] == ["chatcmpl-a", "chatcmpl-b"]
    assert {g.id for g in store.list_generations(user_id="u-alice")} == {"chatcmpl-a", "chatcmpl-c"}
    assert {g.id for g in store.list_generations()} == {"chatcmpl-a", "chatcmpl-b", "chatcmpl-c"}


# ---- feedback and preference events ------------------------------------------------------------------------------
def test_feedback_is_linked_to_the_version_that_answered(store):
    make_generation(store, "chatcmpl-1", version=4)
    stored = store.add_feedback(thumbs("chatcmpl-1", -1, comment="wrong color"))
    assert stored.adapter_version == 4
    assert store.get_event(stored.id) == stored
    assert store.events_for_generation("chatcmpl-1") == [stored]
    assert store.count_events() == 1


def test_feedback_for_an_unknown_generation_is_refused_and_nothing_is_written(store):
    with pytest.raises(NotFoundError, match="chatcmpl-nope"):
        store.add_feedback(thumbs("chatcmpl-nope", 1))
    assert store.count_events() == 0 and store.list_events() == []


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"rating": 2}, "rating must be"),
        ({"rating": 0}, "rating must be"),
        ({"rating": True}, "rating must be"),
        ({"rating": "up"}, "rating must be"),
        ({"correction": "x" * 4001}, "at most 4000"),
        ({}, "needs a rating, a correction, a comment or facts"),
        ({"rating": 1, "surprise": 1}, "Extra inputs"),
    ],
)
def test_bad_feedback_is_refused_before_anything_is_written(store, fields, message):
    make_generation(store, "chatcmpl-1")
    with pytest.raises(pydantic.ValidationError, match=message):
        store.add_feedback(FeedbackEvent(generation_id="chatcmpl-1", user_id="u-alice", **fields))
    assert store.count_events() == 0


def test_an_idempotency_key_makes_a_retry_harmless(store):
    make_generation(store, "chatcmpl-1")
    first = store.add_feedback(thumbs("chatcmpl-1", 1, idempotency_key="k1"))
    retry = store.add_feedback(thumbs("chatcmpl-1", 1, idempotency_key="k1"))
    assert retry.id == first.id and store.count_events() == 1
    with pytest.raises(ConflictError, match="idempotency key"):
        store.add_feedback(thumbs("chatcmpl-1", -1, idempotency_key="k1"))
    other_user = store.add_feedback(thumbs("chatcmpl-1", 1, user="u-bob", idempotency_key="k1"))
    assert other_user.id != first.id and store.count_events() == 2


def test_facts_and_corrections_are_attached_to_the_image(store):
    record = make_generation(store, "chatcmpl-1", response="A red square and a moon.")
    sha = record.image_hashes[0]
    store.add_facts(FactsRecord(image_sha256=sha, caption="A red square.", source="shapesworld"))
    store.add_feedback(
        FeedbackEvent(
            generation_id="chatcmpl-1",
            user_id="u-alice",
            rating=-1,
            correction="A red square.",
            facts=["There is no moon."],
        )
    )
    facts = store.get_facts(sha)
    assert [(f.source, f.caption, f.facts) for f in facts] == [
        ("shapesworld", "A red square.", []),
        ("user", None, ["There is no moon."]),
        ("correction", "A red square.", []),
    ]
    with pytest.raises(NotFoundError):
        store.add_facts(FactsRecord(image_sha256="b" * 64, facts=["x"]))


def test_preferences_compare_two_answers_to_one_prompt(store):
    make_generation(store, "chatcmpl-a", version=1)
    make_generation(store, "chatcmpl-b", version=2, response="Blue.")
    make_generation(store, "chatcmpl-c", question="Is there a star?")
    event = store.add_preference(
        PreferenceEvent(generation_ids=("chatcmpl-a", "chatcmpl-b"), preferred_id="chatcmpl-a", user_id="u-alice")
    )
    assert event.adapter_versions == (1, 2) and event.rejected_id == "chatcmpl-b"
    assert store.events_for_generation("chatcmpl-b") == [event]
    with pytest.raises(InvalidInputError, match="different prompts"):
        store.add_preference(
            PreferenceEvent(generation_ids=("chatcmpl-a", "chatcmpl-c"), preferred_id="chatcmpl-c", user_id="u-alice")
        )
    with pytest.raises(NotFoundError):
        store.add_preference(
            PreferenceEvent(generation_ids=("chatcmpl-a", "chatcmpl-z"), preferred_id="chatcmpl-a", user_id="u-alice")
        )
    with pytest.raises(pydantic.ValidationError, match="preferred_id must be one of"):
        PreferenceEvent(generation_ids=("chatcmpl-a", "chatcmpl-b"), preferred_id="chatcmpl-c", user_id="u-alice")
    assert store.count_events() == 1


def test_events_are_listed_in_stream_order(store):
    make_generation(store, "chatcmpl-1")
    ids = [store.add_feedback(thumbs("chatcmpl-1", 1, comment=f"n{i}")).id for i in range(5)]
    listed = store.list_events()
    assert [event.id for _, event in listed] == ids
    after_second = store.list_events(after=listed[1][0], limit=2)
    assert [event.id for _, event in after_second] == ids[2:4]
    assert store.count_events(since=time.time() + 3600) == 0 and store.count_events(since=0) == 5


# ---- delivery to the trainer -------------------------------------------------------------------------------------
def test_a_consumer_gets_events_in_order_once(store):
    make_generation(store, "chatcmpl-1")
    ids = [store.add_feedback(thumbs("chatcmpl-1", 1, comment=str(i))).id for i in range(5)]
    first = store.read_events("trainer", "worker-1", count=3)
    assert [d.event.id for d in first] == ids[:3] and all(d.delivery_count == 1 for d in first)
    second = store.read_events("trainer", "worker-1", count=10)
    assert [d.event.id for d in second] == ids[3:]
    assert store.read_events("trainer", "worker-1", count=10) == []
    assert store.pending_count("trainer") == 5
    assert store.ack_events("trainer", [d.delivery_id for d in first + second]) == 5
    assert store.pending_count("trainer") == 0
    # Another group reads the whole stream independently.
    assert [d.event.id for d in store.read_events("export", "x", count=10)] == ids


def test_unacknowledged_events_go_out_again_after_a_restart(store):
    make_generation(store, "chatcmpl-1")
    ids = [store.add_feedback(thumbs("chatcmpl-1", 1, comment=str(i))).id for i in range(4)]
    delivered = store.read_events("trainer", "worker-1", count=4)
    store.ack_events("trainer", [delivered[0].delivery_id])
    # The same consumer restarts: it gets back what it held, and never the acknowledged event.
    again = store.read_events("trainer", "worker-1", count=10, include_own_pending=True)
    assert [d.event.id for d in again] == ids[1:] and [d.delivery_count for d in again] == [2, 2, 2]
    # A different consumer takes them over once they have been idle long enough.
    assert store.read_events("trainer", "worker-2", count=10, min_idle_ms=60_000) == []
    taken = store.read_events("trainer", "worker-2", count=10, min_idle_ms=0)
    assert [d.event.id for d in taken] == ids[1:] and [d.delivery_count for d in taken] == [3, 3, 3]
    store.ack_events("trainer", [d.delivery_id for d in taken])
    assert store.read_events("trainer", "worker-1", count=10, include_own_pending=True, min_idle_ms=0) == []


def test_a_blocking_read_waits_for_new_events(store):
    make_generation(store, "chatcmpl-1")
    started = time.monotonic()
    assert store.read_events("trainer", "w", count=1, block_ms=200) == []
    assert time.monotonic() - started >= 0.19


def test_registering_a_version_acknowledges_its_events_atomically(store):
    make_generation(store, "chatcmpl-1")
    for i in range(3):
        store.add_feedback(thumbs("chatcmpl-1", 1, comment=str(i)))
    deliveries = store.read_events("trainer", "w", count=3)
    version = store.allocate_adapter_version()
    ids = [d.delivery_id for d in deliveries]
    store.register_adapter(
        adapter(version, feedback_range=(ids[0], ids[-1]), num_feedback_events=3), ack=("trainer", ids)
    )
    assert store.pending_count("trainer") == 0
    assert store.get_adapter(version).feedback_range == (ids[0], ids[-1])
    # A failed registration (the version exists) acknowledges nothing.
    store.add_feedback(thumbs("chatcmpl-1", -1))
    late = store.read_events("trainer", "w", count=3)
    with pytest.raises(ConflictError):
        store.register_adapter(adapter(version), ack=("trainer", [late[0].delivery_id]))
    assert store.pending_count("trainer") == 1


# ---- adapter registry --------------------------------------------------------------------------------------------
def test_versions_are_allocated_once_and_registered_once(store):
    assert [store.allocate_adapter_version() for _ in range(3)] == [1, 2, 3]
    with pytest.raises(InvalidInputError, match="never allocated"):
        store.register_adapter(adapter(4))
    store.register_adapter(adapter(2, parent_version=None))
    assert [a.version for a in store.list_adapters()] == [2]
    assert store.get_adapter(1) is None and store.get_adapter(2).status == "candidate"


def test_eval_metrics_and_status_are_updated_in_place(store):
    store.register_adapter(adapter(store.allocate_adapter_version(), metrics={"chair_s": 0.3}))
    updated = store.update_adapter(1, status="rejected", metrics={"object_recall": 0.9}, notes="chair regressed")
    assert updated.metrics == {"chair_s": 0.3, "object_recall": 0.9} and updated.status == "rejected"
    assert store.get_adapter(1) == updated
    with pytest.raises(NotFoundError):
        store.update_adapter(9, status="retired")


def test_promotion_is_compare_and_set_with_history_and_rollback(store):
    for _ in range(2):
        store.register_adapter(adapter(store.allocate_adapter_version()))
    assert store.promoted_version("llava-rlhf") is None and store.registry_revision() == 2  # two registrations
    store.promote("llava-rlhf", 1, expected=None, actor="trainer")
    with pytest.raises(ConflictError, match="serves version 1, not the base model"):
        store.promote("llava-rlhf", 2, expected=None)
    change = store.promote("llava-rlhf", 2, expected=1, actor="admin", reason="better chair")
    assert (change.from_version, change.to_version, change.action) == (1, 2, "promote")
    assert store.promoted_version("llava-rlhf") == 2 and store.aliases() == {"llava-rlhf": 2}
    assert [store.get_adapter(v).status for v in (1, 2)] == ["retired", "promoted"]
    assert store.registry_revision() == 4

    back = store.rollback("llava-rlhf", actor="admin")
    assert (back.from_version, back.to_version, back.action) == (2, 1, "rollback")
    assert [store.get_adapter(v).status for v in (1, 2)] == ["promoted", "retired"]
    store.rollback("llava-rlhf")
    assert store.promoted_version("llava-rlhf") is None  # back to the base model
    with pytest.raises(ConflictError, match="no earlier version"):
        store.rollback("llava-rlhf")
    history = store.alias_history("llava-rlhf")
    assert [(c.from_version, c.to_version, c.action) for c in history] == [
        (None, 1, "promote"),
        (1, 2, "promote"),
        (2, 1, "rollback"),
        (1, None, "rollback"),
    ]
    assert [c.seq for c in history] == [3, 4, 5, 6] and store.registry_revision() == 6
    with pytest.raises(NotFoundError):
        store.promote("llava-rlhf", 7)


# ---- retention and privacy ---------------------------------------------------------------------------------------
def test_deleting_a_user_removes_their_data_and_unreferenced_images(store):
    shared = make_generation(store, "chatcmpl-a1", user="u-alice", color=(1, 2, 3))
    alone = make_generation(store, "chatcmpl-a2", user="u-alice", color=(9, 9, 9), question="Is there a star?")
    make_generation(store, "chatcmpl-b1", user="u-bob", color=(1, 2, 3))  # same image as chatcmpl-a1
    store.add_feedback(thumbs("chatcmpl-a1", 1, user="u-alice", facts=["A small square."]))
    store.add_feedback(thumbs("chatcmpl-b1", -1, user="u-alice", idempotency_key="k"))  # alice rates bob's answer
    store.add_feedback(thumbs("chatcmpl-a2", -1, user="u-bob"))  # bob rates alice's answer
    kept = store.add_feedback(thumbs("chatcmpl-b1", 1, user="u-bob"))
    store.read_events("trainer", "w", count=10)

    counts = store.delete_user("u-alice")

    assert counts == {"generations": 2, "events": 3, "images": 1, "facts": 1}
    assert store.get_generation("chatcmpl-a1") is None and store.get_generation("chatcmpl-a2") is None
    assert store.list_generations(user_id="u-alice") == []
    assert [e.id for _, e in store.list_events()] == [kept.id]
    assert store.pending_count("trainer") == 1
    assert store.image_info(alone.image_hashes[0]) is None  # only alice used it
    assert store.image_info(shared.image_hashes[0]) is not None  # bob's record still uses it
    assert store.get_facts(shared.image_hashes[0]) == []  # alice's facts are gone with her
    # Her idempotency keys are gone too: the same key now makes a new event.
    make_generation(store, "chatcmpl-a3", user="u-alice")
    assert store.add_feedback(thumbs("chatcmpl-b1", -1, user="u-alice", idempotency_key="k")).id not in {kept.id}


def test_retention_purges_old_records_with_their_events(store_url):
    import dataclasses

    with open_store(store_url) as plain:
        assert plain.purge_expired() == {"generations": 0, "events": 0, "images": 0, "facts": 0}
    with open_store(store_url + ("&" if "?" in store_url else "?") + "retention_days=1") as store:
        old = make_generation(store, "chatcmpl-old", created=time.time() - 2 * 86400, color=(5, 5, 5))
        make_generation(store, "chatcmpl-new", question="Is there a moon?")
        store.add_feedback(thumbs("chatcmpl-old", 1))
        recent = store.add_feedback(thumbs("chatcmpl-new", 1))
        counts = store.purge_expired()
        assert dataclasses.asdict(store.options)["retention_seconds"] == 86400
        assert counts == {"generations": 1, "events": 1, "images": 1, "facts": 0}
        assert store.get_generation("chatcmpl-old") is None and store.image_info(old.image_hashes[0]) is None
        assert [e.id for _, e in store.list_events()] == [recent.id]


def test_store_urls_are_checked(tmp_path):
    for url, message in [
        ("postgres://x/y", "scheme must be"),
        ("sqlite://host/x.db", "sqlite:///relative"),
        (f"sqlite:///{tmp_path}/a.db?synchronous=sometimes", "synchronous must be"),
        (f"sqlite:///{tmp_path}/a.db?colour=blue", "unknown option"),
        (f"sqlite:///{tmp_path}/a.db?retention_days=-1", "positive"),
    ]:
        with pytest.raises(ValueError, match=message):
            open_store(url)


def test_a_canary_is_set_and_cleared_with_the_registry_revision_and_its_history(store):
    store.register_adapter(adapter(store.allocate_adapter_version()))
    started = store.set_canary("llava-rlhf", 1, 0.25, actor="trainer", reason="gate passed")
    assert store.canaries() == {"llava-rlhf": (1, 0.25)} and store.registry_revision() == 2
    stopped = store.set_canary("llava-rlhf", 1, 0.0, actor="trainer", reason="thumbs-up 0.41 vs 0.63: worse")
    assert store.canaries() == {} and store.registry_revision() == 3
    history = store.alias_history("llava-rlhf")
    assert [(c.action, c.from_version, c.to_version, c.actor, c.seq) for c in history] == [
        ("canary_start", None, 1, "trainer", 2),
        ("canary_stop", 1, None, "trainer", 3),
    ]
    assert (history[0].reason, history[1].reason) == ("gate passed", "thumbs-up 0.41 vs 0.63: worse")
    assert (started.seq, stopped.seq) == (2, 3) and store.promoted_version("llava-rlhf") is None
    with pytest.raises(InvalidInputError, match="between 0 and 1"):
        store.set_canary("llava-rlhf", 1, 1.5)
    with pytest.raises(NotFoundError):
        store.set_canary("llava-rlhf", 5, 0.5)


def test_generations_using_an_image_are_found(store):
    a = make_generation(store, "chatcmpl-a", color=(7, 7, 7))
    make_generation(store, "chatcmpl-b", color=(7, 7, 7), question="Is there a moon?")
    make_generation(store, "chatcmpl-c", color=(8, 8, 8))
    assert store.generations_using_image(a.image_hashes[0]) == ["chatcmpl-a", "chatcmpl-b"]
    assert store.generations_using_image("e" * 64) == []


def test_a_refused_promotion_is_recorded_and_moves_nothing(store):
    for _ in range(2):
        store.register_adapter(adapter(store.allocate_adapter_version()))
    store.promote("llava-rlhf", 1, actor="trainer")
    revision = store.registry_revision()
    refused = store.record_refusal(
        "llava-rlhf", 2, actor="trainer", reason="staging: http://vllm-1:8000 could not load policy-v2"
    )
    assert (refused.action, refused.from_version, refused.to_version, refused.seq) == (
        "promote_refused",
        1,
        2,
        revision,
    )
    assert store.promoted_version("llava-rlhf") == 1 and store.registry_revision() == revision
    assert [store.get_adapter(v).status for v in (1, 2)] == ["promoted", "candidate"]
    history = store.alias_history("llava-rlhf")
    assert [(c.action, c.to_version) for c in history] == [("promote", 1), ("promote_refused", 2)]
    assert history[-1].reason == "staging: http://vllm-1:8000 could not load policy-v2"
    assert store.rollback("llava-rlhf").to_version is None  # back past the refusal, to what v1 replaced
    with pytest.raises(InvalidInputError, match="reason"):
        store.record_refusal("llava-rlhf", 2, reason=" ")


def test_image_bytes_live_in_files_when_the_url_names_an_image_directory(redis_store_url, tmp_path):
    import redis

    images = tmp_path / "images"
    with open_store(f"{redis_store_url}&images={images}") as store:
        record = make_generation(store, "chatcmpl-1", color=(4, 5, 6))
        (sha,) = record.image_hashes
        path = images / sha[:2] / sha
        assert path.read_bytes() == store.get_image(sha) and store.image_info(sha).size == path.stat().st_size
        raw = redis.Redis.from_url(redis_store_url.split("?")[0])
        assert raw.hget(store.key("img", sha), "data") is None  # nothing of the bytes in Redis's memory
        assert raw.hget(store.key("img", sha), "meta") is not None
        with open_store(f"{redis_store_url}&images={images}") as other_replica:
            assert other_replica.get_image(sha) == path.read_bytes()  # another replica reads it from the volume
        store.delete_user(record.user_id)
        assert not path.exists() and store.get_image(sha) is None and store.image_info(sha) is None
        assert [p for p in images.rglob("*") if p.is_file()] == []


def test_an_image_deleted_while_stored_again_keeps_its_file(redis_store_url, tmp_path):
    """The race of a delete (the last record using an image goes) with a put of the same bytes: whatever the order,
    an image whose metadata is in Redis has its file."""
    with open_store(f"{redis_store_url}&images={tmp_path / 'images'}") as store:
        data = png_bytes()
        sha = store.put_image(data)
        store.client.delete(store.key("img", sha))  # the delete's transaction ran ...
        aside = store.image_files.move_aside(sha)  # ... and moved the file aside when the put came in:
        assert store.put_image(data) == sha  # the put writes the file and the metadata again
        aside.unlink()
        assert store.get_image(sha) == data
        store.client.delete(store.key("img", sha))
        store._delete_image_file(sha)  # no metadata: the file goes
        assert not store.image_files.exists(sha)
        store.put_image(data)
        store._delete_image_file(sha)  # the metadata is back (a put won the race): the file stays
        assert store.get_image(sha) == data


def test_the_redis_password_comes_from_a_file_and_shows_in_no_url_or_error(tmp_path):
    """A Redis of its own with a password (as deploy/k8s runs it): the store authenticates with the password read from
    `password_file`, and neither the store's URL nor a connection error shows it."""
    import shutil
    import subprocess

    from tests.conftest import free_port

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server binary to start a password-protected Redis")
    port = free_port()
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--requirepass", "s3cret-redis-password"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        secret = tmp_path / "password"
        secret.write_text("s3cret-redis-password\n")  # as a mounted secret file may end
        url = f"redis://127.0.0.1:{port}/0?prefix=pw&password_file={secret}"
        deadline = time.monotonic() + 10
        while True:
            try:
                store = open_store(url)
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with store:
            make_generation(store, "chatcmpl-1")
            assert store.get_generation("chatcmpl-1") is not None
            assert "s3cret" not in store.url
        secret.write_text("wrong-password")
        with pytest.raises(ConnectionError) as refused:
            open_store(url)
        assert "wrong-password" not in str(refused.value) and "s3cret" not in str(refused.value)
        with pytest.raises(ValueError, match="cannot read password_file"):
            open_store(url.replace(str(secret), str(tmp_path / "missing")))
    finally:
        server.terminate()
        server.wait(10)
