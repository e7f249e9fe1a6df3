"""TrivialAugmentWide, RandAugment and AutoAugment on PIL images, as torchvision 0.29 does them.

Each augmentation is split in two: `sample(rng, height, width)` draws the random choices from a
numpy Generator as a list of (op name, signed magnitude), and `apply_ops` applies such a list
with the Pillow calls torchvision's `autoaugment._apply_op` makes, so that the same choices give
the same pixels as torchvision. The magnitude tables, signs, fill and op lists are torchvision's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from resnet_jax.runtime.errors import UserError

__all__ = [
    "AUTOAUGMENT_POLICIES",
    "INTERPOLATIONS",
    "OPS",
    "SIGNED_OPS",
    "AutoAugment",
    "Op",
    "RandAugment",
    "TrivialAugmentWide",
    "apply_op",
    "apply_ops",
    "inverse_affine_matrix",
    "linspace32",
    "magnitudes",
]

Op = tuple[str, float]  # (op name, signed magnitude): one step of an augmentation
Fill = int | tuple[int, ...]

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}

# The ops RandAugment and TrivialAugmentWide choose from, in torchvision's order.
OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
    "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)  # fmt: skip
_ENHANCERS = {
    "Brightness": ImageEnhance.Brightness,
    "Color": ImageEnhance.Color,
    "Contrast": ImageEnhance.Contrast,
    "Sharpness": ImageEnhance.Sharpness,
}

# The ops whose magnitude torchvision applies with a random sign.
SIGNED_OPS = frozenset(("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", *_ENHANCERS))

# (op, probability, magnitude bin of 10 or None) pairs from the AutoAugment paper, per dataset.
AUTOAUGMENT_POLICIES: dict[str, tuple[tuple[tuple[str, float, int | None], ...], ...]] = {
    "imagenet": (
        (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
        (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
        (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
        (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
        (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
        (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
        (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
        (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
        (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
        (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
        (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
        (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
        (("Color", 0.4, 0), ("Equalize", 0.6, None)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    ),
    "cifar10": (
        (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
        (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
        (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
        (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
        (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
        (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
        (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
        (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
        (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
        (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
        (("Color", 0.9, 9), ("Equalize", 0.6, None)),
        (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
        (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
        (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
        (("Equalize", 0.8, None), ("Invert", 0.1, None)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
    ),
    "svhn": (
        (("ShearX", 0.9, 4), ("Invert", 0.2, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.6, None), ("Solarize", 0.6, 6)),
        (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("AutoContrast", 0.8, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.4, None)),
        (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
        (("Invert", 0.9, None), ("AutoContrast", 0.8, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)),
        (("ShearY", 0.8, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.9, None), ("TranslateY", 0.6, 6)),
        (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)),
        (("Invert", 0.8, None), ("TranslateY", 0.0, 2)),
        (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)),
        (("Invert", 0.6, None), ("Rotate", 0.8, 4)),
        (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)),
        (("ShearX", 0.1, 6), ("Invert", 0.6, None)),
        (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)),
        (("ShearY", 0.8, 4), ("Invert", 0.8, None)),
        (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)),
        (("ShearY", 0.8, 5), ("AutoContrast", 0.7, None)),
        (("ShearX", 0.7, 2), ("Invert", 0.1, None)),
    ),
}


def linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps)` in float32, bit for bit.

    torch's CPU kernel takes a float32 step and computes `start + step * i` for the first half
    and `end - step * (steps - 1 - i)` for the rest, each rounded once (its x86 build fuses the
    multiply and the add); both are exact in float64 here, so one rounding to float32 matches.
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps)
    low = np.float64(start32) + step * i
    high = np.float64(end32) - step * (steps - 1 - i)
    return np.where(i < steps // 2, low, high).astype(np.float32)


def magnitudes(op: str, bins: int, height: int, width: int, wide: bool) -> np.ndarray | None:
    """torchvision's magnitude table of `op` (`_augmentation_space`), None for ops without one.

    `wide` selects TrivialAugmentWide's wider ranges; otherwise RandAugment's and AutoAugment's,
    whose translations scale with the image (`height`, `width`).
    """
    if op in ("ShearX", "ShearY"):
        return linspace32(0.0, 0.99 if wide else 0.3, bins)
    if op in ("TranslateX", "TranslateY"):
        side = width if op == "TranslateX" else height
        return linspace32(0.0, 32.0 if wide else 150.0 / 331.0 * side, bins)
    if op == "Rotate":
        return linspace32(0.0, 135.0 if wide else 30.0, bins)
    if op in _ENHANCERS:
        return linspace32(0.0, 0.99 if wide else 0.9, bins)
    if op == "Posterize":  # bits kept, from 8 down to 2 (wide) or 4
        levels = np.float32((bins - 1) / (6 if wide else 4))
        return 8 - np.round(np.arange(bins, dtype=np.float32) / levels).astype(np.int32)
    if op == "Solarize":  # the threshold, from 255 (no change) down to 0 (inverted)
        return linspace32(255.0, 0.0, bins)
    return None  # Identity, AutoContrast, Equalize, Invert


def inverse_affine_matrix(
    center: Sequence[float], translate: Sequence[float], shear: Sequence[float]
) -> list[float]:
    """Pillow's output->input affine map of a shear (degrees) and translation about `center`.

    torchvision's `_get_inverse_affine_matrix` with angle 0 and scale 1, in its float operations.
    """
    sx, sy = math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(-sy) / math.cos(sy)
    b = -math.cos(-sy) * math.tan(sx) / math.cos(sy) - math.sin(0.0)
    c = math.sin(-sy) / math.cos(sy)
    d = -math.sin(-sy) * math.tan(sx) / math.cos(sy) + math.cos(0.0)
    matrix = [d, -b, 0.0, -c, a, 0.0]
    matrix[2] += matrix[0] * (-cx - tx) + matrix[1] * (-cy - ty)
    matrix[5] += matrix[3] * (-cx - tx) + matrix[4] * (-cy - ty)
    matrix[2] += cx
    matrix[5] += cy
    return matrix


def _affine(
    image: Image.Image,
    center: Sequence[float],
    translate: Sequence[float],
    shear: Sequence[float],
    resample: Image.Resampling,
    fill: tuple[int, ...],
) -> Image.Image:
    matrix = inverse_affine_matrix(center, translate, shear)
    return image.transform(image.size, Image.Transform.AFFINE, matrix, resample, fillcolor=fill)


def apply_op(
    image: Image.Image,
    op: str,
    magnitude: float,
    resample: Image.Resampling = Image.Resampling.NEAREST,
    fill: tuple[int, ...] = (0, 0, 0),
) -> Image.Image:
    """One op with its signed magnitude, as torchvision's `_apply_op` on a PIL image."""
    if op in _ENHANCERS:
        return _ENHANCERS[op](image).enhance(1.0 + magnitude)
    if op in ("ShearX", "ShearY"):
        # The tables hold tan(shear); torchvision hands F.affine the angle in degrees.
        angle = math.degrees(math.atan(magnitude))
        shear = (angle, 0.0) if op == "ShearX" else (0.0, angle)
        return _affine(image, (0, 0), (0, 0), shear, resample, fill)
    if op in ("TranslateX", "TranslateY"):
        shift = int(magnitude)  # whole pixels, truncated towards zero
        translate = (shift, 0) if op == "TranslateX" else (0, shift)
        center = (image.width * 0.5, image.height * 0.5)
        return _affine(image, center, translate, (0.0, 0.0), resample, fill)
    if op == "Rotate":
        return image.rotate(magnitude, resample, expand=False, center=None, fillcolor=fill)
    if op == "Posterize":
        return ImageOps.posterize(image, int(magnitude))
    if op == "Solarize":
        return ImageOps.solarize(image, magnitude)
    if op == "AutoContrast":
        return ImageOps.autocontrast(image)
    if op == "Equalize":
        return ImageOps.equalize(image)
    if op == "Invert":
        return ImageOps.invert(image)
    if op == "Identity":
        return image
    raise ValueError(f"unknown augmentation op {op!r}")


