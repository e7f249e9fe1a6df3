"""The one exception type for mistakes a user can fix, and the check every option shares."""

from __future__ import annotations

from collections.abc import Collection

__all__ = ["UserError", "check_choice"]


class UserError(Exception):
    """A mistake the user can fix; the CLIs print its one-line message instead of a traceback."""


def check_choice(flag: str, value: object, choices: Collection[str]) -> None:
    """UserError naming `--flag` and the valid choices unless `value` is one of them."""
    if value not in choices:
        raise UserError(f"Unknown --{flag} '{value}'; choose one of: {', '.join(choices)}.")
