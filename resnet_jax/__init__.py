"""resnet_jax: torchvision's ResNet and ResNeXt family in JAX/Flax, weights included."""

from resnet_jax.convert import check_variables, detect_arch, flax_to_torch, torch_to_flax
from resnet_jax.errors import UserError
from resnet_jax.models import (
    ARCHS,
    BasicBlock,
    BatchNorm,
    Bottleneck,
    ResNet,
    create_model,
    pooled_features,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)
from resnet_jax.registry import ARCHITECTURES, Architecture, get_architecture

__all__ = [
    "ARCHITECTURES", "ARCHS", "Architecture", "BasicBlock", "BatchNorm", "Bottleneck", "ResNet",
    "UserError", "check_variables", "create_model", "detect_arch", "flax_to_torch",
    "get_architecture", "load_variables", "pooled_features", "resnet18", "resnet34", "resnet50",
    "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "save_variables", "torch_to_flax", "wide_resnet50_2", "wide_resnet101_2",
]  # fmt: skip


def __getattr__(name: str):
    # weights.py pulls in safetensors/flax serialization; import it only when asked for.
    if name in ("save_variables", "load_variables"):
        from resnet_jax import weights

        return getattr(weights, name)
    raise AttributeError(f"module 'resnet_jax' has no attribute '{name}'")
