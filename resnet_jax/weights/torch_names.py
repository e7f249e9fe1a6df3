"""torchvision state dicts <-> Flax variables: a name rule, a layout rule, and validation.

Names: `layer1.0.conv1.weight` <-> `params/layer1_0/conv1/kernel`; a shortcut's
`downsample.0` / `downsample.1` <-> `downsample/conv` / `downsample/bn`; the Dense layer that
`head="append"` adds after `fc` is `head.weight` / `head.bias` <-> `params/head/kernel` / `bias`.
The CIFAR ResNets (3x3 stem) call their classifier `linear` (Idelbayev's checkpoints, the most
used ones): `linear.weight` <-> `params/fc/kernel`. Scanned blocks (`models/scan.py`) are
unstacked first, so state dicts always have one entry per block.
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
from resnet_jax.models.registry import ARCHITECTURES, find_architecture, get_architecture
from resnet_jax.models.scan import unstack_blocks
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

# The stem's kernel size -> the stem (`resnet.STEMS`) -> torch's name of the classifier `fc`.
_STEM_OF_KERNEL = {7: "imagenet", 3: "cifar"}
_TORCH_FC = {"imagenet": "fc", "cifar": "linear"}

# Layout rule by rank: conv OIHW -> HWIO, fc (out, in) -> (in, out), vectors unchanged.
_TO_FLAX = {4: (2, 3, 1, 0), 2: (1, 0), 1: (0,)}
_TO_TORCH = {4: (3, 2, 0, 1), 2: (1, 0), 1: (0,)}


def _flax_path(key: str, rank: int, fc: str = "fc") -> tuple[str, ...]:
    """`layer1.0.downsample.1.running_var` -> ('batch_stats', 'layer1_0', 'downsample', 'bn',
    'var'); `fc` is torch's name of the classifier (`_TORCH_FC`)."""
    *modules, leaf = key.split(".")
    top = rf"conv1|bn1|{fc}|head|layer\d+"
    if (leaf, rank) not in _LEAVES or not re.fullmatch(top, modules[0]):
        raise UserError(f"Checkpoint key '{key}' is not part of a torchvision ResNet.")
    path: list[str] = []
    for part in modules:
        if part.isdigit() and path and path[-1].startswith("layer"):
            path[-1] = f"{path[-1]}_{part}"
        elif part.isdigit() and path and path[-1] == "downsample":
            path.append(_DOWNSAMPLE.get(part, part))
        else:
            path.append("fc" if part == fc and not path else part)
    collection, flax_leaf = _LEAVES[(leaf, rank)]
    return (collection, *path, flax_leaf)


def _torch_key(path: tuple[str, ...], rank: int, fc: str = "fc") -> str:
    """The inverse of `_flax_path`."""
    collection, *modules, leaf = path
    parts: list[str] = []
    for m in modules:
        if m.startswith("layer") and "_" in m:
            parts.extend(m.split("_"))
        elif parts and parts[-1] == "downsample":
            parts.append(_DOWNSAMPLE_BACK[m])
        else:
            parts.append(fc if m == "fc" and not parts else m)
    return ".".join([*parts, _TORCH_LEAF[(collection, leaf, rank)]])


def _stem(conv1_shape: tuple[int, ...] | None) -> str:
    """The stem (`resnet.STEMS`) of a model whose torch `conv1.weight` (OIHW) has this shape;
    "unknown" for a kernel size no stem has, "imagenet" without one."""
    if conv1_shape is None or len(conv1_shape) != 4:
        return "imagenet"
    return _STEM_OF_KERNEL.get(int(conv1_shape[-1]), "unknown")


def _torch_fc(conv1_shape: tuple[int, ...] | None) -> str:
    """torch's name of the classifier of a model whose `conv1.weight` has this shape."""
    return _TORCH_FC.get(_stem(conv1_shape), "fc")


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def arch_from_torch_shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    """The architecture a state dict's names and shapes fit (UserError if none): runs before
    the tensors are read, so a file cannot make us allocate more than a ResNet needs."""
    variables: Variables = {"params": {}, "batch_stats": {}}
    fc = _torch_fc(shapes.get("conv1.weight"))
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            running_var = key.replace("num_batches_tracked", "running_var")
            if math.prod(shape) != 1 or running_var not in shapes:
                raise UserError(f"Checkpoint key '{key}' is not part of a torchvision ResNet.")
            continue
        path = _flax_path(key, len(shape), fc)
        flax_shape = tuple(shape[i] for i in _TO_FLAX[len(shape)])
        _set(variables, path, jax.ShapeDtypeStruct(flax_shape, np.float32))
    arch = detect_arch({k: jax.ShapeDtypeStruct(s, np.float32) for k, s in shapes.items()})
    check_variables(variables, arch)
    return arch


