"""Read PyTorch checkpoints (.pth zip or legacy, .safetensors) into numpy arrays, without torch.

A .pth file is a pickle (read by `torch_pickle`) whose tensors point at raw byte "storages"
stored beside it. Tensors stay lazy until their names and shapes have been checked; storages are
read only up to the size their records declare, so memory is bounded by what the file holds.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from resnet_jax.runtime.errors import UserError
from resnet_jax.weights.torch_pickle import (
    StateDictUnpickler,
    Storage,
    TensorRef,
    bfloat16_to_float32,
    check_tensor,
    to_array,
)

# Called with {name: shape} of every tensor before any tensor's bytes are read.
ShapeCheck = Callable[[dict[str, tuple[int, ...]]], Any]

__all__ = ["load_torch_state_dict"]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # first pickle of a pre-1.6 torch.save file
LEGACY_PROTOCOL_VERSION = 1001

_SAFETENSORS_DTYPES = {
    "F32": "f4", "F16": "f2", "BF16": "u2", "F64": "f8", "I64": "i8", "I32": "i4",
    "I16": "i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}  # fmt: skip
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
MAX_WRAPPER_DEPTH = 8  # {'state_dict': {'model': ...}} is 2; a file nesting deeper is malformed
MAX_TOTAL_ELEMENTS = 2**28  # all tensors together; wide_resnet101_2 has 127M parameters
MAX_PICKLE_BYTES = 64 << 20  # data.pkl holds names and shapes only: kilobytes for a ResNet
MAX_SAFETENSORS_HEADER_BYTES = 16 << 20  # likewise the JSON header: about 40 KB for resnet152


class _SafetensorsTensor:
    """A tensor of a .safetensors file, known by its header entry and read only on demand."""

    def __init__(self, f: BinaryIO, name: str, entry: Any, data_start: int, data_size: int):
        if not isinstance(entry, dict) or entry.get("dtype") is None:
            raise ValueError(f"the header entry of '{name}' is not a tensor")
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise UserError(
                f"{f.name} holds '{name}' as {entry['dtype']}, which this reader does not "
                "support; convert it to float32 and save again."
            )
        self.dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]).newbyteorder("<")
        self.bfloat16 = entry["dtype"] == "BF16"
        self.shape = _header_ints(entry.get("shape"))
        begin, end = _header_ints(entry.get("data_offsets"))
        if end - begin != math.prod(self.shape) * self.dtype.itemsize or end > data_size:
            raise ValueError(f"the bytes of '{name}' do not fit its shape or the file")
        self._f, self._start, self._nbytes = f, data_start + begin, end - begin

    def read(self) -> np.ndarray:
        self._f.seek(self._start)
        data = self._f.read(self._nbytes)
        if len(data) != self._nbytes:
            raise ValueError("the file ends inside a tensor")
        array = np.frombuffer(data, self.dtype).reshape(self.shape)
        array = array.astype(self.dtype.newbyteorder("="))
        return bfloat16_to_float32(array) if self.bfloat16 else array


def _header_ints(values: Any) -> tuple[int, ...]:
    if not isinstance(values, list) or not all(type(v) is int and v >= 0 for v in values):
        raise ValueError(f"bad shape or offsets {values!r} in the header")
    return tuple(values)


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


# A tensor not yet read: its size is known, its bytes are read by `_materialise`.
_Lazy = TensorRef | _SafetensorsTensor | np.ndarray


def _shape(value: _Lazy) -> tuple[int, ...]:
    return value.size if isinstance(value, TensorRef) else value.shape


def _materialise(value: _Lazy) -> np.ndarray:
    if isinstance(value, TensorRef):
        return to_array(value)
    return value.read() if isinstance(value, _SafetensorsTensor) else value


def _extract_state_dict(
    obj: Any, path: Path, check: ShapeCheck | None = None
) -> dict[str, np.ndarray]:
    """Unwrap {'state_dict': ...}-style checkpoints, strip `module.`, check, build the arrays."""
    obj = _unwrap(obj, path)
    tensors = {}
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, _Lazy)}
    if not tensors:
        raise UserError(
            f"{path} holds no state dict (names mapped to tensors, at the top or under "
            "'state_dict', 'model_state_dict' or 'model'); save model.state_dict() instead."
        )
    if all(k.startswith("module.") for k in tensors):  # saved from nn.DataParallel
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    for name, value in tensors.items():
        if isinstance(value, TensorRef):
            check_tensor(value, name, path)
    total = sum(math.prod(_shape(v)) for v in tensors.values())
    if total > MAX_TOTAL_ELEMENTS:
        raise UserError(
            f"{path} declares {total:,} tensor elements, more than any supported ResNet needs, "
            "so it was not loaded; check the file."
        )
    if check is not None:  # names and shapes only: no tensor has been read yet
        check({k: _shape(v) for k, v in tensors.items()})
    return {k: _materialise(v) for k, v in tensors.items()}


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

        def reader(key: str, storage: Storage) -> Callable[[], np.ndarray]:
            dtype = storage.type.dtype(byteorder)
            nbytes = storage.numel * dtype.itemsize
            member = f"{prefix}data/{key}"
            return lambda: np.frombuffer(_read_member(archive, member, nbytes), dtype)

        storages: dict[str, Storage] = {}
        pickled = io.BytesIO(_read_member(archive, pickles[0], MAX_PICKLE_BYTES))
        obj = StateDictUnpickler(pickled, path, storages).load()
        for key, storage in storages.items():
            storage.read = reader(key, storage)
        return _extract_state_dict(obj, path, check)


def _read_member(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """At most `limit` bytes of a zip member, decompressed as they stream: a small compressed
    member that inflates to gigabytes ("zip bomb") is never decompressed whole."""
    with archive.open(name) as member:
        data = member.read(limit)
        if len(data) == limit and member.read(1):
            raise ValueError(f"'{name}' is larger than the {limit:,} bytes it should hold")
    return data


def _load_legacy(path: Path, check: ShapeCheck | None) -> dict[str, np.ndarray]:
    """torch < 1.6: magic, version and sys_info pickles, the object pickle, the storage keys,
    then each storage as a little-endian int64 element count followed by its raw bytes."""
    with open(path, "rb") as f:
        storages: dict[str, Storage] = {}

        def unpickle() -> Any:
            return StateDictUnpickler(f, path, storages).load()

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
    """safetensors: an 8-byte little-endian length, a JSON header of names, dtypes, shapes and
    byte offsets, then raw tensors. The header is checked before any tensor is read."""
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        if header_size > MAX_SAFETENSORS_HEADER_BYTES:
            raise UserError(
                f"{path} declares a header of {header_size:,} bytes, more than the "
                f"{MAX_SAFETENSORS_HEADER_BYTES:,} any ResNet's names and shapes need, so it "
                "was not loaded; check the file."
            )
        header = json.loads(f.read(header_size))
        if not isinstance(header, dict):
            raise TypeError("the header is not a JSON object")
        header.pop("__metadata__", None)
        data_start = 8 + header_size
        data_size = os.fstat(f.fileno()).st_size - data_start
        tensors = {
            name: _SafetensorsTensor(f, name, entry, data_start, data_size)
            for name, entry in header.items()
        }
        return _extract_state_dict(tensors, path, check)


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
