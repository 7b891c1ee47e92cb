"""The `alignloop` command as a user runs it: bad input ends in one clear line and a non-zero exit, no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ALIGNLOOP = Path(sys.executable).parent / "alignloop"


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    assert ALIGNLOOP.exists(), "the alignloop console script is not installed (make setup installs it)"
    return subprocess.run([str(ALIGNLOOP), *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_eval_on_a_missing_model_path(tmp_path):
    result = run("eval", "--model", str(tmp_path / "nope"), "--num-images", "2")
    assert_one_line_error(result, "alignloop eval: error:", "nope")


def test_eval_against_an_endpoint_that_is_down():
    result = run("eval", "--endpoint", "http://127.0.0.1:9/v1", "--num-images", "2")
    assert_one_line_error(result, "cannot reach", "127.0.0.1:9")


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("{not json", "JSON"),
        ('{"question": "a dict, not a list"}', "list"),
        ('[{"question": "What is it?"}]', "entry 0 lacks the key(s) question_type"),
    ],
)
def test_eval_on_a_malformed_mmhal_file(tmp_path, content, fragment):
    questions = tmp_path / "mmhal.json"
    questions.write_text(content)
    result = run(
        "eval",
        "--benchmark",
        "mmhal",
        "--questions",
        str(questions),
        "--image-dir",
        str(tmp_path),
        "--judge-endpoint",
        "http://127.0.0.1:9/v1",
        "--judge-model",
        "judge",
    )
    assert_one_line_error(result, "mmhal.json", fragment)


def test_eval_without_a_model_says_what_is_missing():
    assert_one_line_error(run("eval"), "--model DIR or --endpoint URL")


def test_data_export_writes_jsonl_png_and_a_dataset(tmp_path):
    output = tmp_path / "shapes"
    result = run("data", "--split", "test", "--num-scenes", "3", "--output", str(output))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (output / "data.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == ["test-0000000", "test-0000001", "test-0000002"]
    assert all((output / row["image"]).is_file() for row in rows)
    assert {q["kind"] for q in rows[0]["questions"]} >= {"description", "presence"}

    import datasets

    dataset = datasets.load_from_disk(str(output / "hf"))
    assert dataset.num_rows == 3 and dataset[0]["image"].size == (96, 96)
    assert json.loads(dataset[0]["objects"]) == rows[0]["objects"]


def test_data_export_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "taken.txt").write_text("x")
    result = run("data", "--num-scenes", "2", "--output", str(tmp_path))
    assert_one_line_error(result, "not empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.txt"]  # nothing half-written beside it


def test_train_rejects_an_unknown_recipe():
    result = run("train", "dance")
    assert result.returncode == 2 and "invalid choice" in result.stderr and "Traceback" not in result.stderr


def test_demo_with_a_bad_gateway_url_or_port():
    assert_one_line_error(run("demo", "--port", "70000"), "alignloop demo: error: bad setting port")
    assert_one_line_error(run("demo", "--gateway-url", "gateway:8000"), "bad setting gateway_url", "http://")


def test_trainer_on_a_missing_model_or_with_nothing_to_train(tmp_path):
    assert_one_line_error(
        run("trainer", "--model", str(tmp_path / "nope"), "--once"), "alignloop trainer: error:", "nope"
    )
    idle = run("trainer", "--store-url", f"sqlite:///{tmp_path / 'store.db'}", "--once")
    assert idle.returncode == 0 and "nothing to train" in idle.stdout


def test_reward_and_ppo_recipes_on_missing_inputs(tmp_path):
    assert_one_line_error(
        run("train", "reward", "--model", str(tmp_path / "nope"), "--pairs-dir", str(tmp_path / "p")),
        "alignloop train: error:",
        "nope",
    )
    assert_one_line_error(
        run("train", "ppo", "--reward-model", str(tmp_path / "no-rm")),
        "alignloop train: error:",
        "no reward model",
        "no-rm",
    )
    assert_one_line_error(
        run("trainer", "--algorithm", "ppo", "--reward-model", str(tmp_path / "no-rm"), "--once"),
        "alignloop trainer: error:",
        "no reward model",
    )


def test_reward_and_ppo_recipes_refuse_unknown_sharding_and_fact_placement(tmp_path):
    assert_one_line_error(
        run("train", "reward", "--sharding", "zero3", "--pairs-dir", str(tmp_path / "p")),
        "alignloop train: error:",
        "--sharding must be one of ddp, fsdp",
    )
    assert_one_line_error(
        run("train", "reward", "--facts-placement", "on_top", "--pairs-dir", str(tmp_path / "p")),
        "alignloop train: error:",
        "before_answer, rating_turn",
    )
    assert_one_line_error(
        run("train", "ppo", "--sharding", "zero3", "--reward-model", str(tmp_path / "rm")),
        "alignloop train: error:",
        "--sharding must be one of ddp, fsdp",
    )
    assert not (tmp_path / "p").exists()  # refused before any pair was sampled


def test_eval_pope_with_a_missing_image_is_one_line(tmp_path):
    from tests.real_data import QUESTIONS, write_pope

    files, image_dir = write_pope(tmp_path, QUESTIONS)
    (image_dir / "COCO_val2014_000000000002.jpg").unlink()
    pope_files = ",".join(map(str, files))
    result = run("eval", "--benchmark", "pope", "--pope-files", pope_files, "--image-dir", str(image_dir))
    assert_one_line_error(result, "coco_pope_random.json: line 3: image COCO_val2014_000000000002.jpg is not in")


def test_eval_mmhal_without_image_src_or_with_a_judge_that_is_down_is_one_line(tmp_path):
    from tests.real_data import write_mmhal

    questions, image_dir = write_mmhal(tmp_path)
    args = ["eval", "--benchmark", "mmhal", "--questions", str(questions), "--image-dir", str(image_dir)]
    args += ["--judge-endpoint", "http://127.0.0.1:9/v1", "--judge-model", "judge"]
    assert_one_line_error(run(*args), "the judge is not reachable: cannot reach endpoint http://127.0.0.1:9/v1")
    entries = json.loads(questions.read_text())
    del entries[1]["image_src"]
    questions.write_text(json.dumps(entries))
    assert_one_line_error(run(*args), "response_template.json: entry 1 lacks the key(s) image_src")


def test_eval_chair_says_what_it_needs():
    assert_one_line_error(run("eval", "--benchmark", "chair"), "CHAIR needs --annotations and --image-dir")
