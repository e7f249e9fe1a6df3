"""matplotlib, the one optional dependency: drawings are skipped without it, and what a user
asks for by flag says in one sentence how to install it."""

from __future__ import annotations

from resnet_jax.runtime.errors import UserError

__all__ = ["PLOT_EXTRA", "matplotlib_figure"]

PLOT_EXTRA = "pip install resnet_jax[plot]"


def matplotlib_figure(needed_for: str | None = None) -> type | None:
    """matplotlib's `Figure`, which draws without pyplot (no display, no global state); when
    matplotlib is missing, None, or with `needed_for` ("--cam"), a UserError saying so."""
    try:
        import matplotlib  # noqa: F401 (asked first: the package, not a cached submodule, decides)
        from matplotlib.figure import Figure
    except ImportError:
        if needed_for is None:
            return None
        raise UserError(f"{needed_for} needs matplotlib; install it with `{PLOT_EXTRA}`.") from None
    return Figure
