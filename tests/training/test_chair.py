"""CHAIR on real descriptions: COCO-style instances (and captions) files, the synonym list's mapping, exact CHAIR_s,
CHAIR_i and recall by hand, per-image tallies, and one clear line for a bad annotation file."""

import pytest

from tests.real_data import DESCRIPTIONS, coco_name, write_coco
from training.evaluation.chair import SYNONYMS_FILE, Vocabulary, evaluate_chair, format_table, load_chair


@pytest.fixture
def coco(tmp_path):
    return write_coco(tmp_path)


class InOrder:
    def __init__(self, answers):
        self.answers, self.requests = list(answers), []

    def answer(self, requests):
        self.requests += requests
        return [self.answers.pop(0) for _ in requests]


def test_the_synonym_list_is_chairs_and_maps_words_to_categories():
    assert "LisaAnne/Hallucination" in SYNONYMS_FILE.read_text().splitlines()[1]
    vocabulary = Vocabulary.load()
    assert len(set(vocabulary.category_of.values())) == 80
    mentions = vocabulary.mentions("Two horses, a baby elephant, wine glasses, motor bikes and the seat of a toilet.")
    assert mentions == [
        ("horse", "horse"),
        ("elephant", "elephant"),  # "baby elephant" is no person
        ("wine glass", "wine glass"),
        ("motor bike", "motorcycle"),
        ("toilet", "toilet"),  # "seat" with "toilet" is no chair
    ]


def test_chair_of_described_images_by_hand(coco):
    instances, _, image_dir = coco
    items = load_chair([instances], image_dir)
    assert [i.image for i in items] == [
        coco_name(101),
        coco_name(102),
        coco_name(103),
    ]  # 104's file is missing: left out
    assert items[0].objects == {"person", "dog", "dining table"}
    model = InOrder(DESCRIPTIONS)
    report = evaluate_chair(model, items, max_tokens=64, chunk_size=2, progress=False)
    assert [r.max_tokens for r in model.requests] == [64] * 3 and model.requests[0].image.size == (40, 30)
    assert report["chair_s"] == 1 / 3  # one description of three names an absent object (a cat)
    assert report["chair_i"] == 1 / 7  # 4 + 3 + 0 mentions, one of them absent
    assert report["object_recall"] == 5 / 6  # 3 of 3, 2 of 2, 0 of 1 present objects named
    assert report["counts"]["hallucinated_objects"] == {"cat": 1} and report["max_tokens"] == 64
    assert report["per_scene"] == {
        "scenes": [coco_name(101), coco_name(102), coco_name(103)],
        "chair_s": [[1, 1], [0, 1], [0, 1]],
        "chair_i": [[1, 4], [0, 3], [0, 0]],
        "object_recall": [[3, 3], [2, 2], [0, 1]],
    }
    assert "0.333" in format_table(report)


def test_a_captions_file_adds_the_objects_its_captions_coco_name(coco):
    instances, captions, image_dir = coco
    items = load_chair([instances, captions], image_dir, limit=2)
    assert len(items) == 2 and items[1].objects == {"car", "traffic light", "bus"}
    report = evaluate_chair(InOrder(DESCRIPTIONS[:2]), items, progress=False)
    assert report["object_recall"] == 5 / 6  # 3 of 3, and 2 of 3 now that a bus is there too


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("[1, 2]", "no 'images' list"),
        ('{"images": [{"id": 1}], "annotations": []}', "images[0] lacks 'id' or 'file_name'"),
        ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2}]}', "names no image"),
        (
            '{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "category_id": 5}]}',
            "unknown category_id",
        ),
    ],
)
def test_a_bad_annotation_file_is_one_clear_line(tmp_path, content, fragment):
    path = tmp_path / "instances.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"instances\.json") as error:
        load_chair([path], tmp_path)
    assert fragment in str(error.value)


def test_annotations_without_any_image_in_the_folder_say_so(coco, tmp_path):
    instances, _, _ = coco
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no image of .*instances_val2014\.json is in"):
        load_chair([instances], empty)
