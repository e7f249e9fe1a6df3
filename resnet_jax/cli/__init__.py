"""The command-line programs (`train.py`, `predict.py`, `convert_weights.py`, and the installed
`resnet-jax-*` commands): parse flags, make one library call, turn a UserError into one line.

This package, `predict` and `convert` import no JAX at import time, so their `--help` answers
at once; `train` builds its flags from `TrainConfig`, whose choices come from the models.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable
from typing import Any

__all__ = ["parser_for", "run"]

EXIT_ERROR = 1  # a UserError: one line on stderr


def _flag_type(hint: Any) -> type:
    """`int` for `int` and `int | None`, and so on."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def parser_for(config: type, **kwargs: Any) -> argparse.ArgumentParser:
    """An argparse parser with one `--flag-name` per field of the dataclass `config`, made from
    the field's type, default and metadata (see `resnet_jax.training.config.option`)."""
    parser = argparse.ArgumentParser(**kwargs)
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        meta = field.metadata
        flag = "--" + field.name.replace("_", "-")
        help_text = meta["help"]
        if field.default is not None and field.default is not False and field.default != ():
            help_text += " (default: %(default)s)"
        kind = _flag_type(hints[field.name])
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
            continue
        choices = list(meta["choices"]) if meta["choices"] is not None else None
        parser.add_argument(
            flag, *meta.get("aliases", ()), type=kind, default=field.default, choices=choices,
            help=help_text, **meta["argparse"],
        )  # fmt: skip
    return parser


def run(command: Callable[[], int]) -> int:
    """`command()`'s exit status; a UserError prints `error: <message>` on stderr and gives 1.

    Sets malloc up first, before any JAX computation, so that steps reuse their memory
    (`resnet_jax.runtime.memory`).
    """
    from resnet_jax.runtime.errors import UserError
    from resnet_jax.runtime.memory import keep_freed_memory

    keep_freed_memory()

    try:
        return command()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
