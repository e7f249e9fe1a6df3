"""Hand-written .pth files: legacy pickles as torch 0.x wrote them, and raw zip/legacy wrappers."""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from resnet_jax.torch_format import LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION


class OldStorage:
    """A storage as torch 0.x pickled it: by persistent id, possibly as a view of another."""

    def __init__(self, key, numel, view=None):
        self.key, self.numel, self.view = key, numel, view


class OldTensor:
    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return torch._utils._rebuild_tensor, self.args  # the pre-0.4 rebuild function


def write_old_legacy(path: Path, obj, storages: dict[str, np.ndarray]) -> None:
    """Write a pre-1.6 file by hand, the way torch 0.3 did (no _rebuild_tensor_v2)."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, OldStorage):
                return ("storage", torch.FloatStorage, o.key, "cpu", o.numel, o.view)
            return None

    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(obj)
        pickle.dump(sorted(storages), f, protocol=2)
        f.writelines(struct.pack("<q", v.size) + v.tobytes() for _, v in sorted(storages.items()))


def write_zip(path: Path, pickled: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")


def write_legacy(path: Path, pickled: bytes, *, in_header: bool = False) -> None:
    with open(path, "wb") as f:
        if in_header:  # the payload replaces the magic number
            f.write(pickled)
            return
        for header in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(pickled)
        pickle.dump([], f, protocol=2)
