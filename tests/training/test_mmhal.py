"""MMHal-Bench runner with a fake chat model and a fake judge: exact scores, file validation, rating parsing."""

import json

import pytest
from PIL import Image

from training.evaluation.mmhal import evaluate_mmhal, format_table, judge_prompt, load_mmhal, parse_rating
from training.evaluation.models import ChatRequest

# question -> the judge's canned review of the answer to it
REVIEWS = {
    "What color is the cat?": "The answer is right and detailed. Rating: 5, very informative, no hallucination",
    "Is the cat sitting on a chair?": "It invents a chair.\n**Rating:** 2",
    "How many dogs are there?": "rating: 6",
    "How many cats are there?": "First guess rating: 4. On reflection, Rating: 3, not informative, no hallucination",
    "What else is in the picture?": "I cannot judge this one.",
}
TYPES = ["attribute", "attribute", "counting", "counting", "other"]


def entry(index: int, question: str, question_type: str) -> dict:
    return {
        "question_type": question_type,
        "question_topic": "animal",
        "image_id": f"img{index}",
        "image_src": f"https://example.org/photos/img{index}_o.jpg",
        "image_content": ["Cat", "Dog"],
        "question": question,
        "gt_answer": f"reference {index}",
    }


@pytest.fixture
def bench(tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    entries = [entry(i, q, t) for i, (q, t) in enumerate(zip(REVIEWS, TYPES, strict=True))]
    for i in range(len(entries)):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(image_dir / f"img{i}_o.jpg")
    path = tmp_path / "mmhal.json"
    path.write_text(json.dumps(entries))
    return path, image_dir, entries


class EchoModel:
    def __init__(self):
        self.requests: list[ChatRequest] = []

    def answer(self, requests):
        self.requests += requests
        return [f"answer to {r.question}" for r in requests]


class CannedJudge:
    def __init__(self):
        self.prompts: list[str] = []

    def judge(self, prompts):
        self.prompts += prompts
        return [next(review for question, review in REVIEWS.items() if f"\n{question}\n" in p) for p in prompts]


def test_evaluate_mmhal_exact_scores(bench):
    path, image_dir, _ = bench
    model, judge = EchoModel(), CannedJudge()
    items = load_mmhal(path, image_dir)
    report = evaluate_mmhal(items, judge, model=model, max_tokens=32, chunk_size=2, progress=False)
    # ratings: 5, 2, 6, 3, unparsed
    assert report["num_questions"] == 5
    assert report["num_rated"] == 4
    assert report["num_unparsed"] == 1
    assert report["average_score"] == pytest.approx(16 / 4)
    assert report["hallucination_rate"] == pytest.approx(1 / 4)
    assert report["per_type"]["attribute"] == {"average_score": 3.5, "hallucination_rate": 0.5, "num_rated": 2}
    assert report["per_type"]["counting"] == {"average_score": 4.5, "hallucination_rate": 0.0, "num_rated": 2}
    assert report["per_type"]["other"]["num_rated"] == 0
    assert list(report["per_type"]) == ["attribute", "counting", "other"]
    assert [r["rating"] for r in report["records"]] == [5, 2, 6, 3, None]
    assert len(model.requests) == 5 and all(r.max_tokens == 32 and r.image.size == (8, 8) for r in model.requests)
    assert "answer to How many dogs are there?" in judge.prompts[2]
    assert "Cat, Dog" in judge.prompts[2] and "reference 2" in judge.prompts[2]
    assert "overall" in format_table(report)


def test_evaluate_mmhal_judges_the_files_model_answers(bench, tmp_path):
    path, image_dir, entries = bench
    for e in entries:
        e["model_answer"] = "a stored answer"
    path.write_text(json.dumps(entries))
    judge = CannedJudge()
    report = evaluate_mmhal(load_mmhal(path, image_dir), judge, progress=False)
    assert report["average_score"] == pytest.approx(4.0)
    assert all("a stored answer" in p for p in judge.prompts)


def test_evaluate_mmhal_without_model_needs_model_answers(bench):
    path, image_dir, _ = bench
    with pytest.raises(ValueError, match="entry 0 has no model_answer"):
        evaluate_mmhal(load_mmhal(path, image_dir), CannedJudge(), progress=False)


def test_judge_prompt_holds_the_rubric_and_the_inputs(bench):
    path, image_dir, _ = bench
    item = load_mmhal(path, image_dir)[0]
    prompt = judge_prompt(item, "It is grey.")
    for text in (
        "Rating: 6, very informative with good analysis",
        "Rating: 0, not informative, with hallucination",
        "### Image Contents\nCat, Dog",
        "### Question\nWhat color is the cat?",
        "### Standard Human-Generated Answer\nreference 0",
        "### LMM Response to Evaluate\nIt is grey.",
    ):
        assert text in prompt


def test_image_found_by_image_id_when_src_basename_is_missing(bench):
    path, image_dir, _ = bench
    (image_dir / "img0_o.jpg").rename(image_dir / "img0.png")
    assert load_mmhal(path, image_dir)[0].image_path == image_dir / "img0.png"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Rating: 4, somewhat informative, no hallucination", 4),
        ("**Rating:** 2", 2),
        ("rating of 5", 5),
        ("I considered rating: 6 but the final Rating: 1", 1),
        ("Rating: 7", None),
        ("Rating: 3 out of 6", 3),
        ("The response is fine.", None),
        ("", None),
    ],
)
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected


