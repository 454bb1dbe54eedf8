"""Read a legacy (non-zip) PyTorch checkpoint into numpy arrays without torch.

The one job of this module is :func:`load_torch_checkpoint`: parse the
``torch.save(..., _use_new_zipfile_serialization=False)`` stream format with a
restricted unpickler that only admits the handful of globals a tensor
state-dict needs, and return ``{name: numpy.ndarray}``.  Anything else in the
pickle (``os.system``, ``builtins.eval``, ...) raises :class:`CheckpointError`
before it can be called.

Legacy stream layout::

    pickle(MAGIC_NUMBER) pickle(PROTOCOL_VERSION) pickle(sys_info)
    pickle(obj)                 # storages as persistent ids
    pickle(storage_keys)        # list[str]
    for key in storage_keys:    # raw storage data, in that order
        int64 little-endian element count, then count * itemsize bytes
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
from typing import Any, BinaryIO

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..errors import WeightsError

__all__ = ["CheckpointError", "load_torch_checkpoint"]

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# torch storage class name -> numpy dtype (bfloat16 handled specially).
_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "BFloat16Storage": "<u2",  # widened to float32 after reading
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "params")


class CheckpointError(WeightsError):
    """The checkpoint is malformed or contains something other than tensors."""


class _StorageType:
    """Stand-in for a ``torch.*Storage`` class: only carries the dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])

    def __repr__(self) -> str:
        return f"<storage type torch.{self.name}>"


class _Storage:
    """A storage whose bytes are read after the main pickle."""

    __slots__ = ("key", "stype", "numel", "data")

    def __init__(self, key: str, stype: _StorageType, numel: int) -> None:
        self.key = key
        self.stype = stype
        self.numel = numel
        self.data: np.ndarray | None = None


class _StorageView:
    """Old-style storage view: ``numel`` elements of ``root`` from ``offset``."""

    __slots__ = ("root", "offset", "numel")

    def __init__(self, root: _Storage, offset: int, numel: int) -> None:
        self.root = root
        self.offset = offset
        self.numel = numel


