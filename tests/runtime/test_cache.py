"""The cache folder and JAX's persistent compilation cache."""

import subprocess
import sys
from pathlib import Path

from resnet_jax.runtime import cache


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("RESNET_JAX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_cache_dir() == tmp_path / "xdg" / "resnet_jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.default_cache_dir() == Path.home() / ".cache" / "resnet_jax"
    monkeypatch.setenv("RESNET_JAX_CACHE", str(tmp_path / "mine"))
    assert cache.default_cache_dir() == tmp_path / "mine"


def test_compiled_programs_land_in_the_cache_dir(tmp_path):
    code = (
        "import jax, jax.numpy as jnp\n"
        "from resnet_jax.runtime.cache import enable_compilation_cache\n"
        "enable_compilation_cache()\n"
        "jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()\n"
    )
    env = {"RESNET_JAX_CACHE": str(tmp_path), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert any((tmp_path / "jax").iterdir())
