"""The model card is written from the run's own files: its numbers are the summary's and the report's."""

import json

from training.evaluation.metrics import ANSWER_KINDS, POPE_SETTINGS
from training.model_card import HAND_WRITTEN_MARKER, write_model_card


def fake_report() -> dict:
    report = {
        "split": "test",
        "num_images": 500,
        "chair_s": 0.321,
        "chair_i": 0.123,
        "object_recall": 0.951,
        "attribute_accuracy": 0.876,
        "counts": {"questions": {"color": 10}},
    }
    for setting in POPE_SETTINGS:
        for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            report[f"pope_{setting}_{key}"] = 0.5
    report["pope_random_accuracy"] = 0.912
    for kind in ANSWER_KINDS:
        report[f"{kind}_accuracy"] = 0.7
    return report


def test_card_reports_the_runs_time_steps_and_metrics(tmp_path):
    summary = {
        "parameters": 4_600_000,
        "minutes": 31.4,
        "torch_threads": 2,
        "vision_pretrain_steps": 2000,
        "grounding_steps": 400,
        "steps": 1400,
        "val_loss": 0.1234,
        "config": {"seed": 0, "batch_size": 32, "learning_rate": 0.001, "max_turns": 8},
        "world": {"cooccurrence_bias": 0.9, "caption_noise": 0.75, "probe_noise": 0.25},
    }
    (tmp_path / "training_summary.json").write_text(json.dumps(summary))
    (tmp_path / "eval.json").write_text(json.dumps(fake_report()))
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"stage": "vision", "step": 1, "loss": 2.0},
                {"stage": "sft", "step": 1, "loss": 1.0, "val_loss": 1.1},
            ]
        )
    )
    card = write_model_card(tmp_path).read_text()
    assert "**31 minutes**" in card and "4.6M parameters" in card
    assert "| 1 grounding | 400 |" in card and "| 2 SFT | 1400 |" in card
    assert "0.912" in card and "0.321" in card and "--num-images 500" in card
    assert "make model" in card
    flat = " ".join(card.split())
    assert (
        "probability 0.9" in flat and "named anyway in 75%" in flat and "in 25% of such scenes' conversations" in flat
    )
    assert "up to 8 per image" in flat
    assert "| 5 chat |" not in card  # a model without the chat stage
    summary["chat_steps"] = 300
    summary["config"] |= {"chat_share": 0.5, "chat_turns": 12, "chat_learning_rate": 0.0003}
    (tmp_path / "training_summary.json").write_text(json.dumps(summary))
    card = write_model_card(tmp_path).read_text()
    assert "| 5 chat | 300 | the same, with 0.5 of the conversations long chats (12 turns" in card
    assert "| 6 read |" not in card
    summary["read_steps"] = 250
    summary["config"] |= {"read_share": 0.5, "read_blank_share": 0.5, "read_learning_rate": 0.0003}
    (tmp_path / "training_summary.json").write_text(json.dumps(summary))
    card = write_model_card(tmp_path).read_text()
    assert "| 6 read | 250 | the same, with 0.5 of the conversations given the scene's facts as text" in card
    assert (
        "(0.5 of those with a blank image, 0.33 descriptions), at 0.0003 |" in card
    )  # a summary from before the share
    summary["config"]["read_description_share"] = 0.5
    (tmp_path / "training_summary.json").write_text(json.dumps(summary))
    assert "(0.5 of those with a blank image, 0.5 descriptions), at 0.0003 |" in write_model_card(tmp_path).read_text()
    summary["config"]["read_quiz_share"] = 0.25
    (tmp_path / "training_summary.json").write_text(json.dumps(summary))
    card = write_model_card(tmp_path).read_text()
    assert "(0.5 of those with a blank image, 0.25 attribute quizzes and of the rest 0.5 descriptions), at" in card
    assert (tmp_path / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_regenerating_keeps_the_hand_written_part_and_says_how_the_checkpoint_was_made(tmp_path):
    summary = {
        "parameters": 4_600_000,
        "minutes": 63.0,
        "torch_threads": 2,
        "vision_pretrain_steps": 2000,
        "steps": 1400,
        "val_loss": 0.05,
        "config": {"seed": 0, "batch_size": 32, "learning_rate": 0.001, "max_turns": 8},
        "made_by": "stages 0-3 are one run; stage 4 ran on its weights",
    }
    (tmp_path / "training_summary.json").write_text(json.dumps(summary))
    (tmp_path / "eval.json").write_text(json.dumps(fake_report()))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"stage": "sft", "step": 1, "loss": 1.0}))
    first = write_model_card(tmp_path).read_text()
    assert first.rstrip().endswith(HAND_WRITTEN_MARKER)  # a new card: nothing written by hand yet
    assert "How this checkpoint was made: stages 0-3 are one run; stage 4 ran on its weights." in first

    history = "## How the recipe was chosen\n\nA sweep, then a seed.\n"
    card = tmp_path / "README.md"
    card.write_text(first.replace("0.321", "9.999") + "\n" + history)
    again = write_model_card(tmp_path).read_text()
    assert again == first + history  # the generated part is written afresh, the hand-written part is kept
