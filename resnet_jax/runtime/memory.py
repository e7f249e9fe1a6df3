"""glibc malloc settings under which XLA:CPU reuses its step buffers instead of faulting them in
(and data workers their image buffers: `reuse_freed_blocks`).

XLA:CPU allocates the temporaries of each run of a compiled function with malloc and frees them
afterwards. glibc serves blocks that large with a fresh mmap and unmaps them on free, so every
step page-faults its whole working memory in again. With one arena, no mmap and no trimming,
freed memory stays in the process and the next step reuses it. That holds only if the next step
allocates after this one has freed: JAX's asynchronous CPU dispatch starts step N+1 as soon as
step N's outputs are ready, before N's temporaries are freed, and the heap then grows by a
step's worth again and again (ResNet-50 at batch 16: 4.8 GB instead of 2.2 GB). So the CPU
computations run synchronously too (benchmarks/RESULTS.md has the figures).

glibc's per-thread cache stays on: with it, about 1 ResNeXt-50 process in 7 holds a second
step block (the README's Speed section says why); turning it off at process start
(GLIBC_TUNABLES=glibc.malloc.tcache_count=0) keeps the peak steady but slowed steps by 6-13%.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

__all__ = ["KEEP_MEMORY_ENV", "keep_freed_memory", "reuse_freed_blocks"]

KEEP_MEMORY_ENV = "RESNET_JAX_KEEP_MEMORY"  # "0" leaves malloc as it is

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc on Linux and RESNET_JAX_KEEP_MEMORY is not 0."""
    if os.environ.get(KEEP_MEMORY_ENV, "").strip() == "0" or not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None) if platform.libc_ver()[0] == "glibc" else None


def _accelerator_plugin() -> bool:
    """Whether JAX may run on a GPU/TPU plugin here (then XLA:CPU holds no step buffers)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return not platforms.startswith("cpu")
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return bool(plugins) or importlib.util.find_spec("jax_plugins") is not None


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse; True when the settings were applied.

    It also makes JAX run CPU computations synchronously (a call returns when its step is done
    and its buffers are freed). Call it before the first JAX computation: threads that already
    allocated keep the arena they have. Applied on Linux with glibc when JAX runs on the CPU,
    unless RESNET_JAX_KEEP_MEMORY is 0. The process then holds on to its peak memory until it
    exits.
    """
    libc = _glibc()
    if libc is None or _accelerator_plugin():
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    if not all(libc.mallopt(param, value) == 1 for param, value in settings):
        return False
    import jax  # here, not at the top: data workers use this module without JAX

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def reuse_freed_blocks(limit: int = 32 << 20) -> bool:
    """Make glibc malloc serve blocks up to `limit` bytes from the heap and keep that much freed
    memory at its top; True when applied (as `keep_freed_memory`: glibc, not switched off).

    For data-loading processes: glibc maps each image-sized buffer afresh and unmaps it on free,
    so every image would fault its buffers in again.
    """
    libc = _glibc()
    settings = ((_M_MMAP_THRESHOLD, limit), (_M_TRIM_THRESHOLD, limit))
    return libc is not None and all(libc.mallopt(p, value) == 1 for p, value in settings)
