"""`alignloop eval` on the bundled model: in-process and through the real vLLM server, scored the same way."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.evaluation.models import OpenAIChatModel, TransformersChatModel
from training.evaluation.shapes_bench import evaluate_shapes
from training.shapes_world import ShapesWorld

pytestmark = pytest.mark.slow
NUM_IMAGES = 40


@pytest.fixture(scope="module")
def in_process_report(bundled_model):
    return evaluate_shapes(TransformersChatModel(bundled_model), ShapesWorld(), "test", NUM_IMAGES, progress=False)


def test_bundled_model_is_trained_and_hallucinates(in_process_report):
    report = in_process_report
    assert report["pope_random_accuracy"] >= 0.8
    assert report["attribute_accuracy"] >= 0.7
    assert report["object_recall"] >= 0.8
    assert report["chair_s"] > 0.0  # the co-occurrence prior shows even on 40 images


def test_endpoint_scores_match_in_process_scores(vllm_server, in_process_report):
    served = OpenAIChatModel(f"{vllm_server.base_url}/v1", "shapes-llava")
    report = evaluate_shapes(served, ShapesWorld(), "test", NUM_IMAGES, progress=False)
    # Same greedy answers up to float noise between vLLM's CPU kernels and transformers' attention.
    for key in ("pope_random_accuracy", "pope_adversarial_accuracy", "attribute_accuracy", "chair_s", "object_recall"):
        assert abs(report[key] - in_process_report[key]) <= 0.05, key


def test_eval_command_writes_json_and_chart(bundled_model, tmp_path):
    alignloop = Path(sys.executable).parent / "alignloop"
    result = subprocess.run(
        [
            str(alignloop),
            "eval",
            "--model",
            str(bundled_model),
            "--num-images",
            "4",
            "--output",
            str(tmp_path / "r.json"),
            "--chart",
            str(tmp_path / "r.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "POPE" in result.stdout and "CHAIR" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["num_images"] == 4 and 0.0 <= report["pope_random_accuracy"] <= 1.0
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