def torch_to_flax(state_dict: dict[str, np.ndarray]) -> Variables:
    """A torchvision (or CIFAR ResNet) state dict (numpy arrays) -> {'params', 'batch_stats'}
    in torchvision's layout, one entry per block (`models.scan.stack_blocks` scans them)."""
    variables: Variables = {"params": {}, "batch_stats": {}}
    fc = _torch_fc(np.shape(state_dict["conv1.weight"]) if "conv1.weight" in state_dict else None)
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        value = np.asarray(value)
        path = _flax_path(key, value.ndim, fc)
        # A copy: arrays that alias the caller's (e.g. torch tensors) must not change under us.
        _set(variables, path, np.array(value.transpose(_TO_FLAX[value.ndim]), order="C"))
    return variables


def flax_to_torch(variables: Variables) -> dict[str, np.ndarray]:
    """Flax variables (either layout) -> a state dict with torchvision's names and layouts
    (numpy arrays); the CIFAR ResNets' classifier is `linear`."""
    variables = unstack_blocks({k: variables.get(k, {}) for k in ("params", "batch_stats")})
    stem = variables["params"].get("conv1", {}).get("kernel")
    fc = _torch_fc(None if stem is None else tuple(np.shape(stem)[i] for i in _TO_TORCH[4]))
    state_dict: dict[str, np.ndarray] = {}
    for path, value in flatten_dict(variables).items():
        value = np.asarray(value)
        key = _torch_key(path, value.ndim, fc)
        state_dict[key] = np.ascontiguousarray(value.transpose(_TO_TORCH[value.ndim]))
        if key.endswith(".running_var"):
            state_dict[key.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
    return state_dict


def detect_arch(state_dict: dict[str, Any]) -> str:
    """The name of the factory (e.g. 'resnext50_32x4d') whose model a checkpoint belongs to.
    A plain CIFAR network's tensors are those of its residual twin, which is the one named."""
    if "layer1.0.conv2.weight" not in state_dict:
        raise UserError(
            "The checkpoint has no 'layer1.0.conv2.weight': it is not a torchvision ResNet."
        )
    blocks: dict[int, set[str]] = {}  # stage -> its block indices
    for key in state_dict:
        if match := re.match(r"layer(\d+)\.(\d+)\.", key):
            blocks.setdefault(int(match[1]), set()).add(match[2])
    depths = tuple(len(blocks.get(s, ())) for s in range(1, max(blocks) + 1))
    block = "bottleneck" if "layer1.0.conv3.weight" in state_dict else "basic"
    last, expansion = ("conv3", 4) if block == "bottleneck" else ("conv2", 1)
    planes = tuple(
        int(np.shape(state_dict[key])[0]) // expansion if key in state_dict else 0
        for key in (f"layer{s}.0.{last}.weight" for s in range(1, len(depths) + 1))
    )
    groups, width_per_group = 1, 64
    if block == "bottleneck":
        # layer1's 3x3 conv is (width, width / groups, 3, 3) with width = width_per_group * groups.
        out_ch, in_per_group = np.shape(state_dict["layer1.0.conv2.weight"])[:2]
        groups = out_ch // in_per_group
        width_per_group = in_per_group
    stem = _stem(np.shape(state_dict["conv1.weight"]) if "conv1.weight" in state_dict else ())
    shortcut = "B" if any(".downsample." in k for k in state_dict) else "A"
    structure = (block, depths, groups, width_per_group, planes, stem, shortcut)
    found = find_architecture(structure)
    if found is None:
        raise UserError(
            f"The checkpoint is not a known ResNet ({block} blocks, stage depths {depths}, planes "
            f"{planes}, groups {groups}, width per group {width_per_group}, {stem} stem, "
            f"option {shortcut} shortcuts); known: {', '.join(ARCHITECTURES)}."
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


def _torch_namer(fc: str):
    """A variable's torch name and shape (Flax's, for what torch has no name for), with `fc`
    torch's name of the classifier."""

    def name(path: VariablePath, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
        try:
            return _torch_key(path, len(shape), fc), tuple(shape[i] for i in _TO_TORCH[len(shape)])
        except KeyError:
            return "/".join(path), shape

    return name


def check_variables(variables: Variables, arch: str, num_classes: int | None = None) -> None:
    """Raise a UserError listing missing, unexpected and wrongly-shaped tensors (torch names),
    or naming tensors that are not floating point.

    `num_classes=None` accepts whatever head the variables carry (or none at all). Either
    layout is accepted (`models/scan.py`).
    """
    if num_classes is None:
        num_classes = num_classes_of(variables)
    variables = unstack_blocks(dict(variables))
    model = create_model(
        arch,
        num_classes=num_classes or 1,
        include_top=num_classes is not None,
        head=head_of(variables),
    )
    name = _torch_namer(_TORCH_FC[get_architecture(arch).stem])
    check_fits(variables, expected_variables(model), f"These weights do not fit {arch}", name=name)
    bad_dtype = [
        f"{name(p, np.shape(v))[0]} is {np.dtype(v.dtype).name}"
        for p, v in flatten_dict(variables).items()
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
