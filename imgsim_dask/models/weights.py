"""Weights on the driver: `Weights`, how a model's are resolved, and which files fit a model.

Weights are resolved once on the driver (`resolve`) and travel to every worker inside the
model plugin, so remote workers need neither internet nor a shared filesystem. A weights
file is checked here first, without Keras, so a wrong file stops the run in one line before
anything is written.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import WeightsError, opt

if TYPE_CHECKING:
    from .spec import ModelSpec

logger = logging.getLogger(__name__)

RANDOM = "random"
RANDOM_SEED = 1234
# weight-file formats, named by the suffix their loaders need
HDF5 = ".h5"  # Keras' legacy HDF5 layout
KERAS3 = ".weights.h5"  # Keras 3's HDF5 layout
TORCH = ".pth"  # a PyTorch checkpoint, read without torch by torch_checkpoint.py


@dataclass(frozen=True)
class Weights:
    """Resolved weights: a description for humans and, for files, the bytes to ship to workers.

    `digest` is the sha256 of weights not shipped (an installed package's checkpoint).
    """

    model: str
    description: str  # for humans: "file PATH", "keras cache PATH", "random (seed N)", ...
    data: bytes | None = None
    suffix: str = ""
    digest: str = ""

    @property
    def is_random(self) -> bool:
        return self.description.startswith(RANDOM)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest() if self.data is not None else self.digest

    @property
    def token(self) -> str:
        """A short id of these exact weights (names the worker plugin)."""
        basis = self.sha256 or self.description
        return hashlib.sha256(f"{self.model}:{basis}".encode()).hexdigest()[:12]


def keras_cache_dir() -> Path:
    """Keras' cache directory (`$KERAS_HOME`, default `~/.keras`)."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")


def resolve(spec: ModelSpec, weights: str | None) -> Weights:
    """Find the weights for `spec`: an explicit path, `random`, or the model's default weights."""
    if weights == RANDOM:
        logger.warning(
            "RANDOM WEIGHTS (seed %d): features are NOT meaningful; "
            "use them for tests and benchmarks only",
            RANDOM_SEED,
        )
        return Weights(spec.name, f"{RANDOM} (seed {RANDOM_SEED})")
    if weights is not None:
        return read_weights_file(spec, Path(weights), f"file {weights}", given_as="weights")
    return spec.default_weights(spec)


def read_weights_file(
    spec: ModelSpec, path: Path, description: str, given_as: str | None = None
) -> Weights:
    """The weights file at `path` (described as `description`), once checked to fit `spec`;
    `given_as`: the option that named it, which its errors then name (`--weights` in the CLI)."""
    named = f"{opt(given_as)} file {path}" if given_as else f"weights file {path}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"cannot read {named}: {exc.strerror or exc}") from None
    return Weights(spec.name, description, data, check_weights_file(spec, path, data, named))


def check_weights_file(spec: ModelSpec, path: Path, data: bytes, named: str = "") -> str:
    """Refuse, in one line, a file that is not weights for `spec`; return its format's suffix.

    Told apart by content, not name: a legacy torch checkpoint, for models that take one,
    must pass the model's own check; an HDF5 file, in Keras' legacy `.h5` layout or Keras 3's
    `.weights.h5`, must hold exactly the model's weight shapes. `named`: the file as errors
    name it (default `weights file PATH`).
    """
    model = spec.name
    named = named or f"weights file {path}"
    if data[:1] == b"\x80" or data[:4] == b"PK\x03\x04":  # a pickle, or torch's zip format
        if spec.check_torch_checkpoint is None:
            raise WeightsError(
                f"{named} is a PyTorch checkpoint; {model} needs Keras HDF5 weights (.h5)"
            )
        try:
            spec.check_torch_checkpoint(path)
        except WeightsError as exc:
            raise WeightsError(f"{named} is not {model} weights: {exc}") from None
        return TORCH
    try:
        shapes, legacy = _hdf5_layout(path)
    except Exception:  # h5py reports a foreign or damaged file in many ways
        torch = " or a PyTorch checkpoint (.pth)" if spec.check_torch_checkpoint else ""
        raise WeightsError(f"{named} is not Keras HDF5 weights (.h5, .weights.h5){torch}") from None
    expected = spec.weight_shapes()
    if sorted(shapes) != sorted(expected):
        raise WeightsError(
            f"{named} does not fit {model}: it holds {len(shapes)} arrays of "
            f"{sum(map(np.prod, shapes)):,.0f} values, {model} (no top) has {len(expected)} of "
            f"{sum(map(np.prod, expected)):,.0f}; weights of another model?"
        )
    return HDF5 if legacy else KERAS3


def _hdf5_layout(path: Path) -> tuple[list[tuple[int, ...]], bool]:
    """The shapes of every array in an HDF5 weights file, and whether its layout is legacy."""
    import h5py

    with h5py.File(path, "r") as f:
        # as Keras' loader: a whole-model .h5 keeps its weights under `model_weights`
        whole = "layer_names" not in f.attrs and "model_weights" in f
        group = f["model_weights"] if whole else f
        shapes: list[tuple[int, ...]] = []
        group.visititems(
            lambda _, obj: shapes.append(obj.shape) if isinstance(obj, h5py.Dataset) else None
        )
        return shapes, "layer_names" in group.attrs