def apply_ops(
    image: Image.Image, ops: Sequence[Op], interpolation: str = "nearest", fill: Fill = 0
) -> Image.Image:
    """Apply the ops one after the other (the deterministic half of every augmentation here).

    `fill` (one value for every band, or one per band) colours the area the geometric ops bring in.
    """
    resample = INTERPOLATIONS[interpolation]
    fill = (fill,) * len(image.getbands()) if isinstance(fill, int) else tuple(fill)
    for op, magnitude in ops:
        image = apply_op(image, op, magnitude, resample, fill)
    return image


@dataclass(frozen=True, kw_only=True)
class _Augmentation:
    """What the three augmentations share: `interpolation` and `fill` of the geometric ops (the
    area outside the image), and `__call__` = `sample` then `apply_ops`.
    """

    interpolation: str = "nearest"
    fill: Fill = 0

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            names = ", ".join(INTERPOLATIONS)
            raise UserError(f"Interpolation '{self.interpolation}' is not one of {names}.")

    def sample(self, rng: np.random.Generator, height: int, width: int) -> list[Op]:
        raise NotImplementedError

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """The augmented image; its randomness comes only from `rng`."""
        ops = self.sample(rng, image.height, image.width)
        return apply_ops(image, ops, self.interpolation, self.fill)


