"""Scanned stages: which blocks run as one `lax.scan`, and their variables in both layouts.

A stage's blocks after its first are identical; in a deep stage `ResNet(scan=True)` runs them
as one block under `lax.scan`, so the compiled graph stays the same size however deep the stage
is. Their variables are then stacked along a new first axis under `layerK_scan`, where
torchvision's layout has `layerK_1`, `layerK_2`, .... Files, conversion and checks use
torchvision's layout: `unstack_blocks` gives it, `stack_blocks` turns it into a model's.

The model keeps them stacked rather than mapping torchvision's layout in and out of each step
(`nn.map_variables`): that costs a slice per block and variable, which compiled slower than no scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np

__all__ = [
    "SCAN_MIN_REPEATS", "Scannable", "scan_name", "scanned_stages", "stack_blocks",
    "unstack_blocks",
]  # fmt: skip

# A stage is scanned from this many repeated blocks (blocks after its first): XLA:CPU compiles a
# loop, with its stacked residuals and their slicing, at a fixed cost that only deeper stages
# pay back (benchmarks/depth.py measures it).
SCAN_MIN_REPEATS = 8


class Scannable(Protocol):
    """What decides a model's layout: `resnet.ResNet`'s `layers` and `scan`."""

    layers: Sequence[int]
    scan: bool


def scan_name(stage: int) -> str:
    """The variables' entry of stage `stage`'s scanned blocks: `layer3_scan`."""
    return f"layer{stage}_scan"


def scanned_stages(layers: Sequence[int], scan: bool = True) -> dict[int, int]:
    """Stage (1 = layer1) -> how many of its blocks run scanned: all but the first, in the
    stages with at least `SCAN_MIN_REPEATS` of them; none unless `scan`."""
    if not scan:
        return {}
    return {s: depth - 1 for s, depth in enumerate(layers, start=1) if depth > SCAN_MIN_REPEATS}


def _stack(leaves: list[Any]) -> Any:
    if isinstance(leaves[0], jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves), *leaves[0].shape), leaves[0].dtype)
    return np.stack([np.asarray(leaf) for leaf in leaves])


def _unstack(leaf: Any) -> list[Any]:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return [jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)] * leaf.shape[0]
    return list(np.asarray(leaf))


def unstack_blocks(variables: dict) -> dict:
    """Any layout -> torchvision's: each `layerK_scan` entry becomes `layerK_1`, `layerK_2`, ...
    (host arrays; shapes stay shapes). Other entries are kept as they are."""
    out = {}
    for collection, tree in variables.items():
        if not isinstance(tree, dict):
            out[collection] = tree
            continue
        out[collection] = {}
        for name, subtree in tree.items():
            if not name.endswith("_scan"):
                out[collection][name] = subtree
                continue
            leaves, treedef = jax.tree.flatten(subtree)
            for i, block in enumerate(zip(*map(_unstack, leaves)), start=1):
                out[collection][f"{name.removesuffix('_scan')}_{i}"] = treedef.unflatten(block)
    return out


def stack_blocks(variables: dict, model: Scannable) -> dict:
    """torchvision's layout (or any) -> `model`'s: the blocks it scans stacked under
    `layerK_scan` (host arrays; shapes stay shapes). A stage with a block missing is left
    unstacked, so that checks name the block."""
    variables = unstack_blocks(variables)
    out = {}
    for collection, tree in variables.items():
        if not isinstance(tree, dict):
            out[collection] = tree
            continue
        tree = dict(tree)
        for stage, count in scanned_stages(model.layers, model.scan).items():
            names = [f"layer{stage}_{i}" for i in range(1, count + 1)]
            if all(name in tree for name in names):
                blocks = [tree.pop(name) for name in names]
                tree[scan_name(stage)] = jax.tree.map(lambda *xs: _stack(list(xs)), *blocks)
        out[collection] = tree
    return out
