"""glibc malloc settings under which XLA:CPU reuses its step buffers instead of faulting them in.

XLA:CPU allocates the temporaries of each run of a compiled function with malloc on its worker
threads and frees them afterwards. glibc serves blocks that large with a fresh mmap from a
thread's arena and unmaps them on free, so every step page-faults its whole working memory in
again. With one arena, no mmap and no trimming, freed memory stays in the process and the next
step reuses it (benchmarks/RESULTS.md has the figures).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

__all__ = ["KEEP_MEMORY_ENV", "keep_freed_memory"]

KEEP_MEMORY_ENV = "RESNET_JAX_KEEP_MEMORY"  # "0" leaves malloc as it is

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def _accelerator_plugin() -> bool:
    """Whether JAX may run on a GPU/TPU plugin here (then XLA:CPU holds no step buffers)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return not platforms.startswith("cpu")
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return bool(plugins) or importlib.util.find_spec("jax_plugins") is not None


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse; True when the settings were applied.

    Call it before the first JAX computation: threads that already allocated keep the arena
    they have. Applied on Linux with glibc when JAX runs on the CPU, unless RESNET_JAX_KEEP_MEMORY
    is 0. The process then holds on to its peak memory until it exits.
    """
    if os.environ.get(KEEP_MEMORY_ENV, "").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    if platform.libc_ver()[0] != "glibc" or _accelerator_plugin():
        return False
    libc = ctypes.CDLL(None)
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
