"""The follow-up experiment's questions and scoring, by hand."""

from training.experiments.fact_rlhf.follow_ups import accuracy, questions
from training.shapes_world import QAItem, Scene, SceneObject, ShapesWorld


def test_questions_probe_a_present_and_an_absent_shape_and_ask_a_unique_shapes_color():
    world = ShapesWorld()
    scene = Scene("test", 0, (SceneObject("star", "red", "small", 0, 0),))
    items = questions(world, scene)
    assert [(item.kind, item.answer) for item in items] == [
        ("presence", "Yes."),
        ("presence", "No."),
        ("color", "Red."),
    ]
    assert items[0].target == "star" and items[1].target != "star"
    assert items[2].question == "What color is the star?"
    assert questions(world, scene) == items  # the same questions for every model


def test_accuracy_counts_exact_answers_of_one_kind():
    items = [QAItem("presence", "q1", "Yes."), QAItem("presence", "q2", "No."), QAItem("color", "q3", "Red.")]
    assert accuracy([" yes.", "Yes.", "Blue."], items, "presence") == 0.5
    assert accuracy([" yes.", "Yes.", "red."], items, "color") == 1.0


def test_pixel_noise_renders_every_model_s_images_with_that_noise(monkeypatch, capsys):
    import json

    from training.experiments.fact_rlhf import follow_ups

    seen = []
    monkeypatch.setattr(
        follow_ups,
        "score_model",
        lambda model, world, scenes: (
            seen.append((model, world.config.pixel_noise_std, len(scenes))) or {"model": model}
        ),
    )
    assert follow_ups.main(["--models", "a", "b", "--scenes", "3", "--pixel-noise", "70"]) == 0
    assert seen == [("a", 70.0, 3), ("b", 70.0, 3)]
    assert json.loads(capsys.readouterr().out) == [{"model": "a"}, {"model": "b"}]
    follow_ups.main(["--models", "a", "--scenes", "1"])
    assert seen[-1] == ("a", 6.0, 1)  # ShapesWorld's own noise by default