class _LazyTensor:
    """A tensor description, materialised once storage bytes are known."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: Any, offset: int, size: tuple, stride: tuple) -> None:
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride

    def materialize(self) -> np.ndarray:
        st = self.storage
        base_off = 0
        if isinstance(st, _StorageView):
            base_off, st = st.offset, st.root
        if st.data is None:
            raise CheckpointError(f"storage {st.key!r} has no data")
        flat = st.data
        off = base_off + self.offset
        shape = tuple(self.size)
        strides = tuple(self.stride)
        if len(shape) != len(strides):
            raise CheckpointError("tensor size/stride rank mismatch")
        if any(d < 0 for d in shape) or any(s < 0 for s in strides):
            raise CheckpointError("negative tensor size or stride")
        if any(d == 0 for d in shape):
            return np.zeros(shape, dtype=flat.dtype)
        last = off + sum((d - 1) * s for d, s in zip(shape, strides))
        if off < 0 or last >= flat.shape[0]:
            raise CheckpointError("tensor view exceeds its storage")
        item = flat.dtype.itemsize
        view = as_strided(
            flat[off:],
            shape=shape,
            strides=tuple(s * item for s in strides),
            writeable=False,
        )
        return np.array(view, dtype=flat.dtype, order="C", copy=True)


def _check_int_tuple(value: Any, what: str) -> tuple:
    if isinstance(value, int):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
        raise CheckpointError(f"bad tensor {what}: {value!r}")
    return tuple(value)


def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any) -> _LazyTensor:
    if not isinstance(storage, (_Storage, _StorageView)):
        raise CheckpointError("tensor rebuilt from something that is not a storage")
    if not isinstance(storage_offset, int):
        raise CheckpointError("bad tensor storage offset")
    return _LazyTensor(
        storage, storage_offset, _check_int_tuple(size, "size"), _check_int_tuple(stride, "stride")
    )


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: int,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _LazyTensor:
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    if not isinstance(data, _LazyTensor):
        raise CheckpointError("parameter rebuilt from something that is not a tensor")
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}
for _name in _STORAGE_DTYPES:
    _ALLOWED_GLOBALS[("torch", _name)] = _StorageType(_name)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler admitting only the globals of a tensor state-dict."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"refusing to load global {module}.{name}: only tensor "
                "state-dict contents are allowed in a checkpoint"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != "storage":
            raise CheckpointError(f"unsupported persistent id {pid!r}")
        _, stype, key, _location, numel, view_metadata = pid
        if not isinstance(stype, _StorageType):
            raise CheckpointError("persistent id does not name a torch storage type")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise CheckpointError("malformed storage persistent id")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, stype, numel)
        elif storage.stype is not stype or storage.numel != numel:
            raise CheckpointError(f"inconsistent declarations of storage {key!r}")
        if view_metadata is None:
            return storage
        try:
            _view_key, offset, view_numel = view_metadata
        except (TypeError, ValueError):
            raise CheckpointError("malformed storage view metadata") from None
        if not (isinstance(offset, int) and isinstance(view_numel, int)):
            raise CheckpointError("malformed storage view metadata")
        if offset < 0 or view_numel < 0 or offset + view_numel > numel:
            raise CheckpointError("storage view exceeds its storage")
        return _StorageView(storage, offset, view_numel)


def _read_storages(f: BinaryIO, storages: dict[str, _Storage], keys: list, remaining: int) -> None:
    for key in keys:
        if not isinstance(key, str) or key not in storages:
            raise CheckpointError(f"unknown storage key {key!r}")
        st = storages[key]
        header = f.read(8)
        if len(header) != 8:
            raise CheckpointError("truncated storage header")
        remaining -= 8
        (count,) = struct.unpack("<q", header)
        if count != st.numel:
            raise CheckpointError(
                f"storage {key!r}: declared {st.numel} elements, file has {count}"
            )
        nbytes = count * st.stype.dtype.itemsize
        if nbytes > remaining:
            raise CheckpointError("truncated storage data")
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise CheckpointError("truncated storage data")
        remaining -= nbytes
        arr = np.frombuffer(raw, dtype=st.stype.dtype)
        if st.stype.name == "BFloat16Storage":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        st.data = arr
    missing = [k for k, s in storages.items() if s.data is None]
    if missing:
        raise CheckpointError(f"{len(missing)} storages have no data, e.g. {missing[0]!r}")


def _unwrap(obj: Any) -> Any:
    while isinstance(obj, dict) and not any(isinstance(v, _LazyTensor) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            break
    return obj


def _parse(f: BinaryIO, size: int) -> dict[str, np.ndarray]:
    if f.read(4) == b"PK\x03\x04":
        raise CheckpointError(
            "this is a zip-format torch checkpoint; only the legacy format "
            "(torch.save(..., _use_new_zipfile_serialization=False)) is supported"
        )
    f.seek(0)
    magic = _RestrictedUnpickler(f).load()
    if magic != MAGIC_NUMBER:
        raise CheckpointError("not a legacy torch checkpoint (bad magic number)")
    version = _RestrictedUnpickler(f).load()
    if version != PROTOCOL_VERSION:
        raise CheckpointError(f"unsupported legacy protocol version {version!r}")
    sys_info = _RestrictedUnpickler(f).load()
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise CheckpointError("only little-endian checkpoints are supported")

    main = _RestrictedUnpickler(f)
    obj = main.load()
    keys = _RestrictedUnpickler(f).load()
    if not isinstance(keys, list):
        raise CheckpointError("storage key list missing")
    _read_storages(f, main.storages, keys, size - f.tell())

    obj = _unwrap(obj)
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint holds {type(obj).__name__}, not a state dict")
    out: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise CheckpointError(f"non-string state-dict key {name!r}")
        if isinstance(value, _LazyTensor):
            out[name] = value.materialize()
        # non-tensor entries (e.g. counters stored as ints) are skipped
    if not out:
        raise CheckpointError("checkpoint contains no tensors")
    return out


def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a legacy torch checkpoint as ``{name: contiguous numpy array}``.

    Raises :class:`CheckpointError` for any global outside the tensor
    state-dict allow-list, and for malformed or truncated files.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            return _parse(fh, size)
        except CheckpointError:
            raise
        except Exception as exc:  # malformed pickle streams, bad REDUCE targets...
            raise CheckpointError(f"cannot read checkpoint {os.fspath(path)!r}: {exc}") from exc
