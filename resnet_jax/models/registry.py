"""Every architecture's facts in one table: its structure, its parameter count, the eval
transform its images get, and torchvision's ImageNet weights where there are published ones.

Two families: torchvision's ImageNet ResNets/ResNeXts, and the paper's CIFAR-10 networks
(resnet20 ... resnet1202 and their plain twins plain20 ... plain110; He et al. 2016, section 4.2).

The factories (models/factory.py), architecture detection (weights/torch_names.py), downloads
(weights/download.py), the eval sizes (data/transforms.py), the tests and the README's table
all read `ARCHITECTURES`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from resnet_jax.runtime.errors import UserError

__all__ = [
    "ARCHITECTURES", "CIFAR_EVAL", "IMAGENET_EVAL", "Architecture", "EvalTransform",
    "ImageNetWeights", "find_architecture", "get_architecture", "sha256_prefix",
]  # fmt: skip


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side to `resize_size` (bilinear), centre-crop `crop_size`, normalise."""

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


IMAGENET_EVAL = EvalTransform()
# CIFAR's 32 px images as they are. The most used public CIFAR ResNet checkpoints (Idelbayev's
# pytorch_resnet_cifar10) were trained and evaluated with ImageNet's mean and std, so their
# weights predict right only with those; the CIFAR family keeps them.
CIFAR_EVAL = EvalTransform(resize_size=32, crop_size=32)


def sha256_prefix(filename: str) -> str | None:
    """`resnet18-f37072fd.pth` -> `f37072fd` (torch hub's naming), or None without one."""
    match = re.fullmatch(r".*-([0-9a-f]{6,64})\.[^.]+", filename)
    return None if match is None else match.group(1)


@dataclass(frozen=True)
class ImageNetWeights:
    """torchvision's IMAGENET1K_V1 weights: where they are and how well they do."""

    url: str
    top1: float  # ImageNet-1K top-1 accuracy in percent, as torchvision reports it

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
    """One ResNet/ResNeXt: block type, blocks and planes per stage, 3x3 groups and width per
    group, stem, shortcut option, and whether the blocks add a shortcut at all."""

    name: str
    title: str
    block: str  # "basic" (two 3x3 convs) or "bottleneck" (1x1, 3x3, 1x1)
    layers: tuple[int, ...]
    num_params: int  # with a `num_classes` head
    weights: ImageNetWeights | None = None  # None: no published weights to download
    groups: int = 1
    width_per_group: int = 64
    planes: tuple[int, ...] = (64, 128, 256, 512)
    stem: str = "imagenet"  # a key of resnet.STEMS
    shortcut: str = "B"  # the paper's option where the shape changes (resnet.SHORTCUT_OPTIONS)
    residual: bool = True  # False: the paper's plain network, no shortcuts
    num_classes: int = 1000  # the data set's, and the factory's default
    transform: EvalTransform = IMAGENET_EVAL  # what the published or the data set's images get

    @property
    def structure(self) -> tuple:
        """What a state dict reveals about the model: block, layers, groups, width per group,
        planes, stem and shortcut option (a plain network's tensors are its residual twin's)."""
        return (self.block, self.layers, self.groups, self.width_per_group, self.planes,
                self.stem, self.shortcut)  # fmt: skip

    def no_weights_error(self) -> UserError:
        """The sentence for asking to download weights that were never published."""
        return UserError(
            f"{self.name} has no published weights to download (torchvision publishes ImageNet "
            "weights for its ImageNet models only); pass a weights file with --weights PATH, "
            "or --weights none to start from random weights."
        )


def _cifar(name: str, n: int, num_params: int, residual: bool = True) -> Architecture:
    """The paper's 6n+2-layer CIFAR-10 network: a 3x3 16-channel stem, three stages of n basic
    blocks at 16, 32 and 64 planes, option A shortcuts (none in a plain network)."""
    title = f"{'ResNet' if residual else 'Plain'}-{6 * n + 2} (CIFAR-10)"
    return Architecture(name, title, "basic", (n, n, n), num_params, planes=(16, 32, 64),
                        stem="cifar", shortcut="A", residual=residual, num_classes=10,
                        transform=CIFAR_EVAL)  # fmt: skip


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
                     83_455_272, ImageNetWeights(_URL + "resnext101_64x4d-173b62eb.pth", 83.246),
                     groups=64, width_per_group=4, transform=EvalTransform(resize_size=232)),
        Architecture("wide_resnet50_2", "Wide ResNet-50-2", "bottleneck", (3, 4, 6, 3),
                     68_883_240, ImageNetWeights(_URL + "wide_resnet50_2-95faca4d.pth", 78.468),
                     width_per_group=128),
        Architecture("wide_resnet101_2", "Wide ResNet-101-2", "bottleneck", (3, 4, 23, 3),
                     126_886_696, ImageNetWeights(_URL + "wide_resnet101_2-32ee1156.pth", 78.848),
                     width_per_group=128),
        # The paper's Table 6 counts: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M, 19.4M.
        _cifar("resnet20", 3, 269_722),
        _cifar("resnet32", 5, 464_154),
        _cifar("resnet44", 7, 658_586),
        _cifar("resnet56", 9, 853_018),
        _cifar("resnet110", 18, 1_727_962),
        _cifar("resnet1202", 200, 19_421_274),
        _cifar("plain20", 3, 269_722, residual=False),
        _cifar("plain32", 5, 464_154, residual=False),
        _cifar("plain44", 7, 658_586, residual=False),
        _cifar("plain56", 9, 853_018, residual=False),
        _cifar("plain110", 18, 1_727_962, residual=False),
    )
}  # fmt: skip


def get_architecture(name: str) -> Architecture:
    """The registry entry `name`, or a UserError listing the known names."""
    if name not in ARCHITECTURES:
        raise UserError(
            f"Unknown architecture '{name}'; choose one of: {', '.join(ARCHITECTURES)}."
        )
    return ARCHITECTURES[name]


def find_architecture(structure: tuple) -> Architecture | None:
    """The entry with this `Architecture.structure`, if any; the residual network where a plain
    one has the same tensors."""
    found = [a for a in ARCHITECTURES.values() if a.structure == structure]
    return next((a for a in found if a.residual), found[0] if found else None)
