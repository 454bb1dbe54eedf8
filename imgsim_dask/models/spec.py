"""What a registered model is: `ModelSpec`, its data and the behaviour its module gives it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

    from .weights import Weights


@dataclass(frozen=True)
class ModelSpec:
    """A model: what it produces, how its similarities read, how its weights are found, checked
    and loaded. Each model's module defines its own (`SPEC`); only `build` and `load_weights`
    may import Keras, so the driver uses the rest without TensorFlow."""

    name: str
    dim: int  # feature dimension
    image_size: int  # input pixels a side (square), unless an extraction asks for another
    default_descriptor: str  # a name in `descriptor.DESCRIPTORS`
    thresholds: dict[str, float]
    """The cosine threshold for "same image" measured for each descriptor (docs/accuracy.md),
    by its name at `image_size` and as `name@size` at another input size; one without a
    threshold has none by default (calibrate, or pass one)."""
    summary: str
    weight_shapes: Callable[[], list[tuple[int, ...]]]
    """Every weight shape of the Keras model (no top), in order, computed without Keras."""
    default_weights: Callable[[ModelSpec], Weights]
    """The weights used when none are named, found on the driver."""
    build: Callable[[str, int], keras.Model]
    """The Keras model, unweighted, for a pooling (`models.pooling`) and an input size (pixels
    a side), on a worker."""
    load_weights: Callable[[keras.Model, str | None, str], None]
    """Load into a built model the weights file at a path, in the format its suffix names
    (`weights.HDF5`, `weights.KERAS3`, `weights.TORCH`); None: the default weights, which
    are not shipped."""
    check_torch_checkpoint: Callable[[Path], None] | None = None
    """Takes PyTorch checkpoints too: raise WeightsError unless the one at a path fits the
    model. None: the model takes Keras HDF5 weights only."""

    @property
    def threshold(self) -> float:
        """The threshold of the model's default descriptor at its own input size."""
        return self.thresholds[self.default_descriptor]

    def threshold_for(self, descriptor: str, image_size: int) -> float | None:
        """The measured threshold of a descriptor (by name) at an input size, if any."""
        key = descriptor if image_size == self.image_size else f"{descriptor}@{image_size}"
        return self.thresholds.get(key)
