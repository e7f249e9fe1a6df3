"""Every architecture's facts in one table: its structure, torchvision's ImageNet weights with
the eval transform they were measured with, and its parameter count.

The factories (models/factory.py), architecture detection (weights/torch_names.py), downloads
(weights/download.py), the eval sizes (data/transforms.py), the tests and the README's table
all read `ARCHITECTURES`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from resnet_jax.runtime.errors import UserError

__all__ = [
    "ARCHITECTURES", "IMAGENET_EVAL", "Architecture", "EvalTransform", "ImageNetWeights",
    "find_architecture", "get_architecture", "sha256_prefix",
]  # fmt: skip


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side to `resize_size` (bilinear), centre-crop `crop_size`, normalise."""

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


IMAGENET_EVAL = EvalTransform()


def sha256_prefix(filename: str) -> str | None:
    """`resnet18-f37072fd.pth` -> `f37072fd` (torch hub's naming), or None without one."""
    match = re.fullmatch(r".*-([0-9a-f]{6,64})\.[^.]+", filename)
    return None if match is None else match.group(1)


@dataclass(frozen=True)
class ImageNetWeights:
    """torchvision's IMAGENET1K_V1 weights: where they are and how they were evaluated."""

    url: str
    top1: float  # ImageNet-1K top-1 accuracy in percent, as torchvision reports it
    transform: EvalTransform = IMAGENET_EVAL

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def sha256_prefix(self) -> str:
        """The start of the file's sha256, checked after download."""
        prefix = sha256_prefix(self.filename)
        assert prefix is not None, self.url
        return prefix


@dataclass(frozen=True)
class Architecture:
    """One ResNet/ResNeXt: block type, blocks per stage, 3x3 groups and width per group."""

    name: str
    title: str
    block: str  # "basic" (two 3x3 convs) or "bottleneck" (1x1, 3x3, 1x1)
    layers: tuple[int, int, int, int]
    num_params: int  # with the 1000-class head
    weights: ImageNetWeights
    groups: int = 1
    width_per_group: int = 64

    @property
    def structure(self) -> tuple[str, tuple[int, ...], int, int]:
        """What a state dict reveals about the model: block, layers, groups, width per group."""
        return self.block, self.layers, self.groups, self.width_per_group


_URL = "https://download.pytorch.org/models/"

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("resnet18", "ResNet-18", "basic", (2, 2, 2, 2), 11_689_512,
                     ImageNetWeights(_URL + "resnet18-f37072fd.pth", 69.758)),
        Architecture("resnet34", "ResNet-34", "basic", (3, 4, 6, 3), 21_797_672,
                     ImageNetWeights(_URL + "resnet34-b627a593.pth", 73.314)),
        Architecture("resnet50", "ResNet-50 (v1.5)", "bottleneck", (3, 4, 6, 3), 25_557_032,
                     ImageNetWeights(_URL + "resnet50-0676ba61.pth", 76.13)),
        Architecture("resnet101", "ResNet-101 (v1.5)", "bottleneck", (3, 4, 23, 3), 44_549_160,
                     ImageNetWeights(_URL + "resnet101-63fe2227.pth", 77.374)),
        Architecture("resnet152", "ResNet-152 (v1.5)", "bottleneck", (3, 8, 36, 3), 60_192_808,
                     ImageNetWeights(_URL + "resnet152-394f9c45.pth", 78.312)),
        Architecture("resnext50_32x4d", "ResNeXt-50 32x4d", "bottleneck", (3, 4, 6, 3),
                     25_028_904, ImageNetWeights(_URL + "resnext50_32x4d-7cdf4587.pth", 77.618),
                     groups=32, width_per_group=4),
        Architecture("resnext101_32x8d", "ResNeXt-101 32x8d", "bottleneck", (3, 4, 23, 3),
                     88_791_336, ImageNetWeights(_URL + "resnext101_32x8d-8ba56ff5.pth", 79.312),
                     groups=32, width_per_group=8),
        # torchvision trained this one with its newer recipe, evaluated after a resize to 232.
        Architecture("resnext101_64x4d", "ResNeXt-101 64x4d", "bottleneck", (3, 4, 23, 3),
                     83_455_272, ImageNetWeights(_URL + "resnext101_64x4d-173b62eb.pth", 83.246,
                                                 EvalTransform(resize_size=232)),
                     groups=64, width_per_group=4),
        Architecture("wide_resnet50_2", "Wide ResNet-50-2", "bottleneck", (3, 4, 6, 3),
                     68_883_240, ImageNetWeights(_URL + "wide_resnet50_2-95faca4d.pth", 78.468),
                     width_per_group=128),
        Architecture("wide_resnet101_2", "Wide ResNet-101-2", "bottleneck", (3, 4, 23, 3),
                     126_886_696, ImageNetWeights(_URL + "wide_resnet101_2-32ee1156.pth", 78.848),
                     width_per_group=128),
    )
}  # fmt: skip


def get_architecture(name: str) -> Architecture:
    """The registry entry `name`, or a UserError listing the known names."""
    if name not in ARCHITECTURES:
        raise UserError(
            f"Unknown architecture '{name}'; choose one of: {', '.join(ARCHITECTURES)}."
        )
    return ARCHITECTURES[name]


def find_architecture(structure: tuple[str, tuple[int, ...], int, int]) -> Architecture | None:
    """The entry with this (block, layers, groups, width per group), if any."""
    return next((a for a in ARCHITECTURES.values() if a.structure == structure), None)
