"""The optional compiled CPU extension via jax.ffi: oneDNN convolutions (csrc/onednn_conv.cc),
BatchNorm's per-channel sums (csrc/batch_norm.cc) and Adam's update (csrc/adam.cc).

`pip install -e .` builds `resnet_jax/ops/_cpu_kernels*.so` when a C++ compiler and the oneDNN
wheels are there; without it everything runs on XLA's own operations. RESNET_JAX_CONV=xla or
=onednn forces a path (A/B runs, tests); by default the extension runs float32 convolutions,
training-mode BatchNorm and Adam's update (`training.fused_adam`) on CPU when it is built. Other
platforms and dtypes take XLA's path.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from resnet_jax.ops.platform import cpu_or_default, on_cpu
from resnet_jax.runtime.errors import UserError

__all__ = [
    "CONV_ENV",
    "adam_update",
    "available",
    "batch_norm",
    "batch_norm_train",
    "conv",
    "conv_path",
    "convs_on_xla_cpu",
    "onednn_conv",
    "use_onednn",
]

CONV_ENV = "RESNET_JAX_CONV"
_PASSES = ("Forward", "InputGrad", "KernelGrad")


def _library_paths() -> list[Path]:
    """The built extension beside this file, for any of this interpreter's suffixes."""
    here = Path(__file__).parent
    return [here / f"_cpu_kernels{s}" for s in importlib.machinery.EXTENSION_SUFFIXES]


def _preload_onednn() -> None:
    """Load libdnnl.so.3 from the onednn-cpu-gomp wheel (installed under the environment's
    lib/), so that the extension's dependency on it resolves wherever the venv lives."""
    for prefix in {sys.prefix, sysconfig.get_path("data")}:
        candidate = Path(prefix, "lib", "libdnnl.so.3")
        if candidate.exists():
            ctypes.CDLL(str(candidate), mode=ctypes.RTLD_GLOBAL)
            return
    # Otherwise the dynamic loader's own search path may still find one.


@functools.cache
def _load() -> str | None:
    """Registers the FFI targets; returns None on success, else why the extension is unusable."""
    path = next((p for p in _library_paths() if p.exists()), None)
    if path is None:
        return "the CPU extension is not built"
    try:
        _preload_onednn()
        library = ctypes.CDLL(str(path))
    except OSError as e:
        return f"the CPU extension does not load ({e})"
    for name in _PASSES:
        handler = jax.ffi.pycapsule(getattr(library, f"OnednnConv{name}"))
        jax.ffi.register_ffi_target(f"resnet_jax_onednn_conv_{name}", handler, platform="cpu")
    for name in ("Moments", "GradSums"):
        handler = jax.ffi.pycapsule(getattr(library, f"BatchNorm{name}"))
        jax.ffi.register_ffi_target(f"resnet_jax_batch_norm_{name}", handler, platform="cpu")
    handler = jax.ffi.pycapsule(library.AdamUpdate)
    jax.ffi.register_ffi_target("resnet_jax_adam_update", handler, platform="cpu")
    return None


def available() -> bool:
    """Whether the CPU extension is built and loads on this machine."""
    return _load() is None


def conv_path() -> str:
    """ "onednn" or "xla": RESNET_JAX_CONV if set, else onednn where the extension is built."""
    forced = os.environ.get(CONV_ENV, "").strip().lower()
    if forced not in ("", "xla", "onednn"):
        raise UserError(f"{CONV_ENV}={forced!r} is not a convolution path: use 'xla' or 'onednn'")
    if forced == "onednn" and not available():
        raise UserError(
            f"{CONV_ENV}=onednn but {_load()}: reinstall with g++ present (pip install -e .) "
            f"or set {CONV_ENV}=xla"
        )
    if forced:
        return forced
    return "onednn" if available() else "xla"


def use_onednn(dtype: jnp.dtype) -> bool:
    """Whether work of this dtype (convolutions, training-mode BatchNorm) goes to the extension
    on CPU (float32 only)."""
    return jnp.dtype(dtype) == jnp.float32 and conv_path() == "onednn"


def convs_on_xla_cpu(dtype: jnp.dtype) -> bool:
    """Whether convolutions of this dtype run as XLA:CPU's own: on CPU without the extension
    (or with RESNET_JAX_CONV=xla), or in another dtype than float32."""
    return on_cpu() and not use_onednn(dtype)


