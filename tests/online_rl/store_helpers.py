"""Small builders for store tests: PNG bytes, stored generation records and thumbs events."""

from __future__ import annotations

import io

from PIL import Image

from online_rl.schema import FeedbackEvent, GenerationRecord


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def image_message(sha: str, question: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"sha256:{sha}"}},
                {"type": "text", "text": question},
            ],
        }
    ]


def make_generation(
    store,
    generation_id: str,
    user: str = "u-alice",
    version: int | None = None,
    color=(200, 30, 30),
    question: str = "What color is the square?",
    response: str = "Red.",
    created: float | None = None,
) -> GenerationRecord:
    sha = store.put_image(png_bytes(color))
    record = GenerationRecord(
        id=generation_id,
        alias="llava-rlhf",
        adapter_version=version,
        messages=image_message(sha, question),
        sampling={"temperature": 0.0, "max_tokens": 16},
        response=response,
        finish_reason="stop",
        prompt_tokens=50,
        completion_tokens=2,
        latency_ms=12.5,
        user_id=user,
        **({"created": created} if created is not None else {}),
    )
    store.add_generation(record)
    return record


def thumbs(generation_id: str, rating: int, user: str = "u-alice", **fields) -> FeedbackEvent:
    return FeedbackEvent(generation_id=generation_id, rating=rating, user_id=user, **fields)
