"""CHAIR on real images: object hallucination in a model's descriptions of images whose objects are annotated.

CHAIR (Rohrbach et al., EMNLP 2018) reads the MSCOCO objects a description names and compares them with the objects
the image holds. The objects an image holds come from COCO-style annotation files: an instances file
(`instances_val2014.json`: each annotation's category) and, optionally, a captions file (`captions_val2014.json`:
the objects its reference captions name, as the original code also counts them). The words that name an object are
CHAIR's published synonym list (`data/chair_synonyms.txt`, 80 MSCOCO categories).

Reading a description, as the original does: lowercase, tokenize, singularize, merge MSCOCO's two-word names
("hot dog", "teddy bear"; "baby bird" is a bird, "passenger train" a train, "bow tie" a tie), drop "seat" when
"toilet" is named too, keep the words on the synonym list and map each to its category. Every mention counts.

- CHAIR_s: descriptions naming at least one absent object / descriptions;
- CHAIR_i: mentions of absent objects / mentions of objects;
- object recall: present objects named / present objects.

Simplifications: tokens are runs of letters, and a plural becomes the first of its possible singulars that CHAIR's
list knows ("horses" -> horse, "buses" -> bus; a listed word such as "skis" stays) instead of nltk and pattern.en;
the list's entries are stripped of spaces (the original keeps " motor bike" and " cheesecake" with a leading space,
so they never match). Scores on the same descriptions can differ from the original code's in rare words.

    alignloop eval --benchmark chair --annotations coco/annotations/instances_val2014.json \\
        --image-dir coco/val2014 --num-images 500 --endpoint http://localhost:8000/v1 --served-model llava-rlhf
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from training.evaluation.models import ChatModel, ChatRequest

logger = logging.getLogger(__name__)

SYNONYMS_FILE = Path(__file__).parent / "data" / "chair_synonyms.txt"
CHAIR_PROMPT = "Please describe this image in detail."
CHAIR_MAX_TOKENS = 512
# MSCOCO's two-word names, and the qualifiers that must not fire "person" ("baby bird" is a bird).
DOUBLE_WORDS = (
    "motor bike",
    "motor cycle",
    "air plane",
    "traffic light",
    "street light",
    "traffic signal",
    "stop light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "suit case",
    "sports ball",
    "baseball bat",
    "baseball glove",
    "tennis racket",
    "wine glass",
    "hot dog",
    "cell phone",
    "mobile phone",
    "teddy bear",
    "hair drier",
    "potted plant",
    "bow tie",
    "laptop computer",
    "stove top oven",
    "home plate",
    "train track",
)
ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
VEHICLE_WORDS = ("jet", "train")
IRREGULAR_PLURALS = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "geese": "goose",
    "mice": "mouse",
    "knives": "knife",
    "calves": "calf",
}
_TOKEN = re.compile(r"[a-z]+")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """CHAIR's synonym list: every word that names an MSCOCO object, and the category each names."""

    category_of: dict[str, str]
    double_words: dict[str, str]
    known: frozenset[str]  # the listed words and the parts of the two-word names: what a plural may reduce to

    @classmethod
    def load(cls, path: str | Path = SYNONYMS_FILE) -> Vocabulary:
        category_of: dict[str, str] = {}
        for line in Path(path).read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            words = [word.strip() for word in line.split(",") if word.strip()]
            for word in words:
                category_of[word] = words[0]
        double = {word: word for word in DOUBLE_WORDS}
        double |= {f"{qualifier} {animal}": animal for animal in ANIMAL_WORDS for qualifier in ("baby", "adult")}
        double |= {f"passenger {vehicle}": vehicle for vehicle in VEHICLE_WORDS}
        double |= {"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"}
        parts = {part for name in double for part in name.split()}
        return cls(category_of, double, frozenset(category_of) | parts)

    def singular(self, word: str) -> str:
        """The word as the list spells it: itself when known, else the first of its possible singulars (a few
        irregular ones; -ies -> -y, -es, -s) that is known, else itself."""
        if word in self.known:
            return word
        if word in IRREGULAR_PLURALS:
            return IRREGULAR_PLURALS[word]
        candidates = [word[:-3] + "y"] if word.endswith("ies") else []
        candidates += [word[:-2]] if word.endswith("es") else []
        candidates += [word[:-1]] if word.endswith("s") else []
        return next((candidate for candidate in candidates if candidate in self.known), word)

    def mentions(self, text: str) -> list[tuple[str, str]]:
        """(word, category) for every mention of an MSCOCO object in the text, in order."""
        words = [self.singular(token) for token in _TOKEN.findall(text.lower())]
        merged, index = [], 0
        while index < len(words):
            pair = " ".join(words[index : index + 2])
            if index + 1 < len(words) and pair in self.double_words:
                merged.append(self.double_words[pair])
                index += 2
            else:
                merged.append(words[index])
                index += 1
        if "toilet" in merged and "seat" in merged:  # "the seat of the toilet" is no chair
            merged = [word for word in merged if word != "seat"]
        return [(word, self.category_of[word]) for word in merged if word in self.category_of]

    def category(self, name: str) -> str:
        """The category an annotation's category name stands for (itself when it is not on the list)."""
        name = name.strip().lower()
        return self.category_of.get(name) or self.category_of.get(self.singular(name)) or name


