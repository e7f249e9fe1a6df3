"""The pickle inside a torch.save file, read without torch and without running its code.

Unpickling runs code named inside the file, so a restricted unpickler builds only the few objects
a state dict needs (tensors, storages, OrderedDict) and refuses every other global without calling
it. Tensors come back as lazy references (`TensorRef`), checked against the bytes behind them
before they are copied out as arrays.
"""

from __future__ import annotations

import collections
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resnet_jax.runtime.errors import UserError

__all__ = [
    "MAX_TENSOR_ELEMENTS", "StateDictUnpickler", "Storage", "TensorRef", "bfloat16_to_float32",
    "check_tensor", "to_array",
]  # fmt: skip

# torch storage class (`torch.FloatStorage`...) -> element dtype as stored on disk.
# bfloat16 has no numpy dtype: its raw 16 bits are read as uint16 and widened to float32.
_STORAGE_DTYPES = {
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "u2",
    "DoubleStorage": "f8",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}
# The largest tensor a supported architecture needs is wide_resnet's 1024x1024x3x3 conv (9.4M
# elements); 2**26 also leaves room for a classification head of 32,768 classes. Anything larger
# is refused before its bytes are read, so a small file cannot make us allocate gigabytes.
MAX_TENSOR_ELEMENTS = 2**26


class _NoState:
    """Refuses pickle's BUILD opcode, so a file cannot rewrite these objects after creation."""

    def __setstate__(self, state: Any) -> None:
        raise ValueError("the pickle tries to set the state of an object after building it")


@dataclass(frozen=True)
class _StorageType(_NoState):
    """Stands in for `torch.FloatStorage` and friends while unpickling."""

    name: str

    def dtype(self, byteorder: str) -> np.dtype:
        return np.dtype(_STORAGE_DTYPES[self.name]).newbyteorder(byteorder)


@dataclass
class Storage(_NoState):
    """A flat buffer of `numel` elements whose bytes are read only when a tensor needs them."""

    type: _StorageType
    numel: int
    read: Callable[[], np.ndarray] | None = None  # set by the format reader
    _data: np.ndarray | None = None

    def data(self) -> np.ndarray:
        if self._data is None:
            self._data = self.read()
        if len(self._data) < self.numel:
            raise ValueError("a storage is shorter than its header says")
        return self._data


@dataclass(frozen=True)
class _StorageView(_NoState):
    """A storage seen from element `start` on (legacy files could save views of storages)."""

    storage: Storage
    start: int = 0


@dataclass(frozen=True)
class TensorRef(_NoState):
    """What `torch._utils._rebuild_tensor*` would have built: a strided view into a storage."""

    storage: Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _ints(values: Any) -> tuple[int, ...]:
    if not isinstance(values, tuple | list) or not all(
        isinstance(v, int) and v >= 0 for v in values
    ):
        raise ValueError(f"bad tensor size or stride {values!r}")
    return tuple(values)


