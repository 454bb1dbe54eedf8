"""The model registry: every model by name, its entry (`ModelSpec`) defined in its own module.

Adding a model is its module, defining `SPEC`, and one line in `MODELS`. Importing this
package never imports Keras: the driver resolves and checks weights (`resolve_weights`)
without TensorFlow; models are built on workers only (`build_model`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import WeightsError, opt
from . import efficientnet_lite, mobilenet
from .build import build, set_seeded_weights
from .spec import ModelSpec
from .weights import RANDOM, RANDOM_SEED, Weights, keras_cache_dir, resolve

if TYPE_CHECKING:
    import keras

__all__ = [
    "MODELS",
    "RANDOM",
    "RANDOM_SEED",
    "ModelSpec",
    "Weights",
    "build_model",
    "get_spec",
    "keras_cache_dir",
    "resolve_weights",
    "set_seeded_weights",
]

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        mobilenet.SPEC,
        efficientnet_lite.SPEC,
    )
}


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered model, or a one-line error listing the choices."""
    try:
        return MODELS[name]
    except KeyError:
        raise WeightsError(
            f"unknown {opt('model')} {name!r}; choose one of: {', '.join(MODELS)}"
        ) from None


def resolve_weights(model: str, weights: str | None) -> Weights:
    """Find the weights for `model`: an explicit path, `random`, or the model's default source."""
    return resolve(get_spec(model), weights)


def build_model(
    weights: Weights, workdir: str, pooling: str = "avg", image_size: int | None = None
) -> keras.Model:
    """Build the Keras model for `weights`, `pooling` and an input size (None: the model's),
    on a worker; file weights are written to `workdir`."""
    spec = get_spec(weights.model)
    return build(spec, weights, workdir, pooling, image_size or spec.image_size)
