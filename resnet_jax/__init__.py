"""resnet_jax: torchvision's ResNet and ResNeXt family in JAX/Flax, weights included.

The names below are loaded on first use, so that `import resnet_jax.cli` (and `--help`) does
not wait for JAX. `resnet_jax.nnx`
(`resnet_jax.models.nnx`, the models as Flax NNX modules) is loaded on first use too.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(("check_variables", "detect_arch", "flax_to_torch", "torch_to_flax"), "weights.torch_names"),
    "UserError": "runtime.errors",
    **dict.fromkeys(
        ("ARCHS", "BasicBlock", "BatchNorm", "Bottleneck", "ResNet", "create_model",
         "init_variables", "pooled_features", "resnet18", "resnet34", "resnet50", "resnet101",
         "resnet152", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
         "wide_resnet50_2", "wide_resnet101_2"),
        "models.resnet",
    ),
    "ModelMetadata": "weights.metadata",
    **dict.fromkeys(("ARCHITECTURES", "Architecture", "get_architecture"), "models.registry"),
    **dict.fromkeys(("load_variables", "read_metadata", "save_variables"), "weights.io"),
}  # fmt: skip
# Submodules reachable as attributes without an import (not in __all__: `nnx` would shadow flax's).
_SUBMODULES = {"nnx": "models.nnx"}

__all__ = [
    "ARCHITECTURES",
    "ARCHS",
    "Architecture",
    "BasicBlock",
    "BatchNorm",
    "Bottleneck",
    "ModelMetadata",
    "ResNet",
    "UserError",
    "check_variables",
    "create_model",
    "detect_arch",
    "flax_to_torch",
    "get_architecture",
    "init_variables",
    "load_variables",
    "pooled_features",
    "read_metadata",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "save_variables",
    "torch_to_flax",
    "wide_resnet50_2",
    "wide_resnet101_2",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"resnet_jax.{_SUBMODULES[name]}")
        globals()[name] = module
        return module
    if name not in _EXPORTS:
        raise AttributeError(f"module 'resnet_jax' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"resnet_jax.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, *_SUBMODULES])
