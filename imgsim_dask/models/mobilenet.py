"""MobileNet v1 (alpha 1.0, 224, no top, global average pooling): the original's 1024-d features.
Another input size takes the same weights (every layer is convolutional).

Keras is imported only to build the model or download its weights, so the driver can check
a weights file against `weight_shapes` without TensorFlow. `SPEC` is the model's registry entry.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import WeightsError, opt
from .pooling import pooling_layer
from .spec import ModelSpec
from .weights import Weights, keras_cache_dir, read_weights_file

if TYPE_CHECKING:
    import keras

IMAGE_SIZE = 224
FEATURE_DIM = 1024
BACKBONE = f"mobilenet_1.00_{IMAGE_SIZE}"  # the backbone's layer name, as Keras names it
WEIGHTS_FILE = "mobilenet_1_0_224_tf_no_top.h5"
WEIGHTS_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/" + WEIGHTS_FILE
)
# output channels of the 13 depthwise-separable blocks
_BLOCK_CHANNELS = (64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)


def build_mobilenet(
    weights_path: str | None = None, pooling: str = "avg", image_size: int = IMAGE_SIZE
) -> keras.Model:
    """A model taking raw RGB pixels 0..255 (float32, `image_size` a side, 224 unless told)
    and returning 1024-d features, its last feature map pooled by `pooling` (`models.pooling`).

    MobileNet's preprocessing (scale to [-1, 1]) is the model's first layer, so workers
    can ship uint8 pixels and never hold float copies. `weights_path=None` keeps the
    (seeded) random initialisation.
    """
    import keras
    from keras import layers

    backbone = keras.applications.MobileNet(
        input_shape=(image_size, image_size, 3),
        alpha=1.0,
        include_top=False,
        weights=None,
        pooling="avg" if pooling == "avg" else None,  # avg: the original's model, exactly
        name=BACKBONE,  # (at any size: the weights files name it so)
    )
    if weights_path is not None:
        backbone.load_weights(weights_path)
    pixels = keras.Input((image_size, image_size, 3), name="pixels")
    scaled = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="mobilenet_preprocess")(pixels)
    features = backbone(scaled)
    if pooling != "avg":
        features = pooling_layer(pooling)(features)
    return keras.Model(pixels, features, name="imgsim_mobilenet")


def weight_shapes() -> list[tuple[int, ...]]:
    """The shapes of the backbone's weights in Keras order, computed without Keras: each
    convolution's kernel, then its batch norm's gamma, beta, moving mean and variance."""
    shapes: list[tuple[int, ...]] = [(3, 3, 3, 32)] + [(32,)] * 4
    cin = 32
    for cout in _BLOCK_CHANNELS:
        shapes += [(3, 3, cin, 1)] + [(cin,)] * 4 + [(1, 1, cin, cout)] + [(cout,)] * 4
        cin = cout
    return shapes


def download_weights() -> str:
    """Fetch the ImageNet weights into the Keras cache (needs internet); return the path."""
    import keras

    with contextlib.redirect_stdout(sys.stderr):  # Keras prints its progress to stdout
        return keras.utils.get_file(WEIGHTS_FILE, WEIGHTS_URL, cache_subdir="models")


def default_weights(spec: ModelSpec) -> Weights:
    """The ImageNet weights from the Keras cache, downloaded there if missing."""
    cached = keras_cache_dir() / "models" / WEIGHTS_FILE
    if cached.is_file():
        return read_weights_file(spec, cached, f"keras cache {cached}")
    try:
        downloaded = Path(download_weights())
    except Exception as exc:  # Keras wraps every network failure differently
        root: BaseException = exc  # the root cause says why
        while (cause := root.__cause__ or root.__context__) is not None:
            root = cause
        reason = " ".join(str(root).split())[:160] or type(root).__name__
        raise WeightsError(
            f"MobileNet ImageNet weights unavailable (download failed: {reason}); provide them "
            f"with {opt('weights')} PATH, or put {WEIGHTS_FILE} in {cached.parent}, or use "
            f"{opt('model')} efficientnet-lite0 (its weights install offline)"
        ) from None
    return read_weights_file(spec, downloaded, f"keras download {downloaded}")


def _load_weights(model: keras.Model, path: str | None, suffix: str) -> None:
    """Load a Keras HDF5 file, in either layout (Keras reads it from the name), into the
    backbone. MobileNet's default weights are a file, always shipped."""
    model.get_layer(BACKBONE).load_weights(path)


SPEC = ModelSpec(
    name="mobilenet",
    dim=FEATURE_DIM,
    image_size=IMAGE_SIZE,
    default_descriptor="avg",
    thresholds={"avg": 0.845},  # the original's; other descriptors: measure (calibrate)
    summary="MobileNet v1, ImageNet, global average pooling (as the original)",
    weight_shapes=weight_shapes,
    default_weights=default_weights,
    build=lambda pooling, size: build_mobilenet(pooling=pooling, image_size=size),
    load_weights=_load_weights,
)