@lru_cache(maxsize=1)
def default_vocabulary() -> Vocabulary:
    return Vocabulary.load()


@dataclasses.dataclass(frozen=True)
class ChairItem:
    """One annotated image: its file and the MSCOCO categories it holds."""

    image: str
    image_path: Path
    objects: frozenset[str]


def load_annotations(paths: Sequence[str | Path], vocabulary: Vocabulary | None = None) -> dict[str, set[str]]:
    """{image file name: categories it holds} from COCO-style JSON files: instances (each annotation's
    `category_id`, named in `categories`) and captions (the objects each `caption` names). Raises ValueError naming
    the file when it is not such a file."""
    vocabulary = vocabulary or default_vocabulary()
    objects: dict[str, set[str]] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"annotation file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(f"{path}: not a COCO annotation file (no 'images' list)")
        if not isinstance(data.get("annotations"), list):
            raise ValueError(f"{path}: not a COCO annotation file (no 'annotations' list)")
        names = {}
        for index, image in enumerate(data["images"]):
            if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
                raise ValueError(f"{path}: images[{index}] lacks 'id' or 'file_name'")
            names[image["id"]] = str(image["file_name"])
            objects.setdefault(names[image["id"]], set())
        categories = {c["id"]: vocabulary.category(str(c["name"])) for c in data.get("categories") or []}
        for index, annotation in enumerate(data["annotations"]):
            if not isinstance(annotation, dict) or annotation.get("image_id") not in names:
                raise ValueError(f"{path}: annotations[{index}] names no image of the file")
            found = objects[names[annotation["image_id"]]]
            if "category_id" in annotation:
                if annotation["category_id"] not in categories:
                    raise ValueError(f"{path}: annotations[{index}] has an unknown category_id")
                found.add(categories[annotation["category_id"]])
            elif "caption" in annotation:
                found.update(category for _, category in vocabulary.mentions(str(annotation["caption"])))
            else:
                raise ValueError(f"{path}: annotations[{index}] has neither category_id nor caption")
    return objects


def load_chair(
    annotations: Sequence[str | Path], image_dir: str | Path, limit: int = 0, vocabulary: Vocabulary | None = None
) -> list[ChairItem]:
    """The annotated images found in image_dir, by file name, the first `limit` of them (0: all)."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image directory {image_dir} does not exist")
    objects = load_annotations(annotations, vocabulary)
    items = [
        ChairItem(name, image_dir / name, frozenset(found))
        for name, found in sorted(objects.items())
        if (image_dir / name).is_file()
    ]
    if not items:
        raise ValueError(f"no image of {', '.join(map(str, annotations))} is in {image_dir}")
    return items[:limit] if limit else items


def description_tallies(description: str, objects: frozenset[str], vocabulary: Vocabulary) -> dict:
    """One description's counts: hallucinated (0/1), mentions, hallucinated mentions, present and present named."""
    mentioned = [category for _, category in vocabulary.mentions(description)]
    wrong = [category for category in mentioned if category not in objects]
    return {
        "hallucinated": int(bool(wrong)),
        "mentions": len(mentioned),
        "hallucinated_mentions": len(wrong),
        "present": len(objects),
        "present_named": len(objects & set(mentioned)),
        "hallucinated_objects": wrong,
    }


