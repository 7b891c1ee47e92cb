"""Preference pairs for the reward model, from the two places LLaVA-RLHF's come from: answers rated against the truth,
and people.

- ShapesWorld (`shapes_reward_pairs`): the SFT model samples several answers to a scene's detailed-description prompt
  and to presence probes, one about an absent object (the co-occurring partner it tends to invent, where there is
  one) and one about each shape that is there; the rule judge (training/evaluation/judge.py) scores each against the
  scene graph, and the best and worst answers become a pair when their scores differ, so the hallucinating answer is
  the rejected one. The facts are the scene's. Each pair is labelled by what is wrong with its rejected answer: an
  invented object (`description_object`), another error in a description (`description_detail`: a color, a place, a
  count), or a wrong yes/no about a shape that is not there or is (`presence_absent`, `presence_present`). Probes
  are sampled more often than descriptions (`probe_samples`): the SFT model answers them right nearly always, and a
  pair needs one wrong answer.
- The feedback store: every pair its events support (corrections, thumbs, arena preferences), with the facts
  registered for the pair's image, exported in this module's format by
  `alignloop feedback export --what reward-pairs` (`online_rl.export.store_reward_pairs`).

Each pair carries its image and facts, so the same pairs train a fact-augmented and a plain reward model.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from training.evaluation.judge import ShapesRuleJudge, best_and_worst
from training.evaluation.models import user_turn
from training.evaluation.shapes_bench import max_tokens_for
from training.rollouts import Prompt, generate
from training.shapes_world import DESCRIBE_PROMPT, SHAPES, QAItem, Scene, ShapesWorld

# The questions `rated_questions` asks; a cache sampled with another set is sampled again. 2: a presence probe about
# a present shape besides the one about an absent shape; 3: one about each present shape.
QUESTION_SET = 3
MAX_KIND_WEIGHT = 4.0  # `kind_weights`' cap
MADE_WITH_FILE = "made_with.json"


@dataclasses.dataclass(frozen=True)
class RewardPair:
    """A chosen and a rejected answer to one prompt about one image, with the image's facts."""

    messages: tuple[dict, ...]
    chosen: str
    rejected: str
    facts: tuple[str, ...]
    image: Image.Image
    kind: str  # ShapesWorld: description_object, description_detail or presence; store pairs: the feedback source


def rated_questions(world: ShapesWorld, scene: Scene, rng: random.Random) -> list[QAItem]:
    """The questions whose sampled answers are paired for a scene: the detailed description, a presence probe about
    an absent shape (a missing co-occurring partner when the scene has one: the adversarial probe), and one about
    each shape that is there.

    Without the present-shape probes every presence pair prefers "no", and PPO against such a reward model learns to
    deny everything (training/experiments/fact_rlhf/README.md, "Earlier runs")."""
    missing = sorted({partner for _, partner in world.missing_partners(scene)})
    absent = missing or [shape for shape in SHAPES if shape not in scene.shapes]
    items = [QAItem("description", DESCRIBE_PROMPT, world.description(scene, noisy=False))]
    if absent:
        items.append(world.presence_item(rng.choice(absent), False))
    items += [world.presence_item(shape, True) for shape in sorted(scene.shapes)]
    return items


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def shapes_reward_pairs(
    policy,
    processor,
    world: ShapesWorld,
    split: str,
    num_scenes: int,
    start: int = 0,
    samples: int = 4,
    probe_samples: int | None = None,
    temperature: float = 1.0,
    rows_per_call: int = 64,
    seed: int = 0,
) -> list[RewardPair]:
    """Pairs from the answers sampled by `policy` to the rated questions of scenes start..start+num_scenes-1:
    `samples` per description, `probe_samples` (default: `samples`) per presence probe."""
    judge, rng = ShapesRuleJudge(), random.Random(f"reward-pairs-{split}-{start}-{seed}")
    questions = []  # (scene, image, item)
    for scene in world.scenes(split, num_scenes, start):
        image = world.render(scene)
        questions += [(scene, image, item) for item in rated_questions(world, scene, rng)]
    answers: dict[int, list[str]] = {index: [] for index in range(len(questions))}

    def samples_for(item: QAItem) -> int:
        return (probe_samples or samples) if item.kind == "presence" else samples

    for budget in sorted({max_tokens_for(item) for _, _, item in questions}):  # short answers batch apart
        rows = [index for index, (_, _, item) in enumerate(questions) if max_tokens_for(item) == budget]
        rows = [index for index in rows for _ in range(samples_for(questions[index][2]))]
        for chunk in _chunks(rows, rows_per_call):
            prompts = [Prompt(tuple(user_turn(questions[i][2].question)), questions[i][1], budget) for i in chunk]
            for index, text in zip(chunk, generate(policy, processor, prompts, temperature).texts, strict=True):
                answers[index].append(text)
    pairs = []
    for index, (scene, image, item) in enumerate(questions):
        sampled = answers[index]
        ranked = best_and_worst([judge.score(scene, item, answer) for answer in sampled], sampled)
        if ranked is not None:
            chosen, rejected = sampled[ranked[0]], sampled[ranked[1]]
            pairs.append(
                RewardPair(
                    tuple(user_turn(item.question)),
                    chosen,
                    rejected,
                    tuple(world.facts(scene)),
                    image,
                    pair_kind(judge, scene, item, rejected),
                )
            )
    return pairs


