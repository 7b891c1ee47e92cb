"""`alignloop feedback export`: raw events, or preference pairs with their images, as JSONL or Parquet.

Pair styles:
- `trl`: TRL's vision preference format, the columns DPOTrainer reads: `prompt` (conversational, with
  `{"type": "image"}` placeholders), `chosen` and `rejected` (one assistant turn each), `images` (a list);
- `rlhfv`: RLHF-V's columns `question`, `chosen`, `rejected`, `image` (one image per pair; others are skipped).

`--what reward-pairs` writes the pairs on one-image prompts with the facts registered for their image, in the reward
model's pair format (`training.reward_data.save_pairs`), for `alignloop train reward --feedback-pairs DIR`.

In JSONL, images are PNG/JPEG files under `images/` named by their sha256 and referenced by relative path; in
Parquet, they are embedded (a `datasets` Image feature). Raw events carry the generation records they concern.
The export is written into a temporary directory and renamed into place, so an interrupted export leaves nothing.

    alignloop feedback export --store-url sqlite:///runs/alignloop.db --what pairs --style trl --output runs/pairs
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from PIL import Image

from online_rl.logged_prompts import image_facts
from online_rl.pairs import PreferencePair, build_pairs
from online_rl.schema import FeedbackEvent, PreferenceEvent
from online_rl.store import FeedbackStore
from training.reward_data import RewardPair, save_pairs

logger = logging.getLogger(__name__)
WHAT = ("events", "pairs", "reward-pairs")
STYLES = ("trl", "rlhfv")
FORMATS = ("jsonl", "parquet")
IMAGE_SUFFIX = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "image/bmp": ".bmp",
}


def all_events(store: FeedbackStore, page: int = 1000) -> list[tuple[str, FeedbackEvent | PreferenceEvent]]:
    events, after = [], None
    while True:
        batch = store.list_events(after=after, limit=page)
        events += batch
        if len(batch) < page:
            return events
        after = batch[-1][0]


def prompt_for_trl(messages: list[dict]) -> list[dict]:
    """Stored messages as TRL's conversational prompt: image parts become `{"type": "image"}` placeholders."""
    prompt = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [
                {"type": "image"} if part.get("type") == "image_url" else {"type": "text", "text": part.get("text", "")}
                for part in content
            ]
        else:
            content = [{"type": "text", "text": content or ""}]
        prompt.append({"role": message["role"], "content": content})
    return prompt


def trl_row(pair: PreferencePair, images: list) -> dict:
    return {
        "prompt": prompt_for_trl(list(pair.messages)),
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": pair.chosen}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": pair.rejected}]}],
        "images": images,
        "source": pair.source,
    }


def rlhfv_row(pair: PreferencePair, image) -> dict:
    question = next(
        (_text(m) for m in reversed(pair.messages) if m.get("role") == "user"),
        "",
    )
    return {
        "question": question,
        "chosen": pair.chosen,
        "rejected": pair.rejected,
        "image": image,
        "source": pair.source,
    }


def _text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if part.get("type") == "text")


class _ImageWriter:
    """Writes each image once into `images/` (JSONL) or hands back its bytes (Parquet)."""

    def __init__(self, store: FeedbackStore, root: Path, embed: bool):
        self.store, self.root, self.embed = store, root, embed
        self.written: dict[str, str] = {}

    def __call__(self, sha: str):
        data = self.store.get_image(sha)
        if data is None:
            raise FileNotFoundError(f"image sha256:{sha} is referenced but not in the store")
        if self.embed:
            return {"bytes": data, "path": None}
        if sha not in self.written:
            info = self.store.image_info(sha)
            relative = Path("images") / (sha + IMAGE_SUFFIX.get(info.mime_type if info else "", ".bin"))
            (self.root / "images").mkdir(exist_ok=True)
            (self.root / relative).write_bytes(data)
            self.written[sha] = str(relative)
        return self.written[sha]


