"""Save and load Flax variables: .msgpack, .safetensors, .pth, or `hf:ORG/NAME` on the Hugging
Face hub (hub.py).

`.msgpack` keeps the Flax tree as is; `.safetensors` is written with torchvision's names and
layouts, so `torchvision.models.resnet50().load_state_dict(safetensors.torch.load_file(p))` works.
Both can carry a `metadata.ModelMetadata` (classes, eval transform, head layout).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization
from flax.core import unfreeze

from resnet_jax.models.scan import unstack_blocks
from resnet_jax.runtime.errors import UserError
from resnet_jax.runtime.files import atomic_write
from resnet_jax.weights.hub import hub_metadata, hub_weights_path, is_hub_ref
from resnet_jax.weights.metadata import METADATA_KEY, ModelMetadata, read_file_metadata
from resnet_jax.weights.torch_format import load_torch_state_dict
from resnet_jax.weights.torch_names import arch_from_torch_shapes, flax_to_torch, torch_to_flax

__all__ = ["WEIGHT_SUFFIXES", "load_variables", "read_metadata", "save_variables"]

TORCH_SUFFIXES = (".pth", ".pt", ".th", ".safetensors")  # .th: the CIFAR ResNets' checkpoints
WEIGHT_SUFFIXES = (*TORCH_SUFFIXES, ".msgpack")  # what load_variables reads


def save_variables(
    path: str | os.PathLike, variables: Any, metadata: ModelMetadata | None = None
) -> None:
    """Write variables atomically: `.msgpack` (the Flax tree) or `.safetensors` (torchvision
    names), with `metadata` if given (see `metadata.py` for where each format keeps it).
    Either way one entry per block (a scanned model's stacked blocks are unstacked)."""
    path = Path(path)
    suffix = path.suffix.lower()
    table = {} if metadata is None else metadata.to_strings()
    if suffix == ".msgpack":
        tree = unstack_blocks(jax.device_get(unfreeze(variables)))  # a copy: in_place is safe
        if table:
            tree = {METADATA_KEY: table, **tree}
        # in_place keeps the metadata first (a copy would sort the keys), so it reads quickly.
        data = serialization.msgpack_serialize(tree, in_place=True)
    elif suffix == ".safetensors":
        from safetensors.numpy import save

        # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make them shape [1]).
        tensors = {k: np.require(v, requirements="C") for k, v in flax_to_torch(variables).items()}
        data = save(tensors, metadata={"format": "pt", **table})
    else:
        raise UserError(f"Cannot save weights as {path}: use a .msgpack or .safetensors file name.")
    with atomic_write(path, "wb") as f:
        f.write(data)


def load_variables(path: str | os.PathLike) -> dict:
    """Read {'params', 'batch_stats'} from .msgpack, from a torchvision .safetensors/.pth/.pt
    (or a CIFAR ResNet's .th), or from `hf:ORG/NAME[@REVISION]` (its model.safetensors,
    downloaded once). One entry per block: `models.scan.stack_blocks` fits a scanned model.

    A .msgpack holding a whole Flax TrainState gives its params and batch_stats.
    """
    path = hub_weights_path(path) if is_hub_ref(path) else Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a weights file; give the file's path.")
    if not path.is_file():
        raise UserError(f"Weights file {path} does not exist; check the path.")
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        # Names and shapes are checked against the architectures before any tensor is read.
        return torch_to_flax(load_torch_state_dict(path, check=arch_from_torch_shapes))
    if suffix != ".msgpack":
        raise UserError(
            f"Cannot read weights from {path}: use a .msgpack, .safetensors, .pth, .pt or .th file."
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"Cannot read {path} ({e.strerror or e}); check its permissions.") from e
    try:
        tree = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises assorted errors on damaged input
        raise UserError(
            f"{path} is damaged or not a Flax .msgpack file ({e}); save it again."
        ) from e
    if not isinstance(tree, dict) or not isinstance(tree.get("params"), dict):
        raise UserError(f"{path} holds no Flax variables (no 'params' entry); check the file.")
    # A TrainState also holds step and opt_state; only the model's variables are wanted.
    variables = {k: tree[k] for k in ("params", "batch_stats") if k in tree}
    _check_tree(variables, path)
    return variables


def read_metadata(spec: str | os.PathLike) -> ModelMetadata | None:
    """The metadata of a weights file (None where it has none: .pth, files from elsewhere), read
    without its tensors; for `hf:ORG/NAME`, the architecture from the tensors and the transform
    from the repository's config.json."""
    return hub_metadata(spec) if is_hub_ref(spec) else read_file_metadata(spec)


def _check_tree(tree: dict, path: Path, where: str = "") -> None:
    """Refuse anything but nested dicts with string keys and array leaves, in one line."""
    for key, value in tree.items():
        if not isinstance(key, str):
            raise UserError(
                f"{path} has a non-string key {key!r} in '{where or '/'}'; check the file."
            )
        name = f"{where}/{key}" if where else key
        if isinstance(value, dict):
            _check_tree(value, path, name)
        elif not where or not isinstance(value, np.ndarray):
            raise UserError(
                f"{path} holds a value of type {type(value).__name__} at '{name}' where Flax "
                f"variables have {'an array' if where else 'a dict'}; check the file."
            )
