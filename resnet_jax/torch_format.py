"""Read PyTorch checkpoints (.pth zip or legacy, .safetensors) into numpy arrays, without torch.

A .pth file is a pickle whose tensors point at raw byte "storages" stored beside it. Unpickling
runs code named inside the file, so a restricted unpickler builds only the few objects a state
dict needs (tensors, storages, OrderedDict) and refuses every other global without calling it.
Tensors come back as lazy references and are turned into arrays after the storages are located.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resnet_jax.errors import UserError

# Called with {name: shape} of every tensor before any tensor's bytes are read.
ShapeCheck = Callable[[dict[str, tuple[int, ...]]], Any]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # first pickle of a pre-1.6 torch.save file
LEGACY_PROTOCOL_VERSION = 1001

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
_SAFETENSORS_DTYPES = {
    "F32": "f4", "F16": "f2", "BF16": "u2", "F64": "f8", "I64": "i8", "I32": "i4",
    "I16": "i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}  # fmt: skip
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
MAX_WRAPPER_DEPTH = 8  # {'state_dict': {'model': ...}} is 2; a file nesting deeper is malformed
# The largest tensor a supported architecture needs is wide_resnet's 1024x1024x3x3 conv (9.4M
# elements); 2**26 also leaves room for a classification head of 32,768 classes. Anything larger
# is refused before its bytes are read, so a small file cannot make us allocate gigabytes.
MAX_TENSOR_ELEMENTS = 2**26
MAX_TOTAL_ELEMENTS = 2**28  # all tensors together; wide_resnet101_2 has 127M parameters
MAX_PICKLE_BYTES = 64 << 20  # data.pkl holds names and shapes only: kilobytes for a ResNet


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
class _Storage(_NoState):
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

    storage: _Storage
    start: int = 0


@dataclass(frozen=True)
class _TensorRef(_NoState):
    """What `torch._utils._rebuild_tensor*` would have built: a strided view into a storage."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _ints(values: Any) -> tuple[int, ...]:
    if not isinstance(values, tuple | list) or not all(
        isinstance(v, int) and v >= 0 for v in values
    ):
        raise ValueError(f"bad tensor size or stride {values!r}")
    return tuple(values)


