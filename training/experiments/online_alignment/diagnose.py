"""Why an arm's versions lose object recall: the shape of its correction pairs, and how its versions' descriptions
end, measured on one arm's store from a `run.py --work-dir` run.

- pairs: every correction pair, by what the correction did to the answer (a short answer replaced, sentences
  rewritten, sentences deleted), the mean words of chosen and rejected answers, and how many chosen answers describe
  fewer objects than their own count sentence says;
- descriptions: the SFT model and every version describe `--images` test scenes (greedy); for each, the object
  sentences against the objects there, how often a description lists fewer objects than it counted, the objects
  left out and the descriptions that name an absent shape.

    .venv/bin/python -m training.experiments.online_alignment.diagnose runs/oa/seed-0/corrections --images 150
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from online_rl.export import all_events
from online_rl.pairs import PreferencePair, build_pairs
from online_rl.store import open_store
from training.evaluation.judge import COUNT_SENTENCE, split_sentences
from training.evaluation.metrics import extract_shape_mentions, parse_count
from training.evaluation.shapes_bench import DESCRIPTION_MAX_TOKENS
from training.shapes_world import DESCRIBE_PROMPT, Scene, ShapesWorld


def counted_and_listed(text: str) -> tuple[int | None, int]:
    """(the number its opening count sentence says, or None; how many sentences name a shape)."""
    parts = split_sentences(text)
    counted = parse_count(parts[0]) if parts and COUNT_SENTENCE.match(parts[0]) else None
    return counted, sum(bool(extract_shape_mentions(part)) for part in parts)


def correction_kind(pair: PreferencePair) -> str:
    chosen, rejected = split_sentences(pair.chosen), split_sentences(pair.rejected)
    if len(chosen) == 1 and len(rejected) == 1:
        return "short answer replaced"
    if len(chosen) < len(rejected):
        return "sentences deleted"
    if len(chosen) == len(rejected):
        return "sentences rewritten"
    return "sentences added"


def pair_shapes(pairs: list[PreferencePair]) -> dict:
    corrections = [pair for pair in pairs if pair.source == "correction"]
    short = 0
    for pair in corrections:
        counted, listed = counted_and_listed(pair.chosen)
        short += counted is not None and listed < counted
    words = (
        {
            "chosen": round(sum(len(p.chosen.split()) for p in corrections) / len(corrections), 1),
            "rejected": round(sum(len(p.rejected.split()) for p in corrections) / len(corrections), 1),
        }
        if corrections
        else None
    )
    return {
        "correction_pairs": len(corrections),
        "by_kind": dict(Counter(correction_kind(pair) for pair in corrections)),
        "mean_words": words,
        "chosen_lists_fewer_objects_than_it_counts": short,
    }


def description_shapes(scenes: list[Scene], answers: list[str]) -> dict:
    tally = Counter()
    for scene, answer in zip(scenes, answers, strict=True):
        counted, listed = counted_and_listed(answer)
        mentioned = set(extract_shape_mentions(answer))
        tally["objects"] += len(scene.objects)
        tally["object_sentences"] += listed
        tally["lists_fewer_than_it_counts"] += counted is not None and listed < counted
        tally["shapes_left_out"] += len(set(scene.shapes) - mentioned)
        tally["names_an_absent_shape"] += bool(mentioned - set(scene.shapes))
    return {"descriptions": len(scenes), **tally}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arm_dir", help="an arm's folder in a run's --work-dir (holds store.db and adapters/)")
    parser.add_argument("--model", default="models/shapes-llava")
    parser.add_argument("--images", type=int, default=150, help="test scenes each version describes")
    args = parser.parse_args(argv)
    store_path = Path(args.arm_dir) / "store.db"
    if not store_path.is_file():
        parser.error(f"no store.db in {args.arm_dir}: pass an arm's folder from a run's --work-dir")

    from training.evaluation.models import ChatRequest, TransformersChatModel
    from training.experiments.online_alignment.run import load_version

    with open_store(f"sqlite:///{store_path}") as store:
        pairs = build_pairs([event for _, event in all_events(store)], store.get_generation)
        versions = {"sft": None} | {f"v{a.version}": str(a.path) for a in store.list_adapters()}
    world = ShapesWorld()
    scenes = list(world.scenes("test", args.images, 0))
    requests = [ChatRequest(world.render(scene), DESCRIBE_PROMPT, DESCRIPTION_MAX_TOKENS) for scene in scenes]
    descriptions = {}
    for name, path in versions.items():
        model, processor = load_version(args.model, path)
        answers = TransformersChatModel.from_loaded(model, processor, batch_size=32).answer(requests)
        descriptions[name] = description_shapes(scenes, answers)
    print(json.dumps({"arm_dir": args.arm_dir, "pairs": pair_shapes(pairs), "descriptions": descriptions}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
