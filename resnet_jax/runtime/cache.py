"""Cache folders: where resnet_jax keeps downloads and compiled programs (and JAX's persistent
compilation cache there), and where torch hub keeps the weights it downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import jax

__all__ = ["default_cache_dir", "enable_compilation_cache", "torch_hub_dir"]


def _user_cache() -> Path:
    """$XDG_CACHE_HOME, else ~/.cache: where programs keep their caches."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def default_cache_dir() -> Path:
    """$RESNET_JAX_CACHE, else $XDG_CACHE_HOME/resnet_jax, else ~/.cache/resnet_jax."""
    if os.environ.get("RESNET_JAX_CACHE"):
        return Path(os.environ["RESNET_JAX_CACHE"]).expanduser()
    return _user_cache() / "resnet_jax"


def torch_hub_dir() -> Path:
    """Where torch.hub keeps downloaded weights: $TORCH_HOME/hub/checkpoints (TORCH_HOME
    defaults to $XDG_CACHE_HOME/torch)."""
    return Path(os.environ.get("TORCH_HOME") or _user_cache() / "torch") / "hub" / "checkpoints"


def enable_compilation_cache() -> None:
    """Keep compiled programs in <cache dir>/jax so the next run skips compilation.

    JAX_COMPILATION_CACHE_DIR overrides the whole path (an empty value turns caching off).
    """
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "jax"))
    # JAX's defaults skip programs that compile in under a second, i.e. most CPU programs.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
