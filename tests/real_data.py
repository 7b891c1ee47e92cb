"""Small files in the real benchmarks' formats, made by the tests themselves: POPE question files with rendered images,
COCO-style instances and captions files with images, and an MMHal-Bench question file with images."""

from __future__ import annotations

import json

from PIL import Image


def write_pope(tmp_path, files: dict[str, list[tuple[str, str, str]]]) -> tuple[list, object]:
    """POPE question files (name -> [(image, object, label)]) and their rendered images under tmp_path/val2014."""
    image_dir = tmp_path / "val2014"
    image_dir.mkdir(exist_ok=True)
    paths, question_id = [], 0
    for name, rows in files.items():
        lines = []
        for image, thing, label in rows:
            question_id += 1
            if not (image_dir / image).exists():
                Image.new("RGB", (32, 24), (question_id * 20 % 255, 90, 160)).save(image_dir / image)
            lines.append(
                json.dumps(
                    {
                        "question_id": question_id,
                        "image": image,
                        "text": f"Is there a {thing} in the image?",
                        "label": label,
                    }
                )
            )
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths, image_dir


QUESTIONS = {
    "coco_pope_random.json": [
        ("COCO_val2014_000000000001.jpg", "dog", "yes"),
        ("COCO_val2014_000000000001.jpg", "zebra", "no"),
        ("COCO_val2014_000000000002.jpg", "car", "yes"),
        ("COCO_val2014_000000000002.jpg", "kite", "no"),
    ],
    "coco_pope_adversarial.json": [
        ("COCO_val2014_000000000001.jpg", "cat", "no"),
        ("COCO_val2014_000000000002.jpg", "truck", "no"),
        ("COCO_val2014_000000000003.jpg", "bench", "yes"),
    ],
}
# what the fake model answers, by the object asked about
ANSWERS = {
    "dog": "Yes, there is.",
    "zebra": "No.",
    "car": "There is no car.",  # FN
    "kite": "No",
    "cat": "Yes.",  # FP (adversarial)
    "truck": "No, there is not.",
    "bench": "Yes",
}


CATEGORIES = [
    {"id": 1, "name": "person"},
    {"id": 3, "name": "car"},
    {"id": 10, "name": "traffic light"},
    {"id": 15, "name": "bench"},
    {"id": 18, "name": "dog"},
    {"id": 67, "name": "dining table"},
]
IMAGES = {101: [1, 18, 67, 1], 102: [3, 10], 103: [15], 104: [3]}  # image id -> annotated categories; 104 has no file
DESCRIPTIONS = [
    "Two men sit at a table with their puppies. A cat sleeps nearby.",  # person, table, dog: present; cat: absent
    "A red car stops at the traffic lights next to another car.",  # car, traffic light, car: all present
    "It is a sunny day in the park.",  # names nothing
]


def coco_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


def write_coco(tmp_path):
    """A COCO instances file, a captions file naming a bus on image 102, and images 101-103 (104 has none)."""
    images = [{"id": i, "file_name": coco_name(i), "width": 40, "height": 30} for i in IMAGES]
    annotations = [
        {"id": n, "image_id": i, "category_id": c, "bbox": [0, 0, 1, 1]}
        for n, (i, c) in enumerate((i, c) for i, cs in IMAGES.items() for c in cs)
    ]
    instances = tmp_path / "instances_val2014.json"
    instances.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    captions = tmp_path / "captions_val2014.json"
    captions.write_text(
        json.dumps({"images": images, "annotations": [{"id": 1, "image_id": 102, "caption": "Buses at a light."}]})
    )
    image_dir = tmp_path / "val2014"  # POPE's images are COCO val2014's too
    image_dir.mkdir(exist_ok=True)
    for shade, image_id in enumerate((101, 102, 103)):
        Image.new("RGB", (40, 30), (shade * 60, 80, 120)).save(image_dir / coco_name(image_id))
    return instances, captions, image_dir


MMHAL_QUESTIONS = ["What is the dog lying on?", "How many cats are there?", "What color is the sofa?"]


def write_mmhal(tmp_path) -> tuple:
    """An MMHal-Bench question file (response_template.json's keys) and its images."""
    image_dir = tmp_path / "mmhal_images"
    image_dir.mkdir(exist_ok=True)
    entries = []
    for index, question in enumerate(MMHAL_QUESTIONS):
        Image.new("RGB", (20, 20), (10, index * 50, 10)).save(image_dir / f"img{index}_o.jpg")
        entries.append(
            {
                "question_type": ["attribute", "counting", "attribute"][index],
                "question_topic": "animal",
                "image_id": f"img{index}",
                "image_src": f"https://example.org/photos/img{index}_o.jpg",
                "image_content": ["Dog", "Sofa"],
                "question": question,
                "gt_answer": f"reference {index}",
            }
        )
    path = tmp_path / "response_template.json"
    path.write_text(json.dumps(entries))
    return path, image_dir


class Served:
    """A fake served model: POPE probes, MMHal questions and CHAIR descriptions, answered well (`good`) or badly."""

    def __init__(self, good: bool):
        self.good = good

    def answer(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request) -> str:
        if request.question.startswith("Is there a "):
            return ANSWERS[request.question.split("Is there a ")[1].split(" in")[0]] if self.good else "Yes."
        from training.evaluation.chair import CHAIR_PROMPT

        if request.question == CHAIR_PROMPT:
            return DESCRIPTIONS[request.image.getpixel((0, 0))[0] // 60] if self.good else "A cat and a dog."
        return "good answer" if self.good else "a sofa, a cat and three dogs"


def answerer(model_name: str) -> Served:
    return Served(good=model_name != "base")
