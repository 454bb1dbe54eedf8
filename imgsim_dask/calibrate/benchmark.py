"""The accuracy benchmark's images: the photographs that install with scikit-image (and
scikit-learn's two, where it is installed), edited copies of each (`edits`), and hard
negatives. `scripts/bench_accuracy.py` scores them; the tests calibrate on a part of them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .edits import edited_copies, region

logger = logging.getLogger(__name__)

SKIMAGE_PHOTOS = (
    "astronaut", "camera", "chelsea", "coffee", "coins", "brick", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text",
    "cell", "clock", "colorwheel", "logo",
)  # fmt: skip
SKIMAGE_FILES = (
    "motorcycle_left.png",
    "phantom.png",
)  # not color.png (= colorwheel), not a chessboard (its regions are all alike)
FACES = 24  # different people's faces (LFW subset): negatives of one another


def originals() -> list[tuple[str, Image.Image]]:
    """The photographs that install with scikit-image (and scikit-learn, when installed)."""
    import skimage
    import skimage.data

    photos = []
    for name in SKIMAGE_PHOTOS:
        pixels = np.asarray(getattr(skimage.data, name)())
        if pixels.dtype == bool:
            pixels = pixels.astype(np.uint8) * 255
        photos.append((name, Image.fromarray(pixels).convert("RGB")))
    folder = Path(skimage.data.__file__).parent
    for file in SKIMAGE_FILES:
        photos.append((Path(file).stem, Image.open(folder / file).convert("RGB")))
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        logger.info("scikit-learn is not installed: its two sample photos are left out")
    else:
        for name, pixels in zip(("china", "flower"), load_sample_images().images):
            photos.append((name, Image.fromarray(pixels)))
    return photos


def faces() -> list[tuple[str, Image.Image]]:
    """`FACES` faces of different people (scikit-image's LFW subset, 25 px, enlarged)."""
    import skimage.data

    stack = skimage.data.lfw_subset()[:FACES]
    return [
        (f"face{i}", Image.fromarray((face * 255).astype(np.uint8)).convert("RGB").resize(
            (100, 100), Image.Resampling.BICUBIC))
        for i, face in enumerate(stack)
    ]  # fmt: skip


def build_set(root: Path, seed: int, per_edit: int = 2, combos: int = 4) -> pd.DataFrame:
    """Write the benchmark's images under `root`; return its table (file, group, kind, edit):
    each photograph, `per_edit` copies of it per edit and `combos` two-edit copies, two
    blown-up regions of it, and the faces. `group` names the photograph an image shows;
    blown-up regions and faces are groups of their own."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, str]] = []

    def save(image: Image.Image, group: str, kind: str, edit: str) -> None:
        file = root / f"{len(records):04d}-{group}-{edit.replace('+', '_')}.jpg"
        image.save(file, "JPEG", quality=95)
        records.append({"file": str(file), "group": group, "kind": kind, "edit": edit})

    for name, photo in originals():
        save(photo, name, "original", "original")
        for edit, copy in edited_copies(photo, rng, per_edit=per_edit, combos=combos):
            save(copy, name, "copy", edit)
        for k in range(2):
            save(region(photo, rng), f"{name}~region{k}", "negative", "region")
    for name, face in faces():
        save(face, name, "negative", "face")
    return pd.DataFrame(records)
