"""The one exception type for mistakes a user can fix."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A mistake the user can fix; the CLIs print its one-line message instead of a traceback."""