def _call(name: str, shape: tuple[int, ...], a, b, stride: int, padding: int, groups: int):
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    attrs = {"stride": np.int64(stride), "padding": np.int64(padding), "groups": np.int64(groups)}
    return jax.ffi.ffi_call(f"resnet_jax_onednn_conv_{name}", out)(a, b, **attrs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def onednn_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int):
    """NHWC x HWIO float32 convolution (symmetric padding, `groups`) run by oneDNN; CPU only."""
    n, h, w, _ = x.shape
    k, out = kernel.shape[0], kernel.shape[3]
    ho, wo = ((d + 2 * padding - k) // stride + 1 for d in (h, w))
    return _call("Forward", (n, ho, wo, out), x, kernel, stride, padding, groups)


def _onednn_conv_fwd(x, kernel, stride, padding, groups):
    return onednn_conv(x, kernel, stride, padding, groups), (x, kernel)


def _onednn_conv_bwd(stride, padding, groups, residuals, dy):
    x, kernel = residuals
    dx = _call("InputGrad", x.shape, dy, kernel, stride, padding, groups)
    dkernel = _call("KernelGrad", kernel.shape, x, dy, stride, padding, groups)
    return dx, dkernel


onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


def conv(
    x: jax.Array,
    kernel: jax.Array,
    stride: int,
    padding: int,
    groups: int,
    fallback: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array:
    """oneDNN's convolution on CPU, `fallback(x, kernel)` on other platforms."""
    return cpu_or_default(
        lambda x, kernel: onednn_conv(x, kernel, stride, padding, groups), fallback, x, kernel
    )


def _channel_pair(name: str, c: int, *args):
    out = jax.ShapeDtypeStruct((c,), jnp.float32)
    return jax.ffi.ffi_call(f"resnet_jax_batch_norm_{name}", (out, out))(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """Training-mode BatchNorm of float32 NHWC x: (y, batch mean, biased batch variance).

    Both sums of the forward (mean, variance) and of the backward are one pass each through
    the extension (csrc/batch_norm.cc); the elementwise parts stay with XLA. CPU only.
    """
    mean, var = _channel_pair("Moments", x.shape[-1], x)
    mul = scale * lax.rsqrt(var + epsilon)
    return x * mul + (bias - mean * mul), mean, var


def _batch_norm_train_fwd(x, scale, bias, epsilon):
    y, mean, var = batch_norm_train(x, scale, bias, epsilon)
    return (y, mean, var), (x, scale, mean, var)


def _batch_norm_train_bwd(epsilon, residuals, cotangents):
    x, scale, mean, var = residuals
    dy, dmean, dvar = cotangents
    n = x.size // x.shape[-1]
    sum_dy, sum_dy_xc = _channel_pair("GradSums", x.shape[-1], dy, x, mean)
    inv_std = lax.rsqrt(var + epsilon)
    # d/dx of scale * (x - mean) * inv_std + bias through the batch mean and variance, plus
    # what the mean and variance outputs themselves receive.
    xc = x - mean
    dx = (scale * inv_std) * (dy - sum_dy / n - xc * (inv_std * inv_std * sum_dy_xc / n))
    dx = dx + dmean / n + xc * (2 * dvar / n)
    return dx, sum_dy_xc * inv_std, sum_dy


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def batch_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    epsilon: float,
    fallback: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, ...]],
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`batch_norm_train` on CPU, `fallback(x, scale, bias)` on other platforms."""
    return cpu_or_default(
        lambda x, scale, bias: batch_norm_train(x, scale, bias, epsilon), fallback, x, scale, bias
    )


ADAM_DECAY = {None: 0, "gradient": 1, "update": 2}  # csrc/adam.cc's Decay


def adam_update(
    scalars: jax.Array,
    grads: list[jax.Array],
    mu: list[jax.Array],
    nu: list[jax.Array],
    params: list[jax.Array],
    decay: str | None,
    apply: bool,
) -> tuple[list[jax.Array], list[jax.Array], list[jax.Array]]:
    """(updates, or new parameters with `apply`; new mu; new nu) of float32 arrays, in one call.

    `scalars` holds the step's constants in csrc/adam.cc's `Scalars` order; `decay` adds the
    weight decay to the gradient (Adam) or to the update (AdamW). The moments are updated in
    place, and so are the gradients (into updates) or the parameters (with `apply`).
    """
    n = len(grads)
    like = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in grads]
    # Argument 0 is `scalars`; the outputs are (out, mu, nu), each n long.
    overwritten = 1 + 3 * n if apply else 1
    aliases = {overwritten + k: k for k in range(n)}
    aliases |= {1 + n + k: n + k for k in range(n)} | {1 + 2 * n + k: 2 * n + k for k in range(n)}
    call = jax.ffi.ffi_call("resnet_jax_adam_update", like * 3, input_output_aliases=aliases)
    out = call(scalars, *grads, *mu, *nu, *params, decay=np.int64(ADAM_DECAY[decay]),
               apply=np.int64(apply))  # fmt: skip
    return out[:n], out[n : 2 * n], out[2 * n :]
