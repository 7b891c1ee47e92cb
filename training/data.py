"""Exports ShapesWorld splits: as JSONL plus PNG files, and as a Hugging Face `datasets` dataset with an image column.

Each row is one scene: its image, its ground-truth scene graph, a caption, the facts, and the question/answer items
(the training conversation's questions for the train split, the benchmark questions otherwise).

    alignloop data --split test --num-scenes 500 --output data/shapes-test
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from training.shapes_world import Scene, ShapesWorld

logger = logging.getLogger(__name__)
FORMATS = ("jsonl", "hf")


def scene_record(world: ShapesWorld, scene: Scene, popular: list[str]) -> dict:
    """Everything known about one scene, JSON-serialisable (the image is added by the writer)."""
    if scene.split == "train":
        items = world.conversation(scene)
    else:
        items = world.benchmark_items(scene, popular)
    return {
        "id": f"{scene.split}-{scene.index:07d}",
        "split": scene.split,
        "index": scene.index,
        "objects": scene.to_dict()["objects"],
        "caption": world.caption(scene),
        "facts": world.facts(scene),
        "description": world.description(scene),
        "questions": [{k: v for k, v in dataclasses.asdict(item).items() if v is not None} for item in items],
    }


def iter_records(world: ShapesWorld, split: str, num_scenes: int, start: int = 0) -> Iterator[dict]:
    popular = world.popular_shapes()
    for scene in world.scenes(split, num_scenes, start):
        yield {**scene_record(world, scene, popular), "image": world.render(scene)}


def hf_dataset(world: ShapesWorld, split: str, num_scenes: int, start: int = 0):
    """A `datasets.Dataset` with an Image column; nested fields are kept as JSON strings for a flat schema."""
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "split": datasets.Value("string"),
            "index": datasets.Value("int64"),
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "description": datasets.Value("string"),
            "facts": datasets.Sequence(datasets.Value("string")),
            "objects": datasets.Value("string"),
            "questions": datasets.Value("string"),
        }
    )

    def rows():
        for record in iter_records(world, split, num_scenes, start):
            yield {**record, "objects": json.dumps(record["objects"]), "questions": json.dumps(record["questions"])}

    return datasets.Dataset.from_generator(rows, features=features)


def export_split(
    world: ShapesWorld,
    split: str,
    num_scenes: int,
    output_dir: str | Path,
    formats: tuple[str, ...] = FORMATS,
    start: int = 0,
) -> Path:
    """Writes `output_dir/{data.jsonl, images/*.png}` and/or `output_dir/hf/`, all or nothing.

    Everything is written into a temporary directory beside the target and renamed into place at the end, so an
    interrupted export leaves no half-written dataset.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export format(s) {', '.join(sorted(unknown))}; expected {', '.join(FORMATS)}")
    if num_scenes <= 0:
        raise ValueError("the number of scenes must be positive")
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} exists and is not empty")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        if "jsonl" in formats:
            (staging / "images").mkdir()
            with (staging / "data.jsonl").open("w") as out:
                progress = tqdm(iter_records(world, split, num_scenes, start), total=num_scenes, desc=f"{split} jsonl")
                for record in progress:
                    image_path = Path("images") / f"{record['id']}.png"
                    record.pop("image").save(staging / image_path)
                    out.write(json.dumps({**record, "image": str(image_path)}) + "\n")
        if "hf" in formats:
            hf_dataset(world, split, num_scenes, start).save_to_disk(str(staging / "hf"))
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported split=%s scenes=%d formats=%s to=%s", split, num_scenes, ",".join(formats), output_dir)
    return output_dir
