"""Converting weights files between formats: one file, or every weights file of a folder,
checked against the architecture on the way and keeping their metadata."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from resnet_jax.runtime.errors import UserError
from resnet_jax.runtime.files import make_folder
from resnet_jax.weights.io import WEIGHT_SUFFIXES, load_variables, read_metadata, save_variables
from resnet_jax.weights.metadata import check_metadata
from resnet_jax.weights.torch_names import head_of, num_classes_of, resolve_arch

__all__ = ["convert_file", "convert_folder"]


def convert_file(
    src: str | os.PathLike, dst: str | os.PathLike, arch: str | None = None
) -> tuple[str, int]:
    """Convert a weights file (.pth/.safetensors/.msgpack -> .msgpack/.safetensors), checking it;
    its metadata, if any, goes along.

    Returns the architecture and the number of parameters; `arch` makes a mismatch an error.
    """
    if Path(src).resolve() == Path(dst).resolve():
        raise UserError(f"Source and destination are the same file ({src}); choose another name.")
    variables = load_variables(src)
    arch = resolve_arch(variables, arch)
    metadata = read_metadata(src)
    if metadata is not None:
        check_metadata(metadata, arch, num_classes_of(variables), head_of(variables), src)
    save_variables(dst, variables, metadata)
    return arch, sum(int(np.size(x)) for x in jax.tree.leaves(variables["params"]))


def convert_folder(
    src: str | os.PathLike, dst: str | os.PathLike, suffix: str, arch: str | None = None
) -> Iterator[tuple[Path, Path, tuple[str, int] | UserError]]:
    """Convert every weights file in folder `src` to `dst/<name><suffix>`, with a progress bar.

    Yields (source, destination, `convert_file`'s result or the UserError that stopped that
    file): one bad file does not stop the others.
    """
    src, dst = Path(src), Path(dst)
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)
    if not files:
        raise UserError(
            f"{src} holds no weights file ({', '.join(WEIGHT_SUFFIXES)}); give a folder of them "
            "or one file."
        )
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst} is a file; give a folder to convert the folder {src} into.")
    make_folder(dst)
    written: dict[Path, Path] = {}  # destination -> the source converted into it
    for path in tqdm(files, desc="convert", unit="file", disable=None):
        target = dst / (path.stem + suffix)
        try:
            if target in written:  # r18.pth and r18.safetensors both give r18.msgpack
                raise UserError(
                    f"{path} would overwrite {target}, converted from {written[target]}; "
                    "convert it alone with another name."
                )
            yield path, target, convert_file(path, target, arch)
            written[target] = path
        except UserError as e:
            yield path, target, e
