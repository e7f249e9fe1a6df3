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

__all__ = ["EXIT_SKIPPED", "parser_for", "report_skipped", "run"]

EXIT_ERROR = 1  # a UserError: one line on stderr
EXIT_SKIPPED = 2  # the readable images were done, unreadable ones skipped


def _refuse_too_little_address_space() -> None:
    """Exit 1 with the one line when the address-space limit is too small for JAX even to
    load: the commands import it (train's flags do) before `run` could report anything."""
    from resnet_jax.runtime.errors import UserError
    from resnet_jax.runtime.out_of_memory import check_address_space

    try:
        check_address_space()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None


_refuse_too_little_address_space()


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


def report_skipped(skipped: int, total: int) -> int:
    """The exit status of a run over `total` images of which `skipped` could not be read: 0, or
    EXIT_SKIPPED after a line on stderr saying how many."""
    if not skipped:
        return 0
    print(f"{skipped} of {total} images could not be read and were skipped.", file=sys.stderr)
    return EXIT_SKIPPED


def run(
    command: Callable[[], int],
    sizes: str = "while running; close other programs",
    program: bool = False,
) -> int:
    """`command()`'s exit status; a UserError prints `error: <message>` on stderr and gives 1.

    Running out of memory is one too: `sizes` names the run's sizes and what to lower (e.g.
    "evaluating at --batch-size 32; lower it"). `program`: this process is the command-line
    program, not a caller in process; then, under an address-space limit, the command runs in a
    child process so that even XLA's C++ aborts end in that line (`runtime.out_of_memory`).
    Sets malloc up first, before any JAX computation, so that steps reuse their memory
    (`resnet_jax.runtime.memory`).
    """
    from resnet_jax.runtime import out_of_memory as oom
    from resnet_jax.runtime.errors import UserError
    from resnet_jax.runtime.memory import keep_freed_memory

    keep_freed_memory()

    try:
        status = oom.supervise(sizes) if program else None
        return command() if status is None else status
    except UserError as e:
        # A file's reader met a failed allocation, not a damaged file.
        memory = oom.is_out_of_memory(e.__cause__)
        print(f"error: {oom.out_of_memory_error(sizes) if memory else e}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:
        if not oom.is_out_of_memory(e):
            raise
        print(f"error: {oom.out_of_memory_error(sizes)}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        oom.finished()
