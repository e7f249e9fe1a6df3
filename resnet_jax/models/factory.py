"""Models by name: `create_model(arch)` builds what the registry describes, and one factory
function per registry entry (`resnet50()`, ...) is made from it, so a new entry needs no code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from resnet_jax.models.blocks import BLOCKS
from resnet_jax.models.init import init_variables
from resnet_jax.models.registry import ARCHITECTURES, get_architecture
from resnet_jax.models.resnet import ResNet

# and one factory per architecture, below; init_variables is models.init's, kept here for callers
__all__ = ["ARCHS", "create_model", "init_variables"]


def create_model(arch: str, **kwargs: Any) -> ResNet:
    """The ResNet that `registry.ARCHITECTURES[arch]` describes (a UserError for unknown names).

    Takes `num_classes` (default: the architecture's data set's), `include_top`, `dtype` and
    the other ResNet fields, such as `shortcut="B"` or `scan=False`.
    """
    a = get_architecture(arch)
    registered = {
        "num_classes": a.num_classes, "groups": a.groups, "width_per_group": a.width_per_group,
        "planes": a.planes, "stem": a.stem, "shortcut": a.shortcut, "residual": a.residual,
    }  # fmt: skip
    return ResNet(BLOCKS[a.block], a.layers, **{**registered, **kwargs})


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