def _rebuild_tensor(view: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> TensorRef:
    """Replaces `_rebuild_tensor` and `_rebuild_tensor_v2` (requires_grad, hooks are ignored)."""
    if not isinstance(view, _StorageView) or not isinstance(storage_offset, int):
        raise TypeError("a tensor does not point at a storage")
    return TensorRef(view.storage, view.start + storage_offset, _ints(size), _ints(stride))


class _UnsupportedDtype(Exception):
    """Raised while unpickling a tensor whose dtype has no storage class (uint16, float8...)."""


@dataclass(frozen=True)
class _TorchDtype(_NoState):
    """Stands in for `torch.uint16` and friends, which name the dtype of newer tensor records."""

    name: str


def _rebuild_tensor_v3(*args: Any) -> Any:
    """torch writes `_rebuild_tensor_v3(..., dtype)` only for dtypes without a storage class."""
    dtype = next((a for a in args if isinstance(a, _TorchDtype)), None)
    raise _UnsupportedDtype(dtype.name if dtype else "unknown")


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    """Replaces `_rebuild_parameter(_with_state)`: a Parameter is just its tensor here."""
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


@dataclass(frozen=True)
class _Global(_NoState):
    """A fresh, immutable stand-in for an allowed global: a pickle may call it, never change it
    (pickle's BUILD would otherwise set attributes such as `__doc__` on the shared function)."""

    function: Callable[..., Any]

    def __call__(self, *args: Any) -> Any:
        return self.function(*args)


class StateDictUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `_ALLOWED_GLOBALS` and records the storages it meets."""

    def __init__(self, file: Any, path: Path, storages: dict[str, Storage]):
        super().__init__(file, encoding="utf-8")
        self.path = path
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _Global(_ALLOWED_GLOBALS[(module, name)])
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name.endswith("Storage"):  # e.g. ComplexFloatStorage
            raise self._unsupported(name.removesuffix("Storage"))
        if (module, name) == ("torch.storage", "UntypedStorage"):  # read by _rebuild_tensor_v3
            return _StorageType(name)
        if module == "torch" and name.isidentifier() and name.islower():  # torch.uint16...
            return _TorchDtype(name)
        raise UserError(
            f"{self.path} refers to '{module}.{name}', which a state dict never needs, so it "
            "was not loaded; re-save the weights alone with torch.save(model.state_dict(), path)."
        )

    def load(self) -> Any:
        try:
            return super().load()
        except _UnsupportedDtype as e:
            raise self._unsupported(str(e)) from None

    def _unsupported(self, dtype: str) -> UserError:
        return UserError(
            f"{self.path} holds tensors of type {dtype}, which ResNet weights do not use and "
            "this reader does not support; convert them with .float() and save again."
        )

    def persistent_load(self, pid: Any) -> _StorageView:
        # zip: ('storage', type, key, location, numel); legacy adds a view (key, offset, numel).
        if not (
            isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] in ("storage", b"storage")
        ):
            raise ValueError(f"unknown persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise TypeError(f"bad storage record {pid!r}")
        storage = self.storages.setdefault(key, Storage(storage_type, _ints([numel])[0]))
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return _StorageView(storage)
        return _StorageView(storage, _ints([view[1]])[0])


def check_tensor(ref: TensorRef, name: str, path: Path) -> None:
    """Refuse a tensor that would need more memory than its bytes in the file justify."""
    size, stride = ref.size, ref.stride
    if len(size) != len(stride):
        raise ValueError(f"the size and stride of '{name}' disagree")
    numel = math.prod(size)
    if max(numel, ref.storage.numel) > MAX_TENSOR_ELEMENTS:
        raise UserError(
            f"{path} declares a tensor '{name}' of {max(numel, ref.storage.numel):,} elements, "
            "more than any supported ResNet needs, so it was not loaded; check the file."
        )
    if numel == 0:
        return
    if any(s == 0 and n > 1 for n, s in zip(size, stride)):
        raise UserError(
            f"{path} stores '{name}' as one value repeated along a dimension (stride 0), which no "
            "state dict holds; save a .contiguous() copy of it instead."
        )
    last = ref.offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= ref.storage.numel or numel > ref.storage.numel:
        raise ValueError(f"'{name}' reaches past the end of its storage or overlaps itself")


def to_array(ref: TensorRef) -> np.ndarray:
    """Copy a tensor's strided view out of its storage (after `check_tensor` bounded it)."""
    if 0 in ref.size:
        array = np.zeros(ref.size, ref.storage.type.dtype("="))
    else:
        flat = ref.storage.data()
        strides = tuple(s * flat.itemsize for s in ref.stride)
        view = np.lib.stride_tricks.as_strided(flat[ref.offset :], ref.size, strides)
        array = np.array(view)  # a contiguous, writable copy
    array = array.astype(array.dtype.newbyteorder("="), copy=False)
    if ref.storage.type.name == "BFloat16Storage":
        array = bfloat16_to_float32(array)
    return array


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32, so widening is a 16-bit shift (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
