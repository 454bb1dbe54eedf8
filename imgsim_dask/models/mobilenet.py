"""MobileNet v1 (alpha 1.0, 224, no top, global average pooling): the original's 1024-d features."""

from __future__ import annotations

import keras
from keras import layers

IMAGE_SIZE = 224
WEIGHTS_FILE = "mobilenet_1_0_224_tf_no_top.h5"
WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/" + WEIGHTS_FILE


def build_mobilenet(weights_path: str | None) -> keras.Model:
    """A model taking raw RGB pixels 0..255 (float32, 224x224) and returning 1024-d features.

    MobileNet's preprocessing (scale to [-1, 1]) is the model's first layer, so workers
    can ship uint8 pixels and never hold float copies. `weights_path=None` keeps the
    (seeded) random initialisation.
    """
    backbone = keras.applications.MobileNet(
        input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), alpha=1.0, include_top=False,
        weights=None, pooling="avg",
    )
    if weights_path is not None:
        backbone.load_weights(weights_path)
    pixels = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="pixels")
    scaled = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="mobilenet_preprocess")(pixels)
    return keras.Model(pixels, backbone(scaled), name="imgsim_mobilenet")


def download_weights() -> str:
    """Fetch the ImageNet weights into the Keras cache (needs internet); return the path."""
    return keras.utils.get_file(WEIGHTS_FILE, WEIGHTS_URL, cache_subdir="models")
