"""`alignloop feedback export` on a real store: TRL and RLHF-V pairs with their images, raw events, JSONL and
Parquet."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from online_rl.export import export_feedback, store_reward_pairs
from online_rl.schema import FactsRecord, FeedbackEvent, GenerationRecord, PreferenceEvent
from online_rl.store import open_store
from tests.online_rl.store_helpers import image_message, make_generation, png_bytes, thumbs
from training.reward_data import load_pairs
from training.shapes_world import DESCRIBE_PROMPT, ShapesWorld

ALIGNLOOP = Path(sys.executable).parent / "alignloop"


@pytest.fixture
def filled(store):
    """Two answers to one prompt (thumbs and a preference between them) and a corrected answer to another."""
    good = make_generation(store, "chatcmpl-good", response="Red.")
    make_generation(store, "chatcmpl-bad", response="Blue.", version=2)
    make_generation(store, "chatcmpl-desc", question="Describe the image.", response="A red square and a moon.")
    store.add_feedback(thumbs("chatcmpl-good", 1))
    store.add_feedback(thumbs("chatcmpl-bad", -1))
    store.add_feedback(
        FeedbackEvent(generation_id="chatcmpl-desc", user_id="u-alice", rating=-1, correction="A red square.")
    )
    store.add_preference(
        PreferenceEvent(generation_ids=("chatcmpl-good", "chatcmpl-bad"), preferred_id="chatcmpl-good", user_id="u-bob")
    )
    return store, good.image_hashes[0]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_trl_pairs_as_jsonl_with_image_files(filled, tmp_path):
    store, sha = filled
    summary = export_feedback(store, tmp_path / "out", what="pairs", style="trl", fmt="jsonl")
    assert summary["by_source"] == {"correction": 1, "thumbs": 1, "preference": 1} and summary["rows"] == 3
    rows = read_jsonl(tmp_path / "out" / "pairs.jsonl")
    correction = rows[0]
    assert correction["prompt"] == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}
    ]
    assert correction["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}]
    assert correction["rejected"][0]["content"][0]["text"] == "A red square and a moon."
    assert correction["images"] == [f"images/{sha}.png"]
    assert (tmp_path / "out" / correction["images"][0]).read_bytes() == png_bytes()
    assert [(r["chosen"][0]["content"][0]["text"], r["rejected"][0]["content"][0]["text"]) for r in rows[1:]] == [
        ("Red.", "Blue."),
        ("Red.", "Blue."),
    ]


def test_rlhfv_pairs_as_parquet_with_embedded_images(filled, tmp_path):
    import datasets

    store, _ = filled
    export_feedback(store, tmp_path / "out", what="pairs", style="rlhfv", fmt="parquet")
    dataset = datasets.Dataset.from_parquet(str(tmp_path / "out" / "pairs.parquet"))
    assert dataset.column_names == ["question", "chosen", "rejected", "image", "source"]
    assert dataset[0]["question"] == "Describe the image." and dataset[0]["chosen"] == "A red square."
    assert dataset[0]["image"].size == (8, 8)


def test_trl_parquet_loads_as_a_conversational_vision_dataset(filled, tmp_path):
    import datasets

    store, _ = filled
    export_feedback(store, tmp_path / "out", what="pairs", style="trl", fmt="parquet")
    row = datasets.Dataset.from_parquet(str(tmp_path / "out" / "pairs.parquet"))[0]
    assert (
        row["prompt"][0]["content"][0]["type"] == "image"
        and row["prompt"][0]["content"][1]["text"] == "Describe the image."
    )
    assert row["images"][0].size == (8, 8) and row["chosen"][0]["role"] == "assistant"


def test_raw_events_carry_their_generation_records(filled, tmp_path):
    store, _ = filled
    export_feedback(store, tmp_path / "out", what="events", fmt="jsonl")
    rows = read_jsonl(tmp_path / "out" / "events.jsonl")
    assert [row["event"]["kind"] for row in rows] == ["feedback", "feedback", "feedback", "preference"]
    assert [g["id"] for g in rows[3]["generations"]] == ["chatcmpl-good", "chatcmpl-bad"]
    assert rows[1]["event"]["adapter_version"] == 2


def test_an_export_never_overwrites(filled, tmp_path):
    store, _ = filled
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        export_feedback(store, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_the_cli_exports_and_fails_in_one_line(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    missing = subprocess.run(
        [str(ALIGNLOOP), "feedback", "export", "--store-url", url, "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0 and "no store at" in missing.stderr
    with open_store(url) as store:
        make_generation(store, "chatcmpl-1", response="A moon.")
        store.add_feedback(FeedbackEvent(generation_id="chatcmpl-1", user_id="u-1", correction="A star."))
    done = subprocess.run(
        [str(ALIGNLOOP), "feedback", "export", "--store-url", url, "--output", str(tmp_path / "o"), "--style", "rlhfv"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"] == 1
    assert read_jsonl(tmp_path / "o" / "pairs.jsonl")[0]["chosen"] == "A star."
    down = subprocess.run(
        [str(ALIGNLOOP), "feedback", "purge", "--store-url", "redis://127.0.0.1:9/0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert down.returncode == 1 and "cannot reach the Redis store" in down.stderr and "Traceback" not in down.stderr


@pytest.fixture
def sqlite_store(tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        yield store


def test_reward_pairs_carry_the_image_and_its_registered_facts(sqlite_store, tmp_path):
    world = ShapesWorld()
    scene = world.scene("validation", 3)
    buffer = io.BytesIO()
    world.render(scene).save(buffer, format="PNG")
    sha = sqlite_store.put_image(buffer.getvalue())
    for gid, text in (("gen-good", "There is one object."), ("gen-bad", "There is a moon.")):
        sqlite_store.add_generation(
            GenerationRecord(
                id=gid, alias="llava-rlhf", messages=image_message(sha, DESCRIBE_PROMPT), response=text, user_id="u-a"
            )
        )
    sqlite_store.add_feedback(FeedbackEvent(generation_id="gen-good", rating=1, user_id="u-a"))
    sqlite_store.add_feedback(FeedbackEvent(generation_id="gen-bad", rating=-1, user_id="u-a"))
    sqlite_store.add_facts(FactsRecord(image_sha256=sha, facts=world.facts(scene), source="user"))
    pairs = store_reward_pairs(sqlite_store)
    assert len(pairs) == 1
    pair = pairs[0]
    assert (pair.chosen, pair.rejected, pair.kind) == ("There is one object.", "There is a moon.", "thumbs")
    assert pair.facts == tuple(world.facts(scene))
    assert pair.image.size == world.render(scene).size
    # `--what reward-pairs` writes them in the reward model's format, which its recipe reads back
    summary = export_feedback(sqlite_store, tmp_path / "reward-pairs", what="reward-pairs")
    assert (summary["pairs"], summary["by_source"]) == (1, {"thumbs": 1})
    (loaded,) = load_pairs(tmp_path / "reward-pairs")
    assert (loaded.chosen, loaded.rejected, loaded.facts, loaded.kind) == (
        pair.chosen,
        pair.rejected,
        pair.facts,
        "thumbs",
    )
    assert list(loaded.image.getdata()) == list(world.render(scene).getdata())