def test_malformed_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("[{")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        load_mmhal(path, tmp_path)


def test_not_a_list(tmp_path):
    path = tmp_path / "dict.json"
    path.write_text(json.dumps({"question": "?"}))
    with pytest.raises(ValueError, match=r"dict\.json: expected a non-empty JSON list"):
        load_mmhal(path, tmp_path)


def test_missing_key_names_the_entry(bench):
    path, image_dir, entries = bench
    del entries[3]["gt_answer"]
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"mmhal\.json: entry 3 lacks the key\(s\) gt_answer"):
        load_mmhal(path, image_dir)


def test_missing_image_names_the_entry(bench):
    path, image_dir, _ = bench
    (image_dir / "img1_o.jpg").unlink()
    with pytest.raises(ValueError, match=r"mmhal\.json: entry 1: image .*img1_o\.jpg is not in"):
        load_mmhal(path, image_dir)


def test_a_judge_server_rates_each_answer_and_each_question_is_tallied_for_the_gate(bench):
    from tests.fake_judge import FakeJudge
    from training.evaluation.mmhal import OpenAIJudge

    path, image_dir, _ = bench
    server = FakeJudge(lambda prompt, _: next(r for q, r in REVIEWS.items() if f"\n{q}\n" in prompt))
    judge = OpenAIJudge("http://judge.test/v1", "judge-model", "sk-judge", http_client=server.client())
    report = evaluate_mmhal(load_mmhal(path, image_dir), judge, EchoModel(), progress=False, per_scene=True)
    assert [body["model"] for body in server.requests] == ["judge-model"] * 5
    prompts = [body["messages"][0]["content"] for body in server.requests]  # asked concurrently: any order
    assert any("### LMM Response to Evaluate\nanswer to What color is the cat?" in prompt for prompt in prompts)
    # ratings 5, 2, 6, 3 and one review without a rating, which counts in neither metric
    assert (report["average_score"], report["hallucination_rate"]) == (16 / 4, 1 / 4)
    assert report["per_scene"] == {
        "scenes": ["0:img0", "1:img1", "2:img2", "3:img3", "4:img4"],
        "average_score": [[5, 1], [2, 1], [6, 1], [3, 1], [0, 0]],
        "hallucination_rate": [[0, 1], [1, 1], [0, 1], [0, 1], [0, 0]],
    }


def test_a_question_file_without_image_src_names_the_entry(bench):
    path, image_dir, entries = bench
    del entries[0]["image_src"]
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"mmhal\.json: entry 0 lacks the key\(s\) image_src$"):
        load_mmhal(path, image_dir)


def test_a_judge_that_is_down_is_one_clear_line():
    from training.evaluation.mmhal import OpenAIJudge

    with pytest.raises(ConnectionError, match=r"^the judge is not reachable: cannot reach endpoint") as error:
        OpenAIJudge("http://127.0.0.1:9/v1", "judge-model").judge(["Rate this."])
    assert "\n" not in str(error.value)
