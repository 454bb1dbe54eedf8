"""Model runtimes: OpenVINO gives Keras' float32 features, `auto` decides per worker, and a
runtime that cannot run is one clear line."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imgsim_dask import ExtractOptions, extract
from imgsim_dask.embed import embed_pixels
from imgsim_dask.errors import ImgsimError
from imgsim_dask.models import build_model, get_spec, resolve_weights
from imgsim_dask.runtime import (
    GPU_DEVICE_NODES,
    KerasPredictor,
    OpenVINOPredictor,
    ir_cache_dir,
    ir_key,
    load_predictor,
    resolve_runtime,
)

from support.images import sample_images


def photos(size: int = 224) -> np.ndarray:
    """The sample photographs at `size` x `size`, plus a darker copy of each (near-duplicates)."""
    resized = [
        np.asarray(Image.fromarray(p).resize((size, size))) for p in sample_images().values()
    ]
    darker = [(image * 0.8).astype(np.uint8) for image in resized]
    return np.stack(resized + darker)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mobilenet", "efficientnet-lite0"])
def test_openvino_features_equal_keras_float32(model, mobilenet_h5, tmp_path):
    weights = resolve_weights(model, str(mobilenet_h5) if model == "mobilenet" else None)
    keras_model = build_model(weights, str(tmp_path))
    pixels = photos(get_spec(model).image_size)  # (efficientnet-lite0's is 160)
    reference = embed_pixels(KerasPredictor(keras_model), pixels, 8)
    openvino = OpenVINOPredictor.from_keras(keras_model)
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


@pytest.mark.slow
def test_a_second_load_reads_the_cached_model_without_building_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    weights = resolve_weights("mobilenet", "random")
    built: list[str] = []

    def build(pooling: str, size: int = 224):
        def make():
            built.append(f"{pooling}@{size}")
            return build_model(weights, str(tmp_path), pooling, size)

        return make

    first = load_predictor(weights, "avg", 224, "openvino", build("avg"))
    second = load_predictor(weights, "avg", 224, "openvino", build("avg"))
    assert built == ["avg@224"]  # the second came from the cache
    pixels = photos()
    cached = embed_pixels(second, pixels, 8)
    assert np.array_equal(embed_pixels(first, pixels, 8), cached)
    reference = embed_pixels(KerasPredictor(build_model(weights, str(tmp_path))), pixels, 8)
    assert np.abs(cached - reference).max() < 1e-4  # float32 kept, not compressed to fp16
    entries = sorted(p.name for p in ir_cache_dir().iterdir() if p.name != "compiled")
    assert entries == [f"mobilenet-{ir_key(weights, 'avg', 224)}"]
    assert any((ir_cache_dir() / "compiled").iterdir())  # OpenVINO's compiled model
    load_predictor(weights, "gem", 224, "openvino", build("gem"))  # another pooling: its own
    small = load_predictor(weights, "avg", 160, "openvino", build("avg", 160))  # and size
    assert built == ["avg@224", "gem@224", "avg@160"] and len(list(ir_cache_dir().iterdir())) == 4
    assert embed_pixels(small, photos(160), 8).shape == (len(pixels), 1024)
    # a worker that finds the cached model neither builds it nor imports TensorFlow
    script = (
        "import sys\n"
        "from imgsim_dask.models import resolve_weights\n"
        "from imgsim_dask.runtime import load_predictor\n"
        "def build(): raise AssertionError('built')\n"
        "p = load_predictor(resolve_weights('mobilenet', 'random'), 'avg', 224, 'auto', build)\n"
        "print(p.name, p.dim, 'tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    if any(os.path.exists(node) for node in GPU_DEVICE_NODES):
        pytest.skip("a GPU device is here: auto asks TensorFlow whether it sees it")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["openvino", "1024", "False", "False"]


def test_a_cache_that_cannot_be_written_only_costs_the_export(tmp_path, monkeypatch, caplog):
    (tmp_path / "keras").write_text("a file where the cache directory would go")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    weights = resolve_weights("mobilenet", "random")
    predictor = load_predictor(
        weights, "avg", 224, "openvino", lambda: build_model(weights, str(tmp_path))
    )
    assert predictor.dim == 1024 and predictor(photos()[:8]).shape == (8, 1024)
    assert "cannot cache the OpenVINO model in" in caplog.text
