"""Image inputs: every `image_url` part becomes validated bytes before anything reaches vLLM.

- `data:` URLs are always accepted (base64 only);
- http(s) URLs only when the host is on the allow-list (empty by default), fetched here with a time and size
  limit and without following redirects, so neither the gateway nor vLLM can be steered at internal addresses;
- the bytes must be an image Pillow can fully decode, in an accepted format, under the size and pixel limits
  (a decompression bomb is refused from its header, before any pixel is decoded).

vLLM then receives each image as a data URL, and the store keeps it under its sha256. Images up to
`INLINE_DECODE_PIXELS` (by their header) are decoded on the event loop, which takes a fraction of a millisecond;
larger ones in a worker thread, so a big image never stalls other requests. (The thread hop cost more than the
decode itself for small images: it was the largest item in a profile of the gateway under load.)
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import re
import warnings
from urllib.parse import urlsplit

import anyio
import httpx
from PIL import Image, UnidentifiedImageError

from online_rl.schema import sha256_hex
from online_rl.store.base import IMAGE_FORMATS
from serve.protocol import APIError

INLINE_DECODE_PIXELS = 256 * 256
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


@dataclasses.dataclass(frozen=True)
class ResolvedImage:
    data: bytes
    mime_type: str
    sha256: str
    width: int
    height: int

    def data_url(self) -> str:
        return f"data:{self.mime_type};base64," + base64.b64encode(self.data).decode("ascii")


def host_allowed(host: str, allowlist: list[str]) -> bool:
    """Exact host names, or `*.example.com` for its subdomains (not example.com itself)."""
    host = host.lower().rstrip(".")
    for allowed in allowlist:
        entry = allowed.lower().rstrip(".")
        if entry.startswith("*.") and host.endswith(entry[1:]) and host != entry[2:]:
            return True
        if host == entry:
            return True
    return False


def header_pixels(data: bytes) -> int:
    """Width x height from the image's header, decoding nothing; 0 when it has no readable header (decode_image
    then says what is wrong)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.width * image.height
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError):
        return 0


def decode_image(data: bytes, max_bytes: int, max_pixels: int, param: str) -> ResolvedImage:
    """Checks that `data` is a whole image within the limits; raises APIError(400/413) otherwise."""
    if not data:
        raise APIError(400, "the image is empty", param=param, code="invalid_image")
    if len(data) > max_bytes:
        raise APIError(
            413, f"the image is {len(data)} bytes; the limit is {max_bytes}", param=param, code="image_too_large"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format, image.size
                if width * height > max_pixels:
                    raise APIError(
                        400,
                        f"the image is {width}x{height} pixels; the limit is {max_pixels} pixels",
                        param=param,
                        code="image_too_large",
                    )
                image.load()  # decodes every pixel: truncated or corrupt data fails here
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise APIError(
            400,
            f"the image claims more pixels than the limit of {max_pixels} (a decompression bomb)",
            param=param,
            code="image_too_large",
        ) from error
    except UnidentifiedImageError as error:
        raise APIError(
            400, "the data is not an image this server can read", param=param, code="invalid_image"
        ) from error
    except (OSError, ValueError, SyntaxError) as error:
        raise APIError(400, "the image is broken or truncated", param=param, code="invalid_image") from error
    if fmt not in IMAGE_FORMATS:
        raise APIError(
            400,
            f"image format {fmt} is not accepted; send one of {', '.join(IMAGE_FORMATS)}",
            param=param,
            code="invalid_image",
        )
    return ResolvedImage(data, IMAGE_FORMATS[fmt], sha256_hex(data), width, height)


class ImageResolver:
    """Turns image URLs into checked bytes: data URLs decoded, allow-listed http(s) URLs fetched."""

    def __init__(
        self, client: httpx.AsyncClient, allowlist: list[str], max_bytes: int, max_pixels: int, fetch_timeout_s: float
    ):
        self.client = client
        self.allowlist = allowlist
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.fetch_timeout_s = fetch_timeout_s

    async def resolve(self, url: str, param: str) -> ResolvedImage:
        if url[:5].lower() == "data:":
            data = self._decode_data_url(url, param)
        elif urlsplit(url).scheme.lower() in ("http", "https"):
            data = await self._fetch(url, param)
        else:
            raise APIError(
                400, "image_url must be a data: URL or an http(s) URL", param=param, code="invalid_image_url"
            )
        if len(data) <= self.max_bytes and header_pixels(data) <= INLINE_DECODE_PIXELS:
            return decode_image(data, self.max_bytes, self.max_pixels, param)
        return await anyio.to_thread.run_sync(decode_image, data, self.max_bytes, self.max_pixels, param)

    def _decode_data_url(self, url: str, param: str) -> bytes:
        match = _DATA_URL.match(url)
        if match is None or not match.group("b64"):
            raise APIError(
                400, "a data URL must look like data:image/png;base64,...", param=param, code="invalid_image_url"
            )
        payload = url[match.end() :]
        if len(payload) * 3 // 4 > self.max_bytes + 3:
            raise APIError(
                413, f"the image is over the limit of {self.max_bytes} bytes", param=param, code="image_too_large"
            )
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise APIError(400, "the data URL is not valid base64", param=param, code="invalid_image_url") from error

    async def _fetch(self, url: str, param: str) -> bytes:
        parts = urlsplit(url)
        if parts.username or parts.password:
            raise APIError(400, "image URLs must not carry credentials", param=param, code="invalid_image_url")
        if not parts.hostname or not host_allowed(parts.hostname, self.allowlist):
            raise APIError(
                400,
                f"image host {parts.hostname!r} is not on this server's allow-list; send the image "
                "as a data: URL instead",
                param=param,
                code="image_host_not_allowed",
            )
        try:
            with anyio.fail_after(self.fetch_timeout_s):
                async with self.client.stream("GET", url, follow_redirects=False) as response:
                    if response.is_redirect:
                        raise APIError(
                            400,
                            "the image URL redirects; redirects are not followed",
                            param=param,
                            code="invalid_image_url",
                        )
                    if response.status_code != 200:
                        raise APIError(
                            400,
                            f"fetching the image failed with HTTP {response.status_code}",
                            param=param,
                            code="image_fetch_failed",
                        )
                    chunks, size = [], 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > self.max_bytes:
                            raise APIError(
                                413,
                                f"the image is over the limit of {self.max_bytes} bytes",
                                param=param,
                                code="image_too_large",
                            )
                        chunks.append(chunk)
                    return b"".join(chunks)
        except TimeoutError as error:
            raise APIError(
                400, f"fetching the image took over {self.fetch_timeout_s:g} s", param=param, code="image_fetch_failed"
            ) from error
        except httpx.HTTPError as error:
            raise APIError(
                400, f"fetching the image failed: {type(error).__name__}", param=param, code="image_fetch_failed"
            ) from error
