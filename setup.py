"""Builds the optional CPU extension (csrc/, see resnet_jax/ops/extension.py): oneDNN convolutions,
BatchNorm's sums and a fused Adam.

The headers come from the build requirements in pyproject.toml (jax for XLA's FFI API,
onednn-devel-cpu-gomp for oneDNN). Where they are missing or the compiler fails, the package
installs without the extension and runs XLA's own convolutions and sums.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from setuptools import Extension, setup


def installed_file(distribution: str, suffix: str) -> Path | None:
    """The file of an installed `distribution` whose path ends with `suffix`, if any."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = (f for f in files if f.as_posix().endswith(suffix))
    return next((Path(f.locate()).resolve() for f in found), None)


def onednn_extension() -> list[Extension]:
    try:
        import jax.ffi
    except ImportError:
        return []
    header = installed_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp")
    library = installed_file("onednn-cpu-gomp", "/libdnnl.so.3")
    if header is None or library is None:
        return []
    extension = Extension(
        "resnet_jax.ops._cpu_kernels",
        ["csrc/onednn_conv.cc", "csrc/batch_norm.cc", "csrc/adam.cc"],
        include_dirs=[jax.ffi.include_dir(), str(header.parents[2])],
        library_dirs=[str(library.parent)],
        libraries=["dnnl"],
        # XLA's FFI headers trip these two warnings in g++ 12; they are not ours. OpenMP: the
        # BatchNorm sums share GNU OpenMP's threads with oneDNN (the gomp build).
        # No FMA contraction and no errno from sqrt: csrc/adam.cc rounds as optax does, and
        # vectorises.
        extra_compile_args=[
            "-std=c++17", "-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
            "-Wno-return-type", "-Wno-attributes",
        ],  # fmt: skip
        extra_link_args=["-fopenmp"],
        language="c++",
        optional=True,
    )
    return [extension]


setup(ext_modules=onednn_extension())
