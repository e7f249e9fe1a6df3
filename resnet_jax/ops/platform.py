"""Which path an operation takes: the CPU's (extension, dense grouped kernels) or XLA's own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

__all__ = ["cpu_or_default", "on_cpu"]


def on_cpu() -> bool:
    """Whether traced work runs on the CPU: JAX's default backend is the CPU."""
    return jax.default_backend() == "cpu"


def cpu_or_default(cpu: Callable[..., Any], default: Callable[..., Any], *args: Any) -> Any:
    """`cpu(*args)` where JAX computes on the CPU, else `default(*args)`.

    Decided while tracing, not by `lax.platform_dependent`: autodiff linearizes and transposes
    both branches of its cond at every layer, half of a ResNet-50 train step's trace time.
    So lowering for another platform from a CPU process (`jax.export`) takes the CPU path:
    set RESNET_JAX_CONV=xla there.
    """
    return cpu(*args) if on_cpu() else default(*args)
