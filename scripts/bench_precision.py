"""Would bfloat16 keep the features? Keras mixed_bfloat16 against float32 on real photos.

    python scripts/bench_precision.py

Clones each model with every layer under Keras' `mixed_bfloat16` policy (bfloat16
compute, float32 weights; emulated where the CPU has no BF16, so only the numbers matter
here, not the speed) and compares L2-normalised features with float32 on 13 photographs
shipped with scikit-image: the worst per-image cosine and the largest change of any
pairwise similarity. EfficientNet-Lite0 runs its real ImageNet weights; MobileNet runs
seeded random weights (its ImageNet file is not installable offline).
"""

import keras
import numpy as np
from PIL import Image
from skimage import data

from imgsim_dask.embed import embed_pixels
from imgsim_dask.models import build_model, resolve_weights
from imgsim_dask.runtime import KerasPredictor

PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "moon",
    "grass",
    "gravel",
    "coins",
    "page",
    "brick",
    "hubble_deep_field",
    "immunohistochemistry",
)


def photos() -> np.ndarray:
    images = []
    for name in PHOTOS:
        image = getattr(data, name)()
        image = np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3]
        images.append(np.asarray(Image.fromarray(image).resize((224, 224))))
    return np.stack(images)


def in_bfloat16(model: keras.Model) -> keras.Model:
    def layer_in_bfloat16(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": "mixed_bfloat16"})

    clone = keras.models.clone_model(model, clone_function=layer_in_bfloat16, recursive=True)
    clone.set_weights(model.get_weights())
    return clone


pixels = photos()
for name, weights in (("mobilenet", "random"), ("efficientnet-lite0", None)):
    model = build_model(resolve_weights(name, weights), "/tmp")
    full = embed_pixels(KerasPredictor(model), pixels, 16)
    half = embed_pixels(KerasPredictor(in_bfloat16(model)), pixels, 16)
    cosine = np.einsum("ij,ij->i", full, half).min()
    moved = np.abs(full @ full.T - half @ half.T).max()
    print(
        f"{name} ({'random' if weights else 'ImageNet'} weights): min cosine bfloat16 vs "
        f"float32 {cosine:.5f}, largest similarity change {moved:.4f}"
    )
