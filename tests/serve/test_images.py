"""Image inputs: small images are decoded on the event loop, large ones in a worker thread, with the same checks."""

from __future__ import annotations

import asyncio
import base64
import io
import threading

import httpx
import pytest
from PIL import Image

from serve import images
from serve.images import ImageResolver, header_pixels
from serve.protocol import APIError


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_header_pixels_reads_the_size_without_decoding():
    whole = png(300, 200)
    assert header_pixels(whole) == 60_000
    assert header_pixels(whole[:100]) == 60_000  # truncated after the header: the size is still known
    assert header_pixels(b"not an image") == 0 and header_pixels(b"") == 0


def test_small_images_decode_on_the_loop_and_large_ones_in_a_thread(monkeypatch):
    threads = []
    decode = images.decode_image

    def recording_decode(*args):
        threads.append(threading.current_thread() is threading.main_thread())
        return decode(*args)

    monkeypatch.setattr(images, "decode_image", recording_decode)
    resolver = ImageResolver(httpx.AsyncClient(), [], max_bytes=10_000_000, max_pixels=4_000_000, fetch_timeout_s=1.0)

    async def resolve_all():
        return [await resolver.resolve(data_url(png(*size)), param="image") for size in ((96, 96), (600, 600))]

    small, large = asyncio.run(resolve_all())
    assert (small.width, small.height, large.width, large.height) == (96, 96, 600, 600)
    assert threads == [True, False]


def test_a_truncated_small_image_is_refused_on_the_loop_too():
    resolver = ImageResolver(httpx.AsyncClient(), [], max_bytes=10_000_000, max_pixels=4_000_000, fetch_timeout_s=1.0)
    with pytest.raises(APIError) as failure:
        asyncio.run(resolver.resolve(data_url(png(64, 64)[:60]), param="image"))
    assert failure.value.status == 400 and failure.value.code == "invalid_image"