def _check_bins(bins: int) -> None:
    if bins < 2:
        raise UserError(f"The number of magnitude bins must be at least 2, not {bins}.")


@dataclass(frozen=True)
class TrivialAugmentWide(_Augmentation):
    """One op, uniformly chosen, at a uniformly chosen magnitude bin (Müller & Hutter, 2021)."""

    num_magnitude_bins: int = 31

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_bins(self.num_magnitude_bins)

    def sample(self, rng: np.random.Generator, height: int, width: int) -> list[Op]:
        op = OPS[rng.integers(len(OPS))]
        table = magnitudes(op, self.num_magnitude_bins, height, width, wide=True)
        magnitude = 0.0 if table is None else float(table[rng.integers(len(table))])
        if op in SIGNED_OPS and rng.integers(2):
            magnitude = -magnitude
        return [(op, magnitude)]


@dataclass(frozen=True)
class RandAugment(_Augmentation):
    """`num_ops` uniformly chosen ops, all at bin `magnitude` of `num_magnitude_bins`."""

    num_ops: int = 2
    magnitude: int = 9
    num_magnitude_bins: int = 31

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_bins(self.num_magnitude_bins)
        if not 0 <= self.magnitude < self.num_magnitude_bins:
            raise UserError(
                f"RandAugment magnitude {self.magnitude} is not in [0, "
                f"{self.num_magnitude_bins - 1}]; pick a bin below num_magnitude_bins."
            )
        if self.num_ops < 0:
            raise UserError(f"RandAugment num_ops must be >= 0, not {self.num_ops}.")

    def sample(self, rng: np.random.Generator, height: int, width: int) -> list[Op]:
        ops = []
        for _ in range(self.num_ops):
            op = OPS[rng.integers(len(OPS))]
            table = magnitudes(op, self.num_magnitude_bins, height, width, wide=False)
            magnitude = 0.0 if table is None else float(table[self.magnitude])
            if op in SIGNED_OPS and rng.integers(2):
                magnitude = -magnitude
            ops.append((op, magnitude))
        return ops


@dataclass(frozen=True)
class AutoAugment(_Augmentation):
    """One uniformly chosen sub-policy of `policy`; each of its two ops applied with its probability."""

    policy: str = "imagenet"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.policy not in AUTOAUGMENT_POLICIES:
            names = ", ".join(AUTOAUGMENT_POLICIES)
            raise UserError(f"AutoAugment policy '{self.policy}' is not one of {names}.")

    def sample(self, rng: np.random.Generator, height: int, width: int) -> list[Op]:
        policies = AUTOAUGMENT_POLICIES[self.policy]
        sub_policy = policies[rng.integers(len(policies))]
        probs, signs = rng.random(2), rng.integers(2, size=2)
        ops = []
        for (op, p, bin_), prob, sign in zip(sub_policy, probs, signs):
            if prob <= p:
                table = magnitudes(op, 10, height, width, wide=False)
                magnitude = 0.0 if bin_ is None else float(table[bin_])
                if op in SIGNED_OPS and sign == 0:
                    magnitude = -magnitude
                ops.append((op, magnitude))
        return ops
