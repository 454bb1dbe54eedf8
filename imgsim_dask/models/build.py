"""Building a model on a worker: its Keras model with the resolved weights loaded, or seeded."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from ..quiet import quiet_native_logs
from .weights import RANDOM_SEED, Weights

if TYPE_CHECKING:
    import keras

    from .spec import ModelSpec


def build(
    spec: ModelSpec, weights: Weights, workdir: str, pooling: str, image_size: int
) -> keras.Model:
    """Build `spec`'s Keras model with `weights`, `pooling` and `image_size` pixels a side of
    input; file weights are written to `workdir`."""
    quiet_native_logs()  # before TensorFlow loads: its C++ start-up chatter
    model = spec.build(pooling, image_size)
    if weights.is_random:
        set_seeded_weights(model)
    else:
        spec.load_weights(model, _shipped_file(weights, workdir), weights.suffix)
    return model


def _shipped_file(weights: Weights, workdir: str) -> str | None:
    """The path of the shipped weights once written to `workdir`; None if none were shipped."""
    if weights.data is None:
        return None
    path = os.path.join(workdir, f"imgsim-weights-{weights.sha256[:16]}{weights.suffix}")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(weights.data)
        os.replace(tmp, path)
    return path


def set_seeded_weights(model: keras.Model, seed: int = RANDOM_SEED) -> None:
    """Stand-in weights that depend on `seed` alone, never on global random state.

    (Keras' own initialisers draw from process-wide generators that other threads of a
    worker may advance, so two workers could build different "random" models.) Kernels are
    He-normal, batch norms the identity, biases zero.
    """
    values = []
    for i, variable in enumerate(model.weights):
        shape, name = tuple(variable.shape), variable.path
        if name.endswith(("gamma", "moving_variance")):
            values.append(np.ones(shape, np.float32))
        elif len(shape) >= 2:
            fan_in = int(np.prod(shape[:2])) if "depthwise" in name else int(np.prod(shape[:-1]))
            rng = np.random.default_rng([seed, i])
            values.append((rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32))
        else:
            values.append(np.zeros(shape, np.float32))
    model.set_weights(values)
