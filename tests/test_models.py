"""Model registry and weights resolution: explicit file, Keras cache, failed download, random."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from imgsim_dask.errors import WeightsError
from imgsim_dask.models import build_model, get_spec, resolve_weights
from imgsim_dask.models.mobilenet import WEIGHTS_FILE


def test_specs():
    assert get_spec("mobilenet").dim == 1024 and get_spec("mobilenet").threshold == 0.845
    assert get_spec("efficientnet-lite0").dim == 1280
    with pytest.raises(WeightsError, match="choose one of: mobilenet, efficientnet-lite0"):
        get_spec("resnet")


def test_download_failure_names_every_way_out(tmp_path, monkeypatch):
    """No cache, no path, no network: one line naming --weights, the cache path and the offline model.

    The resolver is patched, so the attempted download never leaves this process.
    """
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    attempts = []

    def no_dns(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(WeightsError) as info:
        resolve_weights("mobilenet", None)
    message = str(info.value)
    assert attempts, "the Keras download path was not tried"
    assert "\n" not in message
    for hint in ("--weights PATH", str(tmp_path / "models"), "--model efficientnet-lite0"):
        assert hint in message


def unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_keras_cache_is_used_and_loaded(tmp_path, monkeypatch, mobilenet_h5):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / WEIGHTS_FILE).write_bytes(mobilenet_h5.read_bytes())
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    weights = resolve_weights("mobilenet", None)
    assert weights.source.startswith("keras cache") and weights.data == mobilenet_h5.read_bytes()

    from_cache = build_model(weights, str(tmp_path))
    explicit = build_model(resolve_weights("mobilenet", str(mobilenet_h5)), str(tmp_path))
    random = build_model(resolve_weights("mobilenet", "random"), str(tmp_path))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3)).astype(np.float32)
    a, b, c = (unit(m.predict_on_batch(pixels)) for m in (from_cache, explicit, random))
    assert a.shape == (2, 1024)
    assert np.allclose(a, b, atol=1e-6)
    assert (a * c).sum(axis=1).max() < 0.99  # other weights, other features


def test_random_weights_are_deterministic_and_loud(tmp_path, caplog):
    weights = resolve_weights("mobilenet", "random")
    assert "RANDOM WEIGHTS" in caplog.text and weights.is_random
    pixels = np.full((1, 224, 224, 3), 128, np.float32)
    one, two = (np.asarray(build_model(weights, str(tmp_path)).predict_on_batch(pixels))
                for _ in range(2))
    assert np.array_equal(one, two)


def test_partial_batches_use_a_few_small_shapes_with_the_same_features():
    """A partition with 3 `ok` rows runs a batch of 8, not 64, and gets the same features."""
    from imgsim_dask.embed import batch_rows, embed_pixels
    from imgsim_dask.runtime import KerasPredictor

    assert [batch_rows(n, 64) for n in (1, 3, 8, 9, 33, 64)] == [8, 8, 8, 16, 64, 64]
    assert batch_rows(5, 4) == 4
    model = build_model(resolve_weights("mobilenet", "random"), "")
    pixels = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    padded = np.zeros((64, 224, 224, 3), np.float32)
    padded[:3] = pixels
    full = model.predict_on_batch(padded)[:3]
    full /= np.linalg.norm(full, axis=1, keepdims=True)
    assert np.allclose(embed_pixels(KerasPredictor(model), pixels, 64), full, atol=1e-5)
