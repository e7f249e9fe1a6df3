"""Read PyTorch checkpoints (.pth zip or legacy, .safetensors) into numpy arrays, without torch.

A .pth file is a pickle (read by `torch_pickle`) whose tensors point at raw byte "storages"
stored beside it. Tensors stay lazy until their names and shapes have been checked; storages are
read only up to the size their records declare, so memory is bounded by what the file holds.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from resnet_jax.errors import UserError
from resnet_jax.torch_pickle import (
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


def _shape(value: TensorRef | np.ndarray) -> tuple[int, ...]:
    return value.size if isinstance(value, TensorRef) else value.shape


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
            if isinstance(k, str) and isinstance(v, TensorRef | np.ndarray)
        }
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
    return {k: to_array(v) if isinstance(v, TensorRef) else v for k, v in tensors.items()}


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
        arrays[name] = bfloat16_to_float32(array) if info["dtype"] == "BF16" else array
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
