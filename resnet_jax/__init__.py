"""resnet_jax: torchvision's ResNet and ResNeXt family in JAX/Flax, weights included.

The names below are loaded on first use, so that `import resnet_jax.cli` (and `--help`) does
not wait for JAX. `resnet_jax.nnx` (`resnet_jax.models.nnx`, the models as Flax NNX modules) is
loaded on first use too. The subpackages are the layers: runtime, ops, models, weights, data,
training, inference, cli (bottom to top).
"""

from __future__ import annotations

import importlib
from typing import Any

from resnet_jax.models.registry import ARCHITECTURES  # plain dataclasses: no JAX

# public name -> the module that defines it; one factory per registry entry (`resnet50`, ...)
_EXPORTS = {
    "UserError": "runtime.errors",
    "keep_freed_memory": "runtime.memory",
    **dict.fromkeys(("ARCHITECTURES", "Architecture", "get_architecture"), "models.registry"),
    **dict.fromkeys(("BasicBlock", "Bottleneck"), "models.blocks"),
    "BatchNorm": "models.layers",
    **dict.fromkeys(("ResNet", "pooled_features"), "models.resnet"),
    **dict.fromkeys(("stack_blocks", "unstack_blocks"), "models.scan"),
    **dict.fromkeys(("ARCHS", "create_model", "init_variables", *ARCHITECTURES), "models.factory"),
    "preprocess": "data.transforms",
    **dict.fromkeys(("check_variables", "detect_arch", "flax_to_torch", "torch_to_flax"),
                    "weights.torch_names"),
    "ModelMetadata": "weights.metadata",
    **dict.fromkeys(("load_variables", "read_metadata", "save_variables"), "weights.io"),
}  # fmt: skip
# Submodules reachable as attributes without an import (not in __all__: `nnx` would shadow flax's).
_SUBMODULES = {"nnx": "models.nnx"}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = importlib.import_module(f"resnet_jax.{_SUBMODULES[name]}")
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(f"resnet_jax.{_EXPORTS[name]}"), name)
    else:
        raise AttributeError(f"module 'resnet_jax' has no attribute '{name}'")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, *_SUBMODULES])
