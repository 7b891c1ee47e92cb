"""`alignloop train dpo` on exported feedback produces a registered version that the gateway serves by its pinned
name and `alignloop eval --endpoint ... --served-model llava-rlhf@vN` scores, served exactly as trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from online_rl.export import export_feedback
from online_rl.schema import FeedbackEvent
from online_rl.served_check import check_served_exactly, shapes_probes
from online_rl.store import open_store
from tests.integration.conftest import ALICE
from tests.online_rl.store_helpers import make_generation

pytestmark = pytest.mark.slow
ALIGNLOOP = Path(sys.executable).parent / "alignloop"


def test_a_trl_trained_version_is_registered_served_exactly_and_scored(
    gateway, gateway_store, gateway_store_url, vllm_server, bundled_model, tmp_path
):
    feedback_url = f"sqlite:///{tmp_path / 'feedback.db'}"
    with open_store(feedback_url) as store:
        for index, (name, rgb) in enumerate({"red": (200, 30, 30), "blue": (30, 30, 200)}.items()):
            make_generation(store, f"g-{index}", color=rgb, question="Describe the image.", response=f"A {name} moon.")
            store.add_feedback(
                FeedbackEvent(generation_id=f"g-{index}", user_id="u-a", rating=-1, correction=f"A {name} square.")
            )
        export_feedback(store, tmp_path / "pairs", what="pairs", style="trl")
    train = [str(ALIGNLOOP), "train", "dpo", "--data", str(tmp_path / "pairs"), "--model", str(bundled_model)]
    train += ["--output-dir", str(tmp_path / "out"), "--max-steps", "2", "--publish", "--store-url", gateway_store_url]
    train += ["--adapter-dir", vllm_server.config.adapter_dir]
    done = subprocess.run(train, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    version = summary["version"]
    assert gateway_store.get_adapter(version).status == "candidate"

    served = f"llava-rlhf@v{version}"
    adapter = gateway_store.get_adapter(version).path
    assert check_served_exactly(gateway.url, served, adapter, bundled_model, shapes_probes(3), api_key=ALICE) == []
    evaluate = [str(ALIGNLOOP), "eval", "--endpoint", f"{gateway.url}/v1", "--served-model", served]
    evaluate += ["--split", "validation", "--num-images", "4", "--output", str(tmp_path / "eval.json")]
    done = subprocess.run(
        evaluate, capture_output=True, text=True, timeout=600, env=dict(os.environ, ALIGNLOOP_API_KEY=ALICE)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert {"chair_s", "pope_adversarial_accuracy", "object_recall"} <= set(report)
