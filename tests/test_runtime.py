"""Model runtimes: OpenVINO gives Keras' float32 features, `auto` decides per worker, and a
runtime that cannot run is one clear line."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from imgsim_dask import ExtractOptions, extract
from imgsim_dask.embed import embed_pixels
from imgsim_dask.errors import ImgsimError
from imgsim_dask.models import build_model, resolve_weights
from imgsim_dask.runtime import KerasPredictor, OpenVINOPredictor, resolve_runtime

from support.images import sample_images


def photos() -> np.ndarray:
    """The sample photographs at 224 x 224, plus a darker copy of each (near-duplicates)."""
    resized = [np.asarray(Image.fromarray(p).resize((224, 224))) for p in sample_images().values()]
    darker = [(image * 0.8).astype(np.uint8) for image in resized]
    return np.stack(resized + darker)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mobilenet", "efficientnet-lite0"])
def test_openvino_features_equal_keras_float32(model, mobilenet_h5, tmp_path):
    weights = resolve_weights(model, str(mobilenet_h5) if model == "mobilenet" else None)
    keras_model = build_model(weights, str(tmp_path))
    pixels = photos()
    reference = embed_pixels(KerasPredictor(keras_model), pixels, 8)
    openvino = OpenVINOPredictor(keras_model)
    features = embed_pixels(openvino, pixels, 8)
    assert openvino.dim == reference.shape[1]
    assert np.einsum("ij,ij->i", features, reference).min() > 1 - 1e-5
    assert np.abs(features - reference).max() < 1e-4
    # similarities, what matching reads, agree to float32 noise
    assert np.abs(features @ features.T - reference @ reference.T).max() < 1e-4


def test_auto_is_openvino_on_a_cpu_and_keras_without_it(monkeypatch):
    import keras
    import tensorflow as tf

    on_cpu = not tf.config.list_physical_devices("GPU")
    assert resolve_runtime("auto") == ("openvino" if on_cpu else "keras")
    assert resolve_runtime("keras") == "keras"
    with monkeypatch.context() as patch:  # as under KERAS_BACKEND=jax (the GPU machine's setup)
        patch.setattr(keras.backend, "backend", lambda: "jax")
        assert resolve_runtime("auto") == "keras"
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    assert resolve_runtime("auto") == "keras"
    with pytest.raises(ImgsimError, match="pip install openvino.*use runtime keras") as info:
        resolve_runtime("openvino")  # named as the API calls it; the CLI names the flag
    assert "--" not in str(info.value)
    assert info.value.render(lambda name: "--" + name).startswith("--runtime openvino: ")
    with pytest.raises(ImgsimError, match="choose one of: auto, openvino, keras"):
        ExtractOptions(runtime="onnx")  # checked where options are made, not on a worker


def test_unknown_runtime_is_refused_before_any_work(tmp_path):
    csv = tmp_path / "in.csv"
    csv.write_text("url\na.jpg\n")
    with pytest.raises(ImgsimError, match="unknown runtime 'onnx'; choose one of"):
        extract(str(csv), "x", str(tmp_path / "store"), runtime="onnx")
    assert not (tmp_path / "store").exists()


def test_extract_records_the_runtime_and_both_agree(client, image_dir, tmp_path):
    csv = tmp_path / "in.csv"
    csv.write_text("url\n" + "".join(f"{image_dir / name}.jpg\n" for name in sample_images()))
    sources = {
        runtime: extract(
            str(csv), runtime, str(tmp_path), cluster=client, weights="random", runtime=runtime
        )
        for runtime in ("auto", "keras")
    }
    assert sources["auto"].meta.runtime == ["openvino"]
    assert sources["keras"].meta.runtime == ["keras"]
    auto, keras_ = (sources[r].features[:] for r in ("auto", "keras"))
    assert np.einsum("ij,ij->i", auto, keras_).min() > 1 - 1e-5
