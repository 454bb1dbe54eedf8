"""Runtimes: what executes the built Keras model on a worker.

- `keras`: Keras' own `predict_on_batch` (TensorFlow); the runtime for GPUs.
- `openvino`: the same model exported to OpenVINO IR by Keras (`model.export(...,
  format="openvino")`) and compiled for the CPU in float32, about 2x Keras' speed on CPU
  for MobileNet with features equal to cosine 1 - 1e-6 (docs/benchmarks.md).
- `auto` (default): `openvino` on a worker whose Keras backend is TensorFlow, TensorFlow
  sees no GPU and openvino is installed; else `keras`. Each worker decides for itself.

Both take pixels 0..255 of shape (batch, size, size, 3) as `input_dtype` and return float32
features.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from .errors import ImgsimError, opt


class KerasPredictor:
    """Keras' `predict_on_batch`."""

    name = "keras"
    input_dtype = np.float32

    def __init__(self, model):
        self.model = model
        self.dim = int(model.output_shape[-1])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(batch), np.float32)


class OpenVINOPredictor:
    """The model as OpenVINO IR, compiled for the CPU in float32 with the latency hint (one
    stream using every core, the best single-batch throughput on a small CPU). It takes
    uint8 pixels and converts them inside the graph, on all cores (7-10% faster than a
    float32 copy made in numpy first)."""

    name = "openvino"
    input_dtype = np.uint8

    def __init__(self, model):
        import openvino as ov

        with tempfile.TemporaryDirectory(prefix="imgsim-openvino-") as tmp:
            ir_path = os.path.join(tmp, "model.xml")  # the weights go to model.bin beside it
            model.export(ir_path, format="openvino", verbose=False)
            core = ov.Core()
            preprocess = ov.preprocess.PrePostProcessor(core.read_model(ir_path))
            preprocess.input().tensor().set_element_type(ov.Type.u8)
            self.compiled = core.compile_model(
                preprocess.build(),
                "CPU",
                {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"},
            )
        self.dim = int(model.output_shape[-1])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        # one request per call: a compiled model may serve several threads, a request may not
        return self.compiled.create_infer_request().infer(batch)[0]


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_runtime(runtime: str) -> str:
    """The runtime `auto` means on this worker (`runtime` is checked by ExtractOptions)."""
    if runtime == "openvino" and not openvino_available():
        raise ImgsimError(
            f"{opt('runtime')} openvino: the openvino package is not installed on the "
            f"model worker (pip install openvino), or use {opt('runtime')} keras"
        )
    if runtime != "auto":
        return runtime
    import keras

    if keras.backend.backend() != "tensorflow" or not openvino_available():
        return "keras"  # JAX, torch: Keras' OpenVINO export of those needs TensorFlow or torch
    import tensorflow as tf

    return "keras" if tf.config.list_physical_devices("GPU") else "openvino"


Predictor = KerasPredictor | OpenVINOPredictor


def make_predictor(model, runtime: str = "auto") -> Predictor:
    """A predictor running the built Keras `model` with `runtime` on this worker."""
    if resolve_runtime(runtime) == "openvino":
        return OpenVINOPredictor(model)
    return KerasPredictor(model)