def chair_report(items: Sequence[ChairItem], descriptions: Sequence[str], vocabulary: Vocabulary | None = None) -> dict:
    """CHAIR_s, CHAIR_i and object recall of the descriptions, with counts and per-image tallies (`per_scene`: the
    image file names, and [numerator, denominator] of each metric per image) for the paired gate."""
    vocabulary = vocabulary or default_vocabulary()
    rows = [description_tallies(d, item.objects, vocabulary) for item, d in zip(items, descriptions, strict=True)]
    total = {key: sum(row[key] for row in rows) for key in rows[0] if key != "hallucinated_objects"} if rows else {}

    def ratio(numerator: str, denominator: str) -> float:
        return total[numerator] / total[denominator] if rows and total[denominator] else 0.0

    hallucinated = Counter(category for row in rows for category in row["hallucinated_objects"])
    return {
        "chair_s": total["hallucinated"] / len(rows) if rows else 0.0,
        "chair_i": ratio("hallucinated_mentions", "mentions"),
        "object_recall": ratio("present_named", "present"),
        "num_images": len(rows),
        "counts": {**total, "hallucinated_objects": dict(hallucinated.most_common())},
        "per_scene": {
            "scenes": [item.image for item in items],
            "chair_s": [[row["hallucinated"], 1] for row in rows],
            "chair_i": [[row["hallucinated_mentions"], row["mentions"]] for row in rows],
            "object_recall": [[row["present_named"], row["present"]] for row in rows],
        },
    }


def evaluate_chair(
    model: ChatModel,
    items: Sequence[ChairItem],
    prompt: str = CHAIR_PROMPT,
    max_tokens: int = CHAIR_MAX_TOKENS,
    chunk_size: int = 16,
    progress: bool = True,
    samples: int = 3,
) -> dict:
    """Asks the model to describe each image and scores the descriptions (`chair_report`); the report names the
    prompt and the token cap, since CHAIR depends on both, and keeps the first `samples` descriptions."""
    descriptions: list[str] = []
    for start in tqdm(range(0, len(items), chunk_size), desc="CHAIR descriptions", disable=not progress):
        chunk = items[start : start + chunk_size]
        requests = [ChatRequest(_load_image(item.image_path), prompt, max_tokens) for item in chunk]
        descriptions += model.answer(requests)
    report = chair_report(items, descriptions)
    report |= {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "samples": [{"image": i.image, "description": d} for i, d in zip(items[:samples], descriptions[:samples])],
    }
    logger.info(
        "chair eval num_images=%d chair_s=%.4f chair_i=%.4f object_recall=%.4f",
        report["num_images"],
        report["chair_s"],
        report["chair_i"],
        report["object_recall"],
    )
    return report


def _load_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def format_table(report: dict) -> str:
    """The CHAIR report as a plain-text table."""
    lines = [
        f"CHAIR, {report['num_images']} images, at most {report.get('max_tokens', '?')} tokens a description",
        "",
        f"{'chair_s':>10}{'chair_i':>10}{'recall':>10}",
        f"{report['chair_s']:>10.3f}{report['chair_i']:>10.3f}{report['object_recall']:>10.3f}",
    ]
    top = list(report["counts"].get("hallucinated_objects", {}).items())[:5]
    if top:
        lines += ["", "most hallucinated: " + ", ".join(f"{name} ({count})" for name, count in top)]
    return "\n".join(lines)
