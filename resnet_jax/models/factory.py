"""Models by name: `create_model(arch)` builds what the registry describes, and one factory
function per registry entry (`resnet50()`, ...) is made from it, so a new entry needs no code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from resnet_jax.models.blocks import BLOCKS
from resnet_jax.models.registry import ARCHITECTURES, get_architecture
from resnet_jax.models.resnet import ResNet

__all__ = ["ARCHS", "create_model", "init_variables"]  # and one factory per architecture, below


def init_variables(model: ResNet, key: jax.Array | None = None, image_size: int = 32) -> dict:
    """Fresh {'params', 'batch_stats'} from one blank image (the shapes do not depend on its size)."""
    key = jax.random.key(0) if key is None else key
    return model.init(key, jnp.zeros((1, image_size, image_size, 3)), train=False)


def create_model(arch: str, **kwargs: Any) -> ResNet:
    """The ResNet that `registry.ARCHITECTURES[arch]` describes (a UserError for unknown names).

    Takes `num_classes`, `include_top`, `dtype` and the other ResNet fields.
    """
    a = get_architecture(arch)
    return ResNet(
        BLOCKS[a.block], a.layers, groups=a.groups, width_per_group=a.width_per_group, **kwargs
    )


def _factory(arch: str) -> Callable[..., ResNet]:
    def factory(**kwargs: Any) -> ResNet:
        return create_model(arch, **kwargs)

    factory.__name__ = factory.__qualname__ = arch
    factory.__doc__ = f"{get_architecture(arch).title}; takes what `create_model` takes."
    return factory


# Name -> factory, one per registry entry; each is also a module attribute (`factory.resnet50`).
ARCHS: dict[str, Callable[..., ResNet]] = {name: _factory(name) for name in ARCHITECTURES}
globals().update(ARCHS)
__all__ += list(ARCHS)
