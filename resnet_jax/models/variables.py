"""Whether variables fit a model: the one report of missing, unexpected and wrongly-shaped
variables, for weights files (shown with torch's names) and the NNX wrapper alike."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from resnet_jax.models.init import variable_shapes
from resnet_jax.models.resnet import ResNet
from resnet_jax.models.scan import unstack_blocks
from resnet_jax.runtime.errors import UserError

__all__ = ["SHOWN_PER_KIND", "VariablePath", "check_fits", "expected_variables", "flax_name"]

VariablePath = tuple[str, ...]  # ('params', 'layer1_0', 'conv1', 'kernel')
Shape = tuple[int, ...]
SHOWN_PER_KIND = 5  # the report names this many of each kind of misfit, then counts the rest


def expected_variables(model: ResNet) -> dict[VariablePath, jax.ShapeDtypeStruct]:
    """The shape and dtype of each of `model`'s variables, by path, without computing any, in
    torchvision's layout (one entry per block, however the model stacks them: `models/scan.py`)."""
    return flatten_dict(unstack_blocks(variable_shapes(model)))


def flax_name(path: VariablePath, shape: Shape) -> tuple[str, Shape]:
    """`params/fc/kernel` and the shape as Flax holds it: `check_fits`'s default naming."""
    return "/".join(path), shape


def check_fits(
    variables: Mapping[str, Any],
    want: Mapping[VariablePath, jax.ShapeDtypeStruct],
    subject: str,
    advice: str = "",
    name: Callable[[VariablePath, Shape], tuple[str, Shape]] = flax_name,
) -> None:
    """A UserError when `variables` do not have the paths and shapes of `want` (a model's
    `expected_variables`): `{subject}: 2 missing: ...; 1 unexpected: ...; 1 wrong shape: x (3,)
    (expected (4,))[; {advice}].` `name(path, shape)` gives a variable's name and shape as the
    user knows them."""
    have = {path: tuple(np.shape(v)) for path, v in flatten_dict(dict(variables)).items()}

    def wrong_shape(path: VariablePath, shape: Shape) -> str:
        shown, expected = name(path, want[path].shape)
        return f"{shown} {name(path, shape)[1]} (expected {expected})"

    kinds = {
        "missing": [name(p, w.shape)[0] for p, w in want.items() if p not in have],
        "unexpected": [name(p, s)[0] for p, s in have.items() if p not in want],
        "wrong shape": [
            wrong_shape(p, s) for p, s in have.items() if p in want and s != want[p].shape
        ],
    }
    problems = [f"{len(items)} {kind}: {_first(items)}" for kind, items in kinds.items() if items]
    if problems:
        advice = f"; {advice}" if advice else ""
        raise UserError(f"{subject}: {'; '.join(problems)}{advice}.")


def _first(items: list[str]) -> str:
    more = len(items) - SHOWN_PER_KIND
    return ", ".join(items[:SHOWN_PER_KIND]) + (f" and {more} more" if more > 0 else "")
