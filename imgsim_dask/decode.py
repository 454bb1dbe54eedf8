"""Decode: identify image bytes by their magic bytes and decode them to the model's input.

Only the format the first bytes name is ever tried, an image over the pixel cap is refused
from its header, and a JPEG is decoded at the smallest DCT scale that still covers the
model input (Pillow's `draft`). A small JPEG thumbnail of the same decoded image can come
with it, for the review page (the URL is never fetched again).
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .descriptor import BORDER_STD, uniform_border_box
from .options import DEFAULT_MAX_PIXELS
from .safehttp import plain
from .schema import RowFailure

SNIFF_BYTES = 12  # enough for every signature in `sniff_format`
THUMBNAIL_PX = 128  # the long side of a stored thumbnail
THUMBNAIL_QUALITY = 80  # its JPEG quality
TRIM_SCAN_PX = 64  # borders are looked for on a copy about this many pixels on its short side
NOT_IMAGE = "not a JPEG, PNG, GIF, WebP, BMP, TIFF or AVIF image (by its first bytes)"


def sniff_format(data: bytes | bytearray) -> str | None:
    """The Pillow format named by the magic bytes at the start of `data`, or None."""
    head = bytes(data[:SNIFF_BYTES])
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "TIFF"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"mif1", b"msf1"):
        return "AVIF"
    return None


def format_name(image_format: str) -> str:
    """A Pillow format as people write it: 'WebP' for 'WEBP'."""
    return _FORMAT_NAMES.get(image_format, image_format)


_FORMAT_NAMES = {"WEBP": "WebP"}
_REPR = re.compile(r" ?<[^<>]* at 0x[0-9a-fA-F]+>")  # "<_io.BytesIO object at 0x7f...>"


def decode_image(
    data: bytes,
    size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    thumbnail: bool = False,
    trim_borders: bool = False,
) -> tuple[np.ndarray, int, int, bytes | None]:
    """Decode image bytes to uint8 RGB `size` x `size`; return it with the original width,
    height and, with `thumbnail`, a JPEG of at most `THUMBNAIL_PX` a side (else None).
    `trim_borders`: uniform edges (frames, letterbox bars) are cut off before the resize
    (`descriptor.uniform_border_box`); the thumbnail keeps them.

    Only the format its magic bytes name is tried (no other Pillow decoder sees the bytes),
    and an image over `max_pixels` is refused from its header, before any pixel is decoded.
    """
    image_format = sniff_format(data)
    if image_format is None:
        raise RowFailure("not_image", NOT_IMAGE)
    try:
        with Image.open(io.BytesIO(data), formats=[image_format]) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise RowFailure(
                    "bomb", f"{width}x{height} pixels exceed the limit of {max_pixels}"
                )
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced DCT scale
            ImageOps.exif_transpose(image, in_place=True)
            rgb = _to_rgb(image)
            box = _content_box(rgb) if trim_borders else (0, 0, *rgb.size)
            framed = rgb if box == (0, 0, *rgb.size) else rgb.crop(box)
            resized = framed.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
            small = _thumbnail(rgb) if thumbnail else None
            return np.asarray(resized, dtype=np.uint8), width, height, small
    except RowFailure:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RowFailure("bomb", str(exc)[:300]) from None
    except Exception as exc:  # any error while parsing untrusted bytes means a corrupt image
        raise RowFailure("decode_error", _undecodable(image_format, exc)) from None


def _content_box(image: Image.Image) -> tuple[int, int, int, int]:
    """The box of `image` inside its uniform edges, found on a copy of about `TRIM_SCAN_PX` a
    side (box-averaged, which also evens out JPEG noise): each edge lies in the middle of the
    copy's first pixel off the border, within half of its width of the true edge."""
    width, height = image.size

    def line(box: tuple[int, int, int, int]) -> np.ndarray:  # (tobytes: cheaper than asarray)
        return np.frombuffer(image.crop(box).tobytes(), np.uint8).reshape(-1, 3)

    rows = np.stack([line((0, y, width, y + 1)) for y in (0, height - 1)])
    cols = np.stack([line((x, 0, x + 1, height)) for x in (0, width - 1)])
    if min(_spread(rows), _spread(cols)) >= BORDER_STD:
        return 0, 0, width, height  # the common case: no edge line is uniform
    factor = max(1, min(image.size) // TRIM_SCAN_PX)
    small = image.reduce(factor) if factor > 1 else image
    left, top, right, bottom = uniform_border_box(np.asarray(small))
    if (left, top, right, bottom) == (0, 0, *small.size):
        return 0, 0, *image.size
    half = factor // 2

    def start(scan: int) -> int:  # the copy's first pixel inside
        return 0 if scan == 0 else scan * factor + half

    def end(scan: int, last: int, full: int) -> int:  # one past the copy's last pixel inside
        return full if scan == last else min(full, (scan - 1) * factor + half)

    return (
        start(left),
        start(top),
        end(right, small.width, image.width),
        end(bottom, small.height, image.height),
    )


def _spread(lines: np.ndarray) -> float:
    """The smallest, over `lines` (lines, pixels, 3), of a line's largest per-channel
    standard deviation."""
    return float(lines.astype(np.float32).std(axis=1).max(axis=-1).min())


def _undecodable(image_format: str, exc: Exception) -> str:
    """'cannot decode the JPEG image: truncated file read': Pillow's reason, without its
    class names or reprs."""
    if isinstance(exc, UnidentifiedImageError):
        detail = "its data is not valid (damaged or cut short?)"
    else:
        detail = plain(_REPR.sub("", str(exc))) or "no reason given"
    return f"cannot decode the {format_name(image_format)} image: {detail}"[:300]


def _thumbnail(image: Image.Image) -> bytes:
    """A JPEG of `image` at most `THUMBNAIL_PX` on its long side, aspect kept."""
    scale = THUMBNAIL_PX / max(image.size)
    if scale < 1:
        target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=THUMBNAIL_QUALITY)
    return out.getvalue()


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; 16/32-bit greyscale is scaled down to 8 bits instead of clipped to white."""
    if image.mode.startswith("I"):
        pixels = np.asarray(image).astype(np.int64)
        if pixels.max(initial=0) > 255:
            pixels = pixels // 257
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")