def export_feedback(
    store: FeedbackStore, output_dir: str | Path, what: str = "pairs", style: str = "trl", fmt: str = "jsonl"
) -> dict:
    """Writes the export into `output_dir` (which must not exist or be empty); returns a summary."""
    for value, allowed, name in ((what, WHAT, "what"), (style, STYLES, "style"), (fmt, FORMATS, "format")):
        if value not in allowed:
            raise ValueError(f"--{name} must be one of {', '.join(allowed)}, not {value!r}")
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} exists and is not empty")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    if what == "reward-pairs":
        pairs = store_reward_pairs(store)
        save_pairs(pairs, output_dir, made_with={"source": "feedback store"})
        summary = {"what": what, "pairs": len(pairs), "by_source": dict(Counter(pair.kind for pair in pairs))}
        summary["path"] = str(output_dir / "pairs.jsonl")
        logger.info("feedback export what=%s pairs=%d path=%s", what, len(pairs), summary["path"])
        return summary
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        images = _ImageWriter(store, staging, embed=fmt == "parquet")
        events = all_events(store)
        summary = {"what": what, "style": style, "format": fmt, "events": len(events)}
        if what == "events":
            rows = [_event_row(store, delivery_id, event) for delivery_id, event in events]
        else:
            cache: dict[str, object] = {}

            def lookup(generation_id: str):
                if generation_id not in cache:
                    cache[generation_id] = store.get_generation(generation_id)
                return cache[generation_id]

            pairs = build_pairs([event for _, event in events], lookup)
            rows, skipped = [], 0
            for pair in pairs:
                hashes = pair.image_hashes
                if style == "trl":
                    rows.append(trl_row(pair, [images(sha) for sha in hashes]))
                elif len(hashes) == 1:
                    rows.append(rlhfv_row(pair, images(hashes[0])))
                else:
                    skipped += 1
            summary |= {"pairs": len(pairs), "skipped": skipped, "by_source": _by_source(pairs)}
        summary["rows"] = len(rows)
        name = f"{what}.{'jsonl' if fmt == 'jsonl' else 'parquet'}"
        if fmt == "jsonl":
            with (staging / name).open("w") as out:
                for row in rows:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            _write_parquet(rows, staging / name, what, style)
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary["path"] = str(output_dir / name)
    logger.info("feedback export %s", " ".join(f"{k}={v}" for k, v in summary.items() if k != "by_source"))
    return summary


def _by_source(pairs: list[PreferencePair]) -> dict[str, int]:
    return dict(Counter(pair.source for pair in pairs))


def _event_row(store: FeedbackStore, delivery_id: str, event: FeedbackEvent | PreferenceEvent) -> dict:
    ids = event.generation_ids if isinstance(event, PreferenceEvent) else (event.generation_id,)
    generations = [g.model_dump() for g in (store.get_generation(i) for i in ids) if g is not None]
    return {"delivery_id": delivery_id, "event": event.model_dump(), "generations": generations}


def _write_parquet(rows: list[dict], path: Path, what: str, style: str) -> None:
    """Parquet through `datasets`: images embedded as an Image feature; TRL's conversational columns stay nested
    (image parts get `text: null`, as in TRL's own formatted vision datasets); raw events as JSON strings."""
    import datasets

    if what == "events":
        table = [{k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items()} for row in rows]
        features = datasets.Features({k: datasets.Value("string") for k in ("delivery_id", "event", "generations")})
        dataset = datasets.Dataset.from_list(table, features=features)
    elif not rows:
        dataset = datasets.Dataset.from_dict({})
    else:
        dataset = datasets.Dataset.from_list(rows)
        image_column = "images" if style == "trl" else "image"
        image_feature = datasets.Image()
        dataset = dataset.cast_column(image_column, [image_feature] if style == "trl" else image_feature)
    dataset.to_parquet(str(path))


def store_reward_pairs(store: FeedbackStore, limit: int = 10000) -> list[RewardPair]:
    """Every pair the store's last `limit` events support, on a prompt with exactly one stored image."""
    events = [event for _, event in store.list_events(limit=limit)]
    pairs = []
    for pair in build_pairs(events, store.get_generation):
        if len(pair.image_hashes) != 1:
            continue
        data = store.get_image(pair.image_hashes[0])
        if data is None:
            continue
        image = Image.open(io.BytesIO(data)).convert("RGB")
        facts = tuple(image_facts(store, pair.image_hashes[0]))
        pairs.append(RewardPair(pair.messages, pair.chosen.strip(), pair.rejected.strip(), facts, image, pair.source))
    return pairs
