"""Real images for tests: scikit-image's sample photographs, and the original's demo set."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The original project's demo images (book covers 1-6), where the checkout has them.
SEED_DEMO = Path(__file__).resolve().parents[3] / "shared" / "seed" / "demo"


def sample_images() -> dict[str, np.ndarray]:
    """Distinct real photographs shipped by scikit-image, as RGB uint8."""
    from skimage import data

    images = {
        "astronaut": data.astronaut(),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
        "camera": np.stack([data.camera()] * 3, axis=-1),
    }
    return images
