"""`alignloop train dpo`: TRL's DPOTrainer on an `alignloop feedback export --style trl` directory, its adapter
written like any version and, with --publish, registered as a candidate."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file

from alignloop.cli import main
from online_rl.export import export_feedback
from online_rl.schema import FeedbackEvent
from online_rl.store import open_store
from tests.online_rl.store_helpers import make_generation
from training.lora import language_model_lora
from training.tiny_llava import load_checkpoint

COLORS = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 180, 60)}


@pytest.fixture
def exported(tmp_path):
    """Three corrected descriptions in a real store, exported in TRL's format."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with open_store(url) as store:
        for index, (name, rgb) in enumerate(COLORS.items()):
            make_generation(
                store, f"g-{index}", color=rgb, question="Describe the image.", response=f"One {name} square, a moon."
            )
            store.add_feedback(
                FeedbackEvent(generation_id=f"g-{index}", user_id="u-a", rating=-1, correction=f"One {name} square.")
            )
        export_feedback(store, tmp_path / "pairs", what="pairs", style="trl")
    return url, tmp_path / "pairs"


def test_train_dpo_publishes_a_candidate_whose_every_lora_weight_moved(exported, bundled_model, tmp_path, capsys):
    url, pairs = exported
    args = ["--data", str(pairs), "--model", str(bundled_model), "--output-dir", str(tmp_path / "out")]
    args += ["--max-steps", "2", "--batch-pairs", "3", "--lora-rank", "4", "--publish", "--store-url", url]
    assert main(["train", "dpo", *args, "--adapter-dir", str(tmp_path / "adapters")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["name"], summary["status"], summary["metrics"]["steps"]) == ("policy-v1", "candidate", 2)
    with open_store(url) as store:
        record = store.get_adapter(1)
    assert record.algorithm == "dpo-trl" and record.base_model == str(bundled_model.resolve())
    config = json.loads((tmp_path / "adapters" / "policy-v1" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(bundled_model.resolve()) and config["r"] == 4
    trained = load_file(str(tmp_path / "adapters" / "policy-v1" / "adapter_model.safetensors"))
    model, _ = load_checkpoint(bundled_model)
    torch.manual_seed(0)
    initial = get_peft_model(model, language_model_lora(rank=4)).state_dict()
    initial = {k.replace(".default", ""): v for k, v in initial.items() if "lora_" in k}
    assert trained.keys() == initial.keys()
    assert all(not torch.equal(trained[k], initial[k]) for k in trained)  # LoRA A and B both moved in 2 steps


def test_train_dpo_reports_a_missing_image_in_one_line(exported, bundled_model, tmp_path, capsys):
    _, pairs = exported
    next((pairs / "images").iterdir()).unlink()
    assert main(["train", "dpo", "--data", str(pairs), "--model", str(bundled_model)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alignloop train: error: ") and "is missing" in err[0]