def pair_kind(judge: ShapesRuleJudge, scene: Scene, item: QAItem, rejected: str) -> str:
    """presence_absent / presence_present for a probe about a shape that is not / is there; description_object when
    the rejected description names an object that is not there (object hallucination, what CHAIR counts);
    description_detail when it is wrong otherwise (a color, a place, a count)."""
    if item.kind == "presence":
        return "presence_present" if item.answer == "Yes." else "presence_absent"
    if item.kind != "description":
        return item.kind
    return "description_object" if judge.judge(scene, item, rejected).hallucinated else "description_detail"


def kind_weights(kinds: Sequence[str], max_weight: float = MAX_KIND_WEIGHT) -> dict[str, float]:
    """A loss weight per pair kind that gives every kind the same total weight: len(kinds) / (number of kinds *
    pairs of that kind), but at most `max_weight`. The weights average 1 over the pairs, so the loss keeps its scale,
    unless the cap bites (then less).

    It is for kinds whose chosen answer is nearly always the same words (absent-shape probes, chosen "No.", outnumber
    present-shape ones), where an unweighted loss pays a reward model for preferring that answer before it has read
    the image or the facts; the cap keeps a nearly absent kind from dominating the steps it appears in. Measured in
    training/experiments/fact_rlhf/README.md ("Two changes to the reward-model loss")."""
    counts = Counter(kinds)
    return {kind: min(max_weight, len(kinds) / (len(counts) * count)) for kind, count in counts.items()}


def save_pairs(pairs: Sequence[RewardPair], directory: str | Path, made_with: dict | None = None) -> Path:
    """`pairs.jsonl` plus one PNG per distinct image under `images/`, and `made_with` (what sampled them) in
    `made_with.json`; written to a temporary directory and renamed, so a reader never sees half a cache."""
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    (staging / MADE_WITH_FILE).write_text(json.dumps(made_with or {}, sort_keys=True) + "\n")
    names: dict[int, str] = {}
    with (staging / "pairs.jsonl").open("w") as handle:
        for pair in pairs:
            if id(pair.image) not in names:
                names[id(pair.image)] = f"images/{len(names):05d}.png"
                pair.image.save(staging / names[id(pair.image)])
            record = {
                "messages": list(pair.messages),
                "chosen": pair.chosen,
                "rejected": pair.rejected,
                "facts": list(pair.facts),
                "kind": pair.kind,
                "image": names[id(pair.image)],
            }
            handle.write(json.dumps(record) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    return directory


def cache_made_with(directory: str | Path) -> dict | None:
    """What sampled the cached pairs in `directory`, or None when there is no complete cache there."""
    directory = Path(directory)
    if not (directory / "pairs.jsonl").is_file() or not (directory / MADE_WITH_FILE).is_file():
        return None
    return json.loads((directory / MADE_WITH_FILE).read_text())


def load_pairs(directory: str | Path) -> list[RewardPair]:
    directory = Path(directory)
    images: dict[str, Image.Image] = {}
    pairs = []
    for line in (directory / "pairs.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["image"] not in images:
            images[record["image"]] = Image.open(directory / record["image"]).convert("RGB")
        pairs.append(
            RewardPair(
                tuple(record["messages"]),
                record["chosen"],
                record["rejected"],
                tuple(record["facts"]),
                images[record["image"]],
                record["kind"],
            )
        )
    return pairs
