"""The descriptor's pooling as a Keras layer, appended to a model's last feature map (on a
worker: imports Keras). The numpy references are in `imgsim_dask.descriptor`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..descriptor import GEM_EPSILON, GEM_P, RMAC_LEVELS, region_weights

if TYPE_CHECKING:
    import keras


def pooling_layer(pooling: str) -> keras.layers.Layer:
    """The layer that turns (batch, size, size, channels) maps into vectors for `pooling`
    ("avg", "gem" or "rmac")."""
    import keras
    from keras import ops

    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="avg_pool")

    def gem(x):
        return ops.power(ops.mean(ops.power(ops.maximum(x, GEM_EPSILON), GEM_P), axis=(1, 2)),
                         1.0 / GEM_P)  # fmt: skip

    if pooling == "gem":
        return keras.layers.Lambda(gem, name="gem_pool")

    def rmac(x):
        # every region's mean of x^p in one matmul: (regions, cells) weights @ (cells, channels)
        size, channels = int(x.shape[1]), int(x.shape[-1])
        powered = ops.reshape(
            ops.power(ops.maximum(x, GEM_EPSILON), GEM_P), (-1, size * size, channels)
        )
        means = ops.matmul(ops.convert_to_tensor(region_weights(size, RMAC_LEVELS)), powered)
        pooled = ops.power(means, 1.0 / GEM_P)  # (batch, regions, channels)
        norm = ops.sqrt(ops.sum(pooled * pooled, axis=-1, keepdims=True))
        return ops.sum(pooled / ops.maximum(norm, 1e-12), axis=1)

    if pooling == "rmac":
        return keras.layers.Lambda(rmac, name="rmac_pool")
    raise ValueError(f"unknown pooling {pooling!r}")
