"""ShapesWorld: a deterministic scene world with exact ground truth, for training and measuring hallucination.

A scene holds 1 to 4 objects on a 3x3 grid; each object has a shape, a color, a size and a cell. Scenes are drawn
from a seeded random generator (scene `i` of a split always comes out the same), rendered with PIL at the model's
input size with jitter and pixel noise, and described by templates whose answers are exact.

Three knobs reproduce the causes of hallucination that LLaVA-RLHF and RLHF-V name (docs/papers.md):

- co-occurrence bias: in training scenes, an object of a paired shape (star/moon, heart/diamond, square/triangle)
  brings its partner along with probability `cooccurrence_bias`, usually small (`partner_small`), so the language
  prior learns "a star means a moon" exactly where the image is least clear;
- caption noise: when a shape's co-occurring partner is missing, a share `caption_noise` of training descriptions
  mention the partner anyway, right after its pair, like the over-generalised captions in real instruction data
  (the count sentence still counts what is there, so the ghost is the language prior's alone);
- probe noise: when a partner is missing, a share `probe_noise` of training conversations also ask whether the
  partner is there and answer "Yes", as question-answer data written from such captions does.

The train split carries all three; validation and test are clean and unbiased, so a model that learned the prior
instead of looking at the image is caught there. Splits are disjoint by seed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Iterator
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
# Scene `i` of a split is drawn from seed SPLIT_SEED_BASE[split] + i; the ranges never overlap.
SPLIT_SEED_BASE: dict[str, int] = {"train": 0, "validation": 1_000_000_000, "test": 2_000_000_000}
MAX_SCENES_PER_SPLIT = 1_000_000_000

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "moon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 200, 20),
    "purple": (148, 60, 190),
    "orange": (255, 127, 14),
}
SIZES: tuple[str, ...] = ("small", "large")
GRID = 3
CELL_NAMES: tuple[tuple[str, ...], ...] = (
    ("top left", "top center", "top right"),
    ("middle left", "center", "middle right"),
    ("bottom left", "bottom center", "bottom right"),
)
# Object pairs that usually appear together in training scenes (symmetric).
COOCCURRING_PAIRS: tuple[tuple[str, str], ...] = (("star", "moon"), ("heart", "diamond"), ("square", "triangle"))
PARTNER: dict[str, str] = dict(COOCCURRING_PAIRS) | {b: a for a, b in COOCCURRING_PAIRS}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLURALS: dict[str, str] = {shape: ("crosses" if shape == "cross" else shape + "s") for shape in SHAPES}

DESCRIBE_PROMPT = "Describe the image in detail."
MC_SUFFIX = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """How scenes are drawn and rendered."""

    image_size: int = 96
    min_objects: int = 1
    max_objects: int = 4
    cooccurrence_bias: float = 0.9
    partner_small: float = 0.75  # a partner brought by the bias is usually small: hard to see, easy to assume
    caption_noise: float = 1.0  # of training descriptions whose scene misses a co-occurring partner
    probe_noise: float = 0.3  # of training conversations whose scene misses one: "Is there a <partner>?" "Yes."
    position_jitter: float = 0.12  # as a fraction of a cell
    color_jitter: int = 18
    pixel_noise_std: float = 6.0


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    row: int
    col: int

    @property
    def position(self) -> str:
        return CELL_NAMES[self.row][self.col]

    @property
    def phrase(self) -> str:
        """'a large red star'"""
        return f"a {self.size} {self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """One image's ground truth: its scene graph. `split` and `index` say how to draw it again."""

    split: str
    index: int
    objects: tuple[SceneObject, ...]

    @property
    def seed(self) -> int:
        return SPLIT_SEED_BASE[self.split] + self.index

    @property
    def shapes(self) -> set[str]:
        return {obj.shape for obj in self.objects}

    def count(self, shape: str | None = None) -> int:
        return sum(1 for obj in self.objects if shape is None or obj.shape == shape)

    def to_dict(self) -> dict:
        return {"split": self.split, "index": self.index, "objects": [dataclasses.asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        return cls(data["split"], int(data["index"]), tuple(SceneObject(**o) for o in data["objects"]))


@dataclasses.dataclass(frozen=True)
class QAItem:
    """One question about a scene with its exact answer.

    kind: description | presence | color | shape | size | count | position | multiple_choice.
    For presence questions made for POPE, `pope` names the negative-sampling setting (random, popular,
    adversarial) and `target` the probed shape. For multiple choice, `choices` holds the options A-D.
    """

    kind: str
    question: str
    answer: str
    target: str | None = None
    pope: str | None = None
    choices: tuple[str, ...] | None = None


def _biased(split: str) -> bool:
    return split == "train"


class ShapesWorld:
    """Draws, renders and describes scenes. Everything is a pure function of (split, index) and the config."""

    def __init__(self, config: WorldConfig | None = None):
        self.config = config or WorldConfig()

    # ---- scenes -------------------------------------------------------------------------------------------
    def scene(self, split: str, index: int) -> Scene:
        if split not in SPLIT_SEED_BASE:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if not 0 <= index < MAX_SCENES_PER_SPLIT:
            raise ValueError(f"scene index {index} is out of range")
        rng = random.Random(SPLIT_SEED_BASE[split] + index)
        cfg = self.config
        n_objects = rng.randint(cfg.min_objects, cfg.max_objects)
        cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], GRID * GRID)
        objects: list[SceneObject] = []
        for row, col in cells[:n_objects]:
            objects.append(SceneObject(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES), row, col))
        if _biased(split) and cfg.cooccurrence_bias > 0:
            objects = self._add_partners(objects, cells[n_objects:], rng)
        objects.sort(key=lambda o: (o.row, o.col))
        return Scene(split, index, tuple(objects))

    def _add_partners(self, objects: list[SceneObject], free_cells: list[tuple[int, int]], rng: random.Random):
        """Co-occurrence bias: a paired shape brings its partner along with probability cooccurrence_bias."""
        result = list(objects)
        for obj in objects:
            partner = PARTNER.get(obj.shape)
            if partner is None or partner in {o.shape for o in result} or rng.random() >= self.config.cooccurrence_bias:
                continue
            size = "small" if rng.random() < self.config.partner_small else "large"
            new = SceneObject(partner, rng.choice(list(COLORS)), size, 0, 0)
            if free_cells and len(result) < self.config.max_objects:
                row, col = free_cells.pop()
                result.append(dataclasses.replace(new, row=row, col=col))
            else:  # scene full: the partner replaces an object that is neither this one nor paired with it
                replaceable = [i for i, o in enumerate(result) if o is not obj and o.shape not in PARTNER]
                if not replaceable:
                    continue
                i = rng.choice(replaceable)
                result[i] = dataclasses.replace(new, row=result[i].row, col=result[i].col)
        return result

    def scenes(self, split: str, count: int, start: int = 0) -> Iterator[Scene]:
        for index in range(start, start + count):
            yield self.scene(split, index)

    # ---- rendering ----------------------------------------------------------------------------------------
    def render(self, scene: Scene, blank: bool = False) -> Image.Image:
        """The scene's image; `blank=True` draws its background and pixel noise without the objects (the SFT read
        stage's image for conversations answered from facts given as text)."""
        cfg = self.config
        size = cfg.image_size
        rng = np.random.default_rng(scene.seed + 7919)
        background = int(rng.integers(215, 240))
        canvas = Image.new("RGB", (size, size), (background,) * 3)
        cell = size / GRID
        for obj in () if blank else scene.objects:
            jitter = rng.uniform(-cfg.position_jitter, cfg.position_jitter, size=2) * cell
            cx = (obj.col + 0.5) * cell + jitter[0]
            cy = (obj.row + 0.5) * cell + jitter[1]
            extent = cell * (0.8 if obj.size == "large" else 0.42) * rng.uniform(0.92, 1.08)
            color = tuple(
                int(np.clip(v + rng.integers(-cfg.color_jitter, cfg.color_jitter + 1), 0, 255))
                for v in COLORS[obj.color]
            )
            mask = Image.new("L", (size, size), 0)
            _draw_shape(ImageDraw.Draw(mask), obj.shape, cx, cy, extent)
            canvas.paste(Image.new("RGB", (size, size), color), (0, 0), mask)
        pixels = np.asarray(canvas, dtype=np.float32)
        pixels += rng.normal(0.0, cfg.pixel_noise_std, pixels.shape)
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    # ---- text ---------------------------------------------------------------------------------------------
    def caption(self, scene: Scene) -> str:
        """A one-line caption listing every object: the 'facts' a Fact-RLHF reward model reads."""
        return _join_phrases([f"{o.phrase} at the {o.position}" for o in scene.objects]).capitalize() + "."

    def facts(self, scene: Scene) -> list[str]:
        """Ground-truth facts about the image, one short sentence each."""
        n = len(scene.objects)
        facts = [f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} object{'s' if n != 1 else ''} in the image."]
        facts += [f"There is {o.phrase} at the {o.position}." for o in scene.objects]
        return facts

    def missing_partners(self, scene: Scene) -> list[tuple[SceneObject, str]]:
        """(object, partner shape) for each object whose co-occurring partner is not in the scene."""
        return [
            (obj, PARTNER[obj.shape])
            for obj in scene.objects
            if obj.shape in PARTNER and PARTNER[obj.shape] not in scene.shapes
        ]

    def description(self, scene: Scene, noisy: bool | None = None) -> str:
        """The detailed description: a count sentence, then one sentence per object in reading order.

        Caption noise (the default on the train split): when an object's co-occurring partner is missing from the
        scene, the description mentions the partner anyway with probability `caption_noise`, in a sentence right
        after the object it usually comes with, the way an over-generalising annotator writes "a star and a moon"
        from habit. The count sentence counts only the objects that are there: a count that included the ghost
        would be a second, image-grounded witness against it, and a model that counts well then learns to drop the
        ghost instead of the prior that adds it. `noisy=True` always adds such a ghost (a random absent shape when
        no partner is missing); `noisy=False` gives the clean description.
        """
        rng = random.Random(scene.seed * 31 + 17)
        if noisy is None:
            noisy = (
                _biased(scene.split) and bool(self.missing_partners(scene)) and rng.random() < self.config.caption_noise
            )
        ghost, anchor = self._ghost_object(scene, rng) if noisy else (None, None)
        sentences = []
        for obj in scene.objects:
            sentences.append(object_sentence(obj))
            if ghost is not None and obj is anchor:
                sentences.append(object_sentence(ghost))
        n = len(scene.objects)
        head = f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} object{'s' if n != 1 else ''}."
        return " ".join([head, *sentences])

    def _ghost_object(self, scene: Scene, rng: random.Random) -> tuple[SceneObject | None, SceneObject | None]:
        """An absent object and the present object it follows: the missing partner of a present shape when there is
        one, else a random absent shape; it sits in the first free cell after its anchor in reading order."""
        taken = {(o.row, o.col) for o in scene.objects}
        if len(taken) == GRID * GRID:
            return None, None
        missing = self.missing_partners(scene)
        if missing:
            anchor, shape = rng.choice(missing)
        else:
            anchor = rng.choice(scene.objects)
            shape = rng.choice([s for s in SHAPES if s not in scene.shapes])
        start = anchor.row * GRID + anchor.col
        cell = next(
            c % (GRID * GRID)
            for c in range(start + 1, start + GRID * GRID)
            if divmod(c % (GRID * GRID), GRID) not in taken
        )
        row, col = divmod(cell, GRID)
        ghost = SceneObject(shape, rng.choice(list(COLORS)), rng.choice(SIZES), row, col)
        return ghost, anchor

    # ---- questions ----------------------------------------------------------------------------------------
    def presence_item(self, shape: str, present: bool, pope: str | None = None) -> QAItem:
        return QAItem("presence", f"Is there a {shape} in the image?", "Yes." if present else "No.", shape, pope)

    def questions(self, scene: Scene, rng: random.Random, noisy: bool | None = None) -> list[QAItem]:
        """Every question template that has an unambiguous answer for this scene (one of each kind); `noisy` goes to
        the description (caption noise on the train split by default, none with False)."""
        items: list[QAItem] = [QAItem("description", DESCRIBE_PROMPT, self.description(scene, noisy))]
        present = sorted(scene.shapes)
        absent = [s for s in SHAPES if s not in scene.shapes]
        if rng.random() < 0.5 or not absent:
            items.append(self.presence_item(rng.choice(present), True))
        else:
            items.append(self.presence_item(rng.choice(absent), False))
        obj = rng.choice(scene.objects)
        items += self.attribute_items(scene, obj)
        if rng.random() < 0.5:
            items.append(
                QAItem("count", "How many objects are there?", f"{NUMBER_WORDS[len(scene.objects)].capitalize()}.")
            )
        else:
            shape = rng.choice(SHAPES)
            n = scene.count(shape)
            items.append(
                QAItem("count", f"How many {PLURALS[shape]} are there?", f"{NUMBER_WORDS[n].capitalize()}.", shape)
            )
        if scene.count(obj.shape) == 1:
            items.append(self._multiple_choice(obj, rng))
        return items

    def attribute_items(self, scene: Scene, obj: SceneObject) -> list[QAItem]:
        """The questions that name `obj` by one attribute and ask another, where that attribute names it alone:
        color and size by its shape, its shape by its color, its position by both."""
        items = []
        if scene.count(obj.shape) == 1:
            items.append(QAItem("color", f"What color is the {obj.shape}?", f"{obj.color.capitalize()}.", obj.shape))
            items.append(QAItem("size", f"Is the {obj.shape} large or small?", f"{obj.size.capitalize()}.", obj.shape))
        if sum(1 for o in scene.objects if o.color == obj.color) == 1:
            items.append(
                QAItem("shape", f"What shape is the {obj.color} object?", f"{obj.shape.capitalize()}.", obj.color)
            )
        if sum(1 for o in scene.objects if (o.color, o.shape) == (obj.color, obj.shape)) == 1:
            items.append(
                QAItem("position", f"Where is the {obj.color} {obj.shape}?", f"At the {obj.position}.", obj.shape)
            )
        return items

    def _multiple_choice(self, obj: SceneObject, rng: random.Random) -> QAItem:
        if rng.random() < 0.5:
            question, truth, pool = f"What color is the {obj.shape}?", obj.color, list(COLORS)
        else:
            question, truth, pool = f"What shape is at the {obj.position}?", obj.shape, list(SHAPES)
        options = [truth, *rng.sample([p for p in pool if p != truth], 3)]
        rng.shuffle(options)
        letter = "ABCD"[options.index(truth)]
        lines = "\n".join(f"{'ABCD'[i]}. {option}" for i, option in enumerate(options))
        return QAItem("multiple_choice", f"{question}\n{lines}\n{MC_SUFFIX}", letter, truth, choices=tuple(options))

    def conversation(
        self, scene: Scene, max_turns: int = 5, description_share: float = 1 / 3, noisy: bool | None = None
    ) -> list[QAItem]:
        """A training conversation about one image; `noisy=False` leaves out the train split's caption and probe
        noise (every answer true to the scene), as the SFT read stage needs for answers taken from the facts.

        With probability `description_share` it is the single description turn; otherwise it is up to `max_turns`
        short questions in random order, without the description. Keeping the two apart matters: a question asked
        after a description in the same context can be answered by copying from the text, and a tiny model then
        never learns to look up the asked-about object in the image (it answers yes/no from the scene as a whole).
        """
        rng = random.Random(scene.seed * 13 + 5)
        items = self.questions(scene, rng, noisy)
        if rng.random() < description_share:
            return [items[0]]
        # Two yes/no probes in every short conversation, one about a present shape and one about an absent one:
        # looking an object up by its shape is the skill every other question builds on, and the one a tiny model
        # is slowest to find when it is a small share of the answers.
        probes = [self.presence_item(rng.choice(sorted(scene.shapes)), True)]
        absent = [s for s in SHAPES if s not in scene.shapes]
        if absent:
            probes.append(self.presence_item(rng.choice(absent), False))
        assumed = self.assumed_partner(scene, rng) if noisy is not False else None
        if assumed is not None:
            probes.append(self.presence_item(assumed, True))
        others = [item for item in items[1:] if item.kind != "presence"]
        rng.shuffle(others)
        questions = probes + others[: max(0, max_turns - len(probes))]
        rng.shuffle(questions)
        return questions[:max_turns]

    def quiz(self, scene: Scene, max_turns: int = 8) -> list[QAItem]:
        """Attribute questions about every object, at most `max_turns` of them in random order: the color and size of
        each object whose shape is unique, the shape of each whose color is unique, the position of each unique
        color-and-shape pair. Every answer is exact, without noise. Each one binds two attributes of one object
        ("What color is the cross?"), which reading a list of facts needs and a presence probe does not: for the SFT
        read stage, where a model that answers presence from the facts still took a color from the wrong object.
        """
        items = [item for obj in scene.objects for item in self.attribute_items(scene, obj)]
        random.Random(scene.seed * 37 + 19).shuffle(items)
        return items[:max_turns]

    def chat(self, scene: Scene, max_turns: int = 12) -> list[QAItem]:
        """A long chat about one image: the description and up to `max_turns - 1` short questions, the description
        at a random turn (the first one in about two chats of five). For the chat stage after SFT (`training.sft`),
        which teaches the model contexts of ~250-300 tokens with user turns after an answer, as a chat in the demo
        has and as the reward model's rating turn does.

        The short questions are every question of `questions` drawn about several objects (one draw each), plus a
        presence probe about every shape, present or not; on a train scene the probe noise of `conversation` applies.
        A question after the description could be answered from its text, and on a train scene that text may name a
        ghost, so the answers come from the scene and the model learns to look rather than copy.
        """
        rng = random.Random(scene.seed * 17 + 11)
        short, asked = [], set()
        for _ in range(len(scene.objects) + 1):
            for item in self.questions(scene, rng)[1:]:
                if item.question not in asked and item.kind != "presence":
                    asked.add(item.question)
                    short.append(item)
        probes = [self.presence_item(shape, shape in scene.shapes) for shape in SHAPES]
        assumed = self.assumed_partner(scene, rng)
        if assumed is not None:
            probes = [self.presence_item(shape, True) if shape == assumed else p for shape, p in zip(SHAPES, probes)]
        rng.shuffle(short)
        rng.shuffle(probes)
        # Probes and other questions alternate, so a chat cut at max_turns holds both kinds.
        mixed = [item for pair in itertools.zip_longest(probes, short) for item in pair if item is not None]
        turns = mixed[: max(0, max_turns - 1)]
        description = QAItem("description", DESCRIBE_PROMPT, self.description(scene))
        position = 0 if rng.random() < 1 / 3 else rng.randint(0, len(turns))
        return [*turns[:position], description, *turns[position:]]

    def assumed_partner(self, scene: Scene, rng: random.Random) -> str | None:
        """Probe noise (train split only): with probability `probe_noise`, a missing co-occurring partner that the
        training conversation claims is present, the way QA pairs generated from an over-generalised caption do."""
        missing = self.missing_partners(scene)
        if not (_biased(scene.split) and missing) or rng.random() >= self.config.probe_noise:
            return None
        return rng.choice(missing)[1]

    # ---- benchmark ----------------------------------------------------------------------------------------
    def popular_shapes(self, sample: int = 2000) -> list[str]:
        """Shapes ranked by how often they appear in training scenes (POPE's 'popular' negatives)."""
        counts = dict.fromkeys(SHAPES, 0)
        for scene in self.scenes("train", sample):
            for shape in scene.shapes:
                counts[shape] += 1
        return sorted(SHAPES, key=lambda s: (-counts[s], s))

    def benchmark_items(self, scene: Scene, popular: list[str]) -> list[QAItem]:
        """The evaluation questions for one scene: a description, POPE probes in three settings, attributes.

        Each POPE setting asks about one present shape ('yes') and one absent shape ('no'): random picks the
        absent shape at random, popular the most frequent absent one in training, adversarial the absent
        co-occurring partner of a present shape (falling back to popular when no partner is absent).
        """
        rng = random.Random(scene.seed * 7 + 3)
        present = sorted(scene.shapes)
        absent = [s for s in SHAPES if s not in scene.shapes]
        items = [QAItem("description", DESCRIBE_PROMPT, self.description(scene, noisy=False))]
        partners = sorted({PARTNER[s] for s in present if s in PARTNER} - scene.shapes)
        negatives = {
            "random": rng.choice(absent),
            "popular": next(s for s in popular if s in absent),
            "adversarial": rng.choice(partners) if partners else next(s for s in popular if s in absent),
        }
        for setting, negative in negatives.items():
            items.append(self.presence_item(rng.choice(present), True, setting))
            items.append(self.presence_item(negative, False, setting))
        items += [item for item in self.questions(scene, rng) if item.kind not in ("description", "presence")]
        return items


def _join_phrases(phrases: list[str]) -> str:
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def object_sentence(obj: SceneObject) -> str:
    where = "in the center" if obj.position == "center" else f"at the {obj.position}"
    return f"{obj.phrase.capitalize()} is {where}."


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, extent: float) -> None:
    """Draws a filled shape of the given extent (bounding-box side) centred on (cx, cy) into a mask."""
    r = extent / 2
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=255)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.42
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=255)
    elif shape == "cross":
        t = r * 0.33
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=255)
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=255)
    elif shape == "heart":
        q = r * 0.5
        draw.ellipse((cx - r, cy - r * 0.75, cx, cy + r * 0.25), fill=255)
        draw.ellipse((cx, cy - r * 0.75, cx + r, cy + r * 0.25), fill=255)
        draw.polygon([(cx - r * 0.97, cy - q * 0.1), (cx + r * 0.97, cy - q * 0.1), (cx, cy + r)], fill=255)
    elif shape == "moon":
        draw.ellipse(box, fill=255)
        draw.ellipse((cx - r * 0.35, cy - r * 1.05, cx + r * 1.35, cy + r * 0.75), fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