def _rebuild_tensor(view: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> _TensorRef:
    """Replaces `_rebuild_tensor` and `_rebuild_tensor_v2` (requires_grad, hooks are ignored)."""
    if not isinstance(view, _StorageView) or not isinstance(storage_offset, int):
        raise TypeError("a tensor does not point at a storage")
    return _TensorRef(view.storage, view.start + storage_offset, _ints(size), _ints(stride))


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


class _StateDictUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `_ALLOWED_GLOBALS` and records the storages it meets."""

    def __init__(self, file: Any, path: Path, storages: dict[str, _Storage]):
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
        storage = self.storages.setdefault(key, _Storage(storage_type, _ints([numel])[0]))
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return _StorageView(storage)
        return _StorageView(storage, _ints([view[1]])[0])


def _check_tensor(ref: _TensorRef, name: str, path: Path) -> None:
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


def _to_array(ref: _TensorRef) -> np.ndarray:
    """Copy a tensor's strided view out of its storage (after `_check_tensor` bounded it)."""
    if 0 in ref.size:
        array = np.zeros(ref.size, ref.storage.type.dtype("="))
    else:
        flat = ref.storage.data()
        strides = tuple(s * flat.itemsize for s in ref.stride)
        view = np.lib.stride_tricks.as_strided(flat[ref.offset :], ref.size, strides)
        array = np.array(view)  # a contiguous, writable copy
    array = array.astype(array.dtype.newbyteorder("="), copy=False)
    if ref.storage.type.name == "BFloat16Storage":
        array = _bfloat16_to_float32(array)
    return array


def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32, so widening is a 16-bit shift (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _unwrap(obj: Any, path: Path) -> Any:
    """Follow {'state_dict': ...}-style wrappers a bounded number of levels, refusing cycles."""
    seen: set[int] = set()
    for _ in range(MAX_WRAPPER_DEPTH + 1):
        if not isinstance(obj, dict):
            return obj
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            return obj
        seen.add(id(obj))
        obj = obj[key]
        if id(obj) in seen:
            raise UserError(
                f"{path} holds wrapper dicts that contain themselves (a cycle through '{key}'), "
                "so it holds no state dict; save model.state_dict() instead."
            )
    raise UserError(
        f"{path} nests 'state_dict'/'model' wrappers more than {MAX_WRAPPER_DEPTH} levels deep; "
        "save model.state_dict() instead."
    )


def _shape(value: _TensorRef | np.ndarray) -> tuple[int, ...]:
    return value.size if isinstance(value, _TensorRef) else value.shape


def _extract_state_dict(
    obj: Any, path: Path, check: ShapeCheck | None = None
) -> dict[str, np.ndarray]:
    """Unwrap {'state_dict': ...}-style checkpoints, strip `module.`, check, build the arrays."""
    obj = _unwrap(obj, path)
    tensors = {}
    if isinstance(obj, dict):
        tensors = {
            k: v
            for k, v in obj.items()
            if isinstance(k, str) and isinstance(v, _TensorRef | np.ndarray)
        }
    if not tensors:
        raise UserError(
            f"{path} holds no state dict (names mapped to tensors, at the top or under "
            "'state_dict', 'model_state_dict' or 'model'); save model.state_dict() instead."
        )
    if all(k.startswith("module.") for k in tensors):  # saved from nn.DataParallel
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    for name, value in tensors.items():
        if isinstance(value, _TensorRef):
            _check_tensor(value, name, path)
    total = sum(math.prod(_shape(v)) for v in tensors.values())
    if total > MAX_TOTAL_ELEMENTS:
        raise UserError(
            f"{path} declares {total:,} tensor elements, more than any supported ResNet needs, "
            "so it was not loaded; check the file."
        )
    if check is not None:  # names and shapes only: no tensor has been read yet
        check({k: _shape(v) for k, v in tensors.items()})
    return {k: _to_array(v) if isinstance(v, _TensorRef) else v for k, v in tensors.items()}


def _load_zip(path: Path, check: ShapeCheck | None) -> dict[str, np.ndarray]:
    """torch >= 1.6: `<folder>/data.pkl` plus one `<folder>/data/<key>` record per storage."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UserError(
            f"{path} is a truncated or damaged zip file; download or save it again."
        ) from None
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pickles:
            raise UserError(f"{path} is a zip file but not a PyTorch checkpoint (no data.pkl).")
        prefix = pickles[0].removesuffix("data.pkl")
        if any(n.startswith(prefix + "code/") for n in names):
            raise UserError(
                f"{path} is a TorchScript archive (torch.jit.save); save model.state_dict() with "
                "torch.save and load that file instead."
            )
        byteorder = "<"
        if prefix + "byteorder" in names:
            order = _read_member(archive, prefix + "byteorder", 16).strip()
            byteorder = {b"little": "<", b"big": ">"}[order]

        def reader(key: str, storage: _Storage) -> Callable[[], np.ndarray]:
            dtype = storage.type.dtype(byteorder)
            nbytes = storage.numel * dtype.itemsize
            return lambda: np.frombuffer(_read_member(archive, f"{prefix}data/{key}", nbytes), dtype)

        storages: dict[str, _Storage] = {}
        pickled = io.BytesIO(_read_member(archive, pickles[0], MAX_PICKLE_BYTES))
        obj = _StateDictUnpickler(pickled, path, storages).load()
        for key, storage in storages.items():
            storage.read = reader(key, storage)
        return _extract_state_dict(obj, path, check)


def _read_member(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """At most `limit` bytes of a zip member, decompressed as they stream: a small compressed
    member that inflates to gigabytes ("zip bomb") never is decompressed whole."""
    with archive.open(name) as member:
        data = member.read(limit)
        if len(data) == limit and member.read(1):
            raise ValueError(f"'{name}' is larger than the {limit:,} bytes it should hold")
    return data


def _load_legacy(path: Path, check: ShapeCheck | None) -> dict[str, np.ndarray]:
    """torch < 1.6: magic, version and sys_info pickles, the object pickle, the storage keys,
    then each storage as a little-endian int64 element count followed by its raw bytes."""
    with open(path, "rb") as f:
        storages: dict[str, _Storage] = {}

        def unpickle() -> Any:
            return _StateDictUnpickler(f, path, storages).load()

        if unpickle() != LEGACY_MAGIC_NUMBER:
            raise UserError(f"{path} is a pickle but not a PyTorch checkpoint; check the file.")
        version = unpickle()
        if version != LEGACY_PROTOCOL_VERSION:
            raise UserError(f"{path} uses unknown torch.save protocol {version}; re-save it.")
        unpickle()  # sys_info: endianness and C type sizes of the saving machine
        obj = unpickle()
        keys = unpickle()
        if not isinstance(keys, list) or set(keys) != set(storages):
            raise ValueError("the storage key list does not match the tensors")
        for key in keys:  # only note where each storage starts; read it when a tensor needs it
            (numel,) = struct.unpack("<q", f.read(8))
            storage = storages[key]
            dtype = storage.type.dtype("<")
            start = f.tell()
            f.seek(numel * dtype.itemsize, io.SEEK_CUR)

            def read(start: int = start, numel: int = numel, dtype: np.dtype = dtype) -> np.ndarray:
                f.seek(start)
                return np.frombuffer(f.read(numel * dtype.itemsize), dtype)

            storage.read = read
        if f.tell() > os.fstat(f.fileno()).st_size:
            raise ValueError("the file ends before its last storage")
        return _extract_state_dict(obj, path, check)


def _load_safetensors(path: Path, check: ShapeCheck | None) -> dict[str, np.ndarray]:
    """safetensors: a JSON header then raw little-endian tensors; no code is ever run."""
    from safetensors import deserialize  # safetensors.numpy cannot represent bfloat16

    arrays = {}
    for name, info in deserialize(path.read_bytes()):
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise UserError(
                f"{path} holds '{name}' as {info['dtype']}, which this reader does not support; "
                "convert it to float32 and save again."
            )
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
        array = (
            np.frombuffer(info["data"], dtype)
            .reshape(info["shape"])
            .astype(dtype.newbyteorder("="))
        )
        arrays[name] = _bfloat16_to_float32(array) if info["dtype"] == "BF16" else array
    return _extract_state_dict(arrays, path, check)


def _is_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{"


def load_torch_state_dict(
    path: str | Path, check: ShapeCheck | None = None
) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict (.pth/.pt zip or legacy, or .safetensors) as numpy arrays.

    bfloat16 tensors become float32; wrappers such as {'state_dict': ...} and DataParallel's
    `module.` prefix are removed. `check({name: shape})` runs before any tensor is read, so it can
    refuse a file before its tensors use memory. Never imports torch or runs code from the file.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a checkpoint file; give the file's path.")
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist; check the path.")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise UserError(f"Cannot read {path} ({e.strerror or e}); check its permissions.") from e
    try:
        if path.suffix.lower() == ".safetensors" or _is_safetensors(head):
            return _load_safetensors(path, check)
        if head.startswith(b"PK"):
            return _load_zip(path, check)
        if head.startswith(b"\x80"):
            return _load_legacy(path, check)
    except UserError:
        raise
    except Exception as e:  # any parse failure of an untrusted file means it is damaged
        raise UserError(
            f"{path} is damaged or truncated ({type(e).__name__}: {e}); download or save it again."
        ) from e
    raise UserError(
        f"{path} is not a PyTorch checkpoint (.pth/.pt saved by torch.save, or .safetensors)."
    )
