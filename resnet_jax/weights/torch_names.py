"""torchvision state dicts <-> Flax variables: a name rule, a layout rule, and validation.

Names: `layer1.0.conv1.weight` <-> `params/layer1_0/conv1/kernel`; a shortcut's
`downsample.0` / `downsample.1` <-> `downsample/conv` / `downsample/bn`; the Dense layer that
`head="append"` adds after `fc` is `head.weight` / `head.bias` <-> `params/head/kernel` / `bias`.
Layouts: conv OIHW <-> HWIO (grouped convs too), fc (out, in) <-> (in, out), BatchNorm
weight/bias/running_mean/running_var <-> scale/bias/mean/var. `num_batches_tracked` is only
used by torch when momentum=None, so it is dropped on the way in and written as 0 on the way out.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from resnet_jax.models.factory import create_model
from resnet_jax.models.registry import ARCHITECTURES, find_architecture
from resnet_jax.models.variables import VariablePath, check_fits, expected_variables
from resnet_jax.runtime.errors import UserError

__all__ = [
    "Variables",
    "arch_from_torch_shapes",
    "check_variables",
    "detect_arch",
    "flax_to_torch",
    "head_of",
    "num_classes_of",
    "resolve_arch",
    "torch_to_flax",
]

Variables = dict[str, Any]
FLOAT_DTYPES = tuple(np.dtype(t) for t in (np.float16, jnp.bfloat16, np.float32, np.float64))

# (torch leaf name, rank) -> (Flax collection, Flax leaf name)
_LEAVES = {
    ("weight", 4): ("params", "kernel"),  # conv
    ("weight", 2): ("params", "kernel"),  # fc
    ("weight", 1): ("params", "scale"),  # BatchNorm
    ("bias", 1): ("params", "bias"),
    ("running_mean", 1): ("batch_stats", "mean"),
    ("running_var", 1): ("batch_stats", "var"),
}
_TORCH_LEAF = {(col, leaf, rank): name for (name, rank), (col, leaf) in _LEAVES.items()}
_DOWNSAMPLE = {"0": "conv", "1": "bn"}
_DOWNSAMPLE_BACK = {v: k for k, v in _DOWNSAMPLE.items()}

# Layout rule by rank: conv OIHW -> HWIO, fc (out, in) -> (in, out), vectors unchanged.
_TO_FLAX = {4: (2, 3, 1, 0), 2: (1, 0), 1: (0,)}
_TO_TORCH = {4: (3, 2, 0, 1), 2: (1, 0), 1: (0,)}


def _flax_path(key: str, rank: int) -> tuple[str, ...]:
    """`layer1.0.downsample.1.running_var` -> ('batch_stats', 'layer1_0', 'downsample', 'bn', 'var')."""
    *modules, leaf = key.split(".")
    if (leaf, rank) not in _LEAVES or not re.fullmatch(r"conv1|bn1|fc|head|layer\d+", modules[0]):
        raise UserError(f"Checkpoint key '{key}' is not part of a torchvision ResNet.")
    path: list[str] = []
    for part in modules:
        if part.isdigit() and path and path[-1].startswith("layer"):
            path[-1] = f"{path[-1]}_{part}"
        elif part.isdigit() and path and path[-1] == "downsample":
            path.append(_DOWNSAMPLE.get(part, part))
        else:
            path.append(part)
    collection, flax_leaf = _LEAVES[(leaf, rank)]
    return (collection, *path, flax_leaf)


def _torch_key(path: tuple[str, ...], rank: int) -> str:
    """The inverse of `_flax_path`."""
    collection, *modules, leaf = path
    parts: list[str] = []
    for m in modules:
        if m.startswith("layer") and "_" in m:
            parts.extend(m.split("_"))
        elif parts and parts[-1] == "downsample":
            parts.append(_DOWNSAMPLE_BACK[m])
        else:
            parts.append(m)
    return ".".join([*parts, _TORCH_LEAF[(collection, leaf, rank)]])


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def arch_from_torch_shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    """The architecture a state dict's names and shapes fit (UserError if none): runs before
    the tensors are read, so a file cannot make us allocate more than a ResNet needs."""
    variables: Variables = {"params": {}, "batch_stats": {}}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            running_var = key.replace("num_batches_tracked", "running_var")
            if math.prod(shape) != 1 or running_var not in shapes:
                raise UserError(f"Checkpoint key '{key}' is not part of a torchvision ResNet.")
            continue
        path = _flax_path(key, len(shape))
        flax_shape = tuple(shape[i] for i in _TO_FLAX[len(shape)])
        _set(variables, path, jax.ShapeDtypeStruct(flax_shape, np.float32))
    arch = detect_arch({k: jax.ShapeDtypeStruct(s, np.float32) for k, s in shapes.items()})
    check_variables(variables, arch)
    return arch


def torch_to_flax(state_dict: dict[str, np.ndarray]) -> Variables:
    """A torchvision ResNet state dict (numpy arrays) -> {'params': ..., 'batch_stats': ...}."""
    variables: Variables = {"params": {}, "batch_stats": {}}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        value = np.asarray(value)
        path = _flax_path(key, value.ndim)
        # A copy: arrays that alias the caller's (e.g. torch tensors) must not change under us.
        _set(variables, path, np.array(value.transpose(_TO_FLAX[value.ndim]), order="C"))
    return variables


def flax_to_torch(variables: Variables) -> dict[str, np.ndarray]:
    """Flax variables -> a state dict with torchvision's names and layouts (numpy arrays)."""
    state_dict: dict[str, np.ndarray] = {}
    for path, value in flatten_dict(
        {k: variables.get(k, {}) for k in ("params", "batch_stats")}
    ).items():
        value = np.asarray(value)
        key = _torch_key(path, value.ndim)
        state_dict[key] = np.ascontiguousarray(value.transpose(_TO_TORCH[value.ndim]))
        if key.endswith(".running_var"):
            state_dict[key.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
    return state_dict


def detect_arch(state_dict: dict[str, Any]) -> str:
    """The name of the factory (e.g. 'resnext50_32x4d') whose model a checkpoint belongs to."""
    keys = [k for k in state_dict if k.startswith("layer")]
    depths = tuple(
        len({k.split(".")[1] for k in keys if k.split(".")[0] == f"layer{s}"}) for s in (1, 2, 3, 4)
    )
    if "layer1.0.conv2.weight" not in state_dict:
        raise UserError(
            "The checkpoint has no 'layer1.0.conv2.weight': it is not a torchvision ResNet."
        )
    block = "bottleneck" if "layer1.0.conv3.weight" in state_dict else "basic"
    groups, width_per_group = 1, 64
    if block == "bottleneck":
        # layer1's 3x3 conv is (width, width / groups, 3, 3) with width = width_per_group * groups.
        out_ch, in_per_group = np.shape(state_dict["layer1.0.conv2.weight"])[:2]
        groups = out_ch // in_per_group
        width_per_group = in_per_group
    found = find_architecture((block, depths, groups, width_per_group))
    if found is None:
        raise UserError(
            f"The checkpoint is not a known ResNet ({block} blocks, stage depths {depths}, groups "
            f"{groups}, width per group {width_per_group}); known: {', '.join(ARCHITECTURES)}."
        )
    return found.name


def head_of(variables: Variables) -> str:
    """The head layout (`models.HEADS`): "append" for weights with a Dense `head` after `fc`."""
    return "append" if "head" in variables.get("params", {}) else "replace"


def num_classes_of(variables: Variables) -> int | None:
    """The number of outputs (of `head` where appended, else of `fc`), or None without fc."""
    params = variables.get("params", {})
    last = params.get("head", params.get("fc"))
    return None if last is None else int(np.shape(last["bias"])[0])


def _torch_name(path: VariablePath, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """A variable's torch name and shape (Flax's, for what torch has no name for)."""
    try:
        return _torch_key(path, len(shape)), tuple(shape[i] for i in _TO_TORCH[len(shape)])
    except KeyError:
        return "/".join(path), shape


def check_variables(variables: Variables, arch: str, num_classes: int | None = None) -> None:
    """Raise a UserError listing missing, unexpected and wrongly-shaped tensors (torch names),
    or naming tensors that are not floating point.

    `num_classes=None` accepts whatever head the variables carry (or none at all).
    """
    if num_classes is None:
        num_classes = num_classes_of(variables)
    model = create_model(
        arch,
        num_classes=num_classes or 1,
        include_top=num_classes is not None,
        head=head_of(variables),
    )
    want = expected_variables(model)
    check_fits(variables, want, f"These weights do not fit {arch}", name=_torch_name)
    bad_dtype = [
        f"{_torch_name(p, np.shape(v))[0]} is {np.dtype(v.dtype).name}"
        for p, v in flatten_dict(dict(variables)).items()
        if hasattr(v, "dtype") and np.dtype(v.dtype) not in FLOAT_DTYPES
    ]
    if bad_dtype:
        raise UserError(
            f"These weights are not floating point ({', '.join(bad_dtype[:3])}); ResNet weights "
            "are float16, bfloat16, float32 or float64: convert them and save again."
        )


def resolve_arch(variables: Variables, arch: str | None = None) -> str:
    """The architecture Flax variables belong to, checked strictly; `arch` overrides detection."""
    if not isinstance(variables, dict) or not isinstance(variables.get("params"), dict):
        raise UserError("The weights do not hold ResNet variables (params, batch_stats).")
    if arch is None:
        try:
            arch = detect_arch(flax_to_torch(variables))
        except KeyError as e:
            raise UserError(f"The weights hold a tensor no ResNet has ({e}).") from e
    check_variables(variables, arch)
    return arch
