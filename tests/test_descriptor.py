"""Descriptor steps on small arrays (pooling, regions, border trimming), the same pooling in
the Keras graph, and `avg` giving the features it gave before descriptors existed."""

from __future__ import annotations

import io
import tempfile
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image, ImageOps

from imgsim_dask.decode import decode_image
from imgsim_dask.descriptor import (
    DESCRIPTORS,
    gem_pool,
    region_boxes,
    regional_gem,
    uniform_border_box,
)

if TYPE_CHECKING:
    import keras


def maps(seed: int = 0, size: int = 7, channels: int = 16) -> np.ndarray:
    """ReLU6-like activations: non-negative, some exactly zero."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(1.0, 1.5, (3, size, size, channels)), 0, 6).astype(np.float32)


def test_gem_with_p_1_is_average_pooling_and_grows_towards_max_pooling():
    x = maps()
    np.testing.assert_allclose(gem_pool(x, 1.0), x.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    p3, p50 = gem_pool(x, 3.0), gem_pool(x, 50.0)
    assert np.all(p3 >= x.mean(axis=(1, 2)) - 1e-6)  # the power mean grows with p
    np.testing.assert_allclose(p50, x.max(axis=(1, 2)), rtol=0.1)


def test_rmac_regions_cover_the_map_at_every_level_and_one_level_is_gem():
    boxes = region_boxes(7, 3)
    assert boxes[0] == (0, 0, 7)
    assert len(boxes) == 1 + 4 + 9
    for level, start, count in ((2, 1, 4), (3, 5, 9)):
        covered = np.zeros((7, 7), bool)
        for top, left, side in boxes[start : start + count]:
            assert side == -(-14 // (level + 1)) and top + side <= 7 and left + side <= 7
            covered[top : top + side, left : left + side] = True
        assert covered.all(), f"level {level} leaves cells out"
    x = maps(1)
    one = regional_gem(x, 3.0, levels=1)
    gem = gem_pool(x, 3.0)
    np.testing.assert_allclose(one, gem / np.linalg.norm(gem, axis=-1, keepdims=True), rtol=1e-5)


def photo(width: int = 120, height: int = 80, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_border_trim_finds_a_frame_bars_and_a_screenshot_margin():
    inner = photo()
    framed = np.full((80 + 2 * 9, 120 + 2 * 13, 3), (250, 250, 250), np.uint8)
    framed[9:89, 13:133] = inner
    assert uniform_border_box(framed) == (13, 9, 133, 89)

    bars = np.zeros((80 + 40, 120, 3), np.uint8)  # letterbox: black bars above and below
    bars[25:105] = inner
    assert uniform_border_box(bars) == (0, 25, 120, 105)

    # a screenshot: a blue title bar across the top, grey margins, the photo off-centre; the
    # columns beside the photo are uniform only below the title bar
    shot = np.full((200, 260, 3), 235, np.uint8)
    shot[:14] = (60, 90, 200)
    shot[40:120, 70:190] = inner
    assert uniform_border_box(shot) == (70, 40, 190, 120)


def test_border_trim_leaves_photos_without_borders_and_blank_images_whole():
    assert uniform_border_box(photo()) == (0, 0, 120, 80)
    assert uniform_border_box(np.full((50, 60, 3), 128, np.uint8)) == (0, 0, 60, 50)
    # a thin strip of content in a blank image: less than `keep` of an axis stays whole
    strip = np.full((100, 100, 3), 255, np.uint8)
    strip[48:52] = photo(100, 4)
    assert uniform_border_box(strip, keep=0.2)[1::2] == (0, 100)


def test_decode_trims_a_frame_before_the_resize():
    """A framed JPEG decodes, trimmed, to nearly the pixels of the unframed one (borders
    are found on a small copy, so a pixel or two of the photo may go too)."""
    smooth = Image.fromarray(photo(8, 6, 3)).resize((480, 320), Image.Resampling.BICUBIC)
    image = smooth

    def jpeg(im: Image.Image) -> bytes:
        out = io.BytesIO()
        im.save(out, "JPEG", quality=95)
        return out.getvalue()

    framed = ImageOps.expand(image, border=60, fill=(0, 0, 0))
    plain = decode_image(jpeg(image), 224)[0].astype(np.float32)
    trimmed = decode_image(jpeg(framed), 224, trim_borders=True)[0].astype(np.float32)
    untrimmed = decode_image(jpeg(framed), 224)[0].astype(np.float32)
    assert np.abs(trimmed - plain).mean() < 6
    assert np.abs(untrimmed - plain).mean() > 3 * np.abs(trimmed - plain).mean()


def test_every_descriptor_names_a_pooling_the_models_build():
    assert {d.pooling for d in DESCRIPTORS.values()} <= {"avg", "gem", "rmac"}
    assert DESCRIPTORS["avg"].key == "avg/v1" and not DESCRIPTORS["avg"].trim_borders
    assert DESCRIPTORS["rmac-trim"].trim_borders


@pytest.mark.slow
def test_keras_pooling_layers_equal_the_numpy_steps():
    import keras

    from imgsim_dask.models.pooling import pooling_layer

    x = maps(2, channels=32)
    inputs = keras.Input(x.shape[1:])
    for pooling, expected in (
        ("avg", x.mean(axis=(1, 2))),
        ("gem", gem_pool(x, 3.0)),
        ("rmac", regional_gem(x)),
    ):
        model = keras.Model(inputs, pooling_layer(pooling)(inputs))
        np.testing.assert_allclose(model.predict_on_batch(x), expected, rtol=1e-5, atol=1e-6)


def model_before_descriptors() -> keras.Model:
    """MobileNet as `build_mobilenet` built it before descriptors existed (0.1.0)."""
    import keras
    from keras import layers

    backbone = keras.applications.MobileNet(
        input_shape=(224, 224, 3), alpha=1.0, include_top=False, weights=None,
        pooling="avg", name="mobilenet_1.00_224",
    )  # fmt: skip
    pixels = keras.Input((224, 224, 3), name="pixels")
    scaled = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="mobilenet_preprocess")(pixels)
    return keras.Model(pixels, backbone(scaled), name="imgsim_mobilenet")


@pytest.mark.slow
def test_avg_gives_the_features_of_the_model_before_descriptors_bit_for_bit():
    from imgsim_dask.models import RANDOM, build_model, resolve_weights

    model = build_model(resolve_weights("mobilenet", RANDOM), tempfile.gettempdir(), "avg")
    before = model_before_descriptors()
    before.set_weights(model.get_weights())
    pixels = np.stack([photo(224, 224, 5), photo(224, 224, 6)]).astype(np.float32)
    assert np.array_equal(model.predict_on_batch(pixels), before.predict_on_batch(pixels))
    assert [type(layer).__name__ for layer in model.layers] == [
        type(layer).__name__ for layer in before.layers
    ]
