"""The edit family: how near-duplicates are made in practice, with randomised parameters.

`scripts/bench_accuracy.py` builds its benchmark from these edits, and `imgsim calibrate`
applies them to a sample of a source's own images, so both measure the same thing. Every
edit takes an RGB image and a seeded `numpy` generator and returns a new RGB image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

Edit = Callable[[Image.Image, np.random.Generator], Image.Image]
COLOURS = ((0, 0, 0), (255, 255, 255), (128, 128, 128), (24, 60, 160), (200, 30, 40))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return COLOURS[int(rng.integers(len(COLOURS)))]


def _reencoded(image: Image.Image, quality: int) -> Image.Image:
    import io

    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    out.seek(0)
    return Image.open(out).convert("RGB")


def jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """JPEG at a low quality (5-20)."""
    return _reencoded(image, int(rng.integers(5, 21)))


def downscale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Scaled to 30-60% and recompressed hard (quality 30-60)."""
    scale = rng.uniform(0.3, 0.6)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return _reencoded(image.resize(size, Image.Resampling.BILINEAR), int(rng.integers(30, 61)))


def thumbnail(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A thumbnail of 64-128 px on its long side."""
    small = image.copy()
    side = int(rng.integers(64, 129))
    small.thumbnail((side, side), Image.Resampling.BICUBIC)
    return small


def crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A crop keeping 70-90% of each side, anywhere in the image."""
    keep = rng.uniform(0.7, 0.9)
    w, h = round(image.width * keep), round(image.height * keep)
    x, y = int(rng.integers(0, image.width - w + 1)), int(rng.integers(0, image.height - h + 1))
    return image.crop((x, y, x + w, y + h))


def rotate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotated 3-10 degrees either way; the corners filled (black or white) or cropped off."""
    angle = rng.uniform(3, 10) * rng.choice([-1, 1])
    if rng.random() < 0.5:
        return image.rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=_colour(rng))
    turned = image.rotate(angle, Image.Resampling.BICUBIC)
    margin = np.sin(np.radians(abs(angle)))
    dx, dy = round(image.width * margin), round(image.height * margin)
    return turned.crop((dx, dy, image.width - dx, image.height - dy))


def flip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Mirrored left to right."""
    return ImageOps.mirror(image)


def border(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A uniform frame of 4-20% of the long side, in one of several colours."""
    width = max(1, round(max(image.size) * rng.uniform(0.04, 0.2)))
    return ImageOps.expand(image, border=width, fill=_colour(rng))


def letterbox(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Padded with bars to another aspect ratio (16:9, 4:3, 1:1 or 9:16)."""
    aspect = float(rng.choice([16 / 9, 4 / 3, 1.0, 9 / 16]))
    w, h = image.size
    if w / h < aspect:
        size = (round(h * aspect), h)
    else:
        size = (w, round(w / aspect))
    if size == (w, h):  # already that shape: bars on the long sides instead
        size = (w, round(h * 1.4)) if w >= h else (round(w * 1.4), h)
    canvas = Image.new("RGB", size, _colour(rng))
    canvas.paste(image, ((size[0] - w) // 2, (size[1] - h) // 2))
    return canvas


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, size))


def text(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A caption of a few words over the picture, 5-10% of its height."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    size = round(image.height * rng.uniform(0.05, 0.1))
    words = " ".join(rng.choice(["SALE", "new", "photo", "2026", "best", "copy", "@user"], 3))
    x, y = rng.uniform(0, 0.4) * image.width, rng.uniform(0, 0.85) * image.height
    draw.text((x, y), words, fill=_colour(rng), font=_font(size), stroke_width=1)
    return out


def logo(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A solid logo mark (a disc and a square) of 10-20% of the width in a corner."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    side = max(4, round(image.width * rng.uniform(0.1, 0.2)))
    x = int(rng.choice([0, image.width - side]))
    y = int(rng.choice([0, image.height - side]))
    draw.rectangle((x, y, x + side, y + side), fill=_colour(rng))
    draw.ellipse(
        (x + side // 5, y + side // 5, x + 4 * side // 5, y + 4 * side // 5), fill=_colour(rng)
    )
    return out


def banner(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A strip of 10-18% of the height across the top or bottom, with text on it."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    h = max(2, round(image.height * rng.uniform(0.1, 0.18)))
    y = 0 if rng.random() < 0.5 else image.height - h
    draw.rectangle((0, y, image.width, y + h), fill=_colour(rng))
    draw.text(
        (h // 3, y + h // 6),
        "FREE SHIPPING on all orders",
        fill=(255, 220, 0),
        font=_font(round(h * 0.6)),
    )
    return out


def tone(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation each scaled by 0.6-1.4."""
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(rng.uniform(0.6, 1.4))
    return image


def greyscale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Grey levels only."""
    return ImageOps.grayscale(image).convert("RGB")


def screenshot(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Placed at 45-75% of a larger canvas with a title bar and margins, as in a screenshot."""
    scale = rng.uniform(0.45, 0.75)
    w, h = round(image.width / scale), round(image.height / scale)
    canvas = Image.new("RGB", (w, h), (240, 240, 240) if rng.random() < 0.5 else (30, 30, 34))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, w, max(2, h // 14)), fill=(60, 90, 200))
    x = int(rng.integers(0, w - image.width + 1))
    y = int(rng.integers(h // 14, max(h // 14 + 1, h - image.height + 1)))
    canvas.paste(image, (x, y))
    return canvas


SINGLE_EDITS: dict[str, Edit] = {
    "jpeg": jpeg,
    "downscale": downscale,
    "thumbnail": thumbnail,
    "crop": crop,
    "rotate": rotate,
    "flip": flip,
    "border": border,
    "letterbox": letterbox,
    "text": text,
    "logo": logo,
    "banner": banner,
    "tone": tone,
    "greyscale": greyscale,
    "screenshot": screenshot,
}
"""Every single edit by name, in the order reports list them."""


def combined(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """Two different single edits, one after the other, and their name (`crop+jpeg`)."""
    first, second = rng.choice(sorted(SINGLE_EDITS), 2, replace=False)
    image = SINGLE_EDITS[str(first)](image, rng)
    return SINGLE_EDITS[str(second)](image, rng), f"{first}+{second}"


def edited_copies(
    image: Image.Image, rng: np.random.Generator, per_edit: int = 1, combos: int = 2
) -> list[tuple[str, Image.Image]]:
    """`per_edit` copies for every single edit and `combos` two-edit copies of `image`,
    each named by its edit(s)."""
    image = image.convert("RGB")
    copies = [
        (name, edit(image, rng)) for name, edit in SINGLE_EDITS.items() for _ in range(per_edit)
    ]
    for _ in range(combos):
        edited, name = combined(image, rng)
        copies.append((name, edited))
    return copies


def region(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A hard negative: a region of 25-40% of each side, blown up to the image's size. It
    shows part of the same photo, so it is not a copy of it."""
    keep = rng.uniform(0.25, 0.4)
    w, h = max(1, round(image.width * keep)), max(1, round(image.height * keep))
    x, y = int(rng.integers(0, image.width - w + 1)), int(rng.integers(0, image.height - h + 1))
    return (
        image.convert("RGB").crop((x, y, x + w, y + h)).resize(image.size, Image.Resampling.BICUBIC)
    )
