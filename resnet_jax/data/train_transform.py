"""The per-image training transform the Loader applies: a crop, a flip, then an auto-augmentation.

`TrainTransform()` is the ImageNet recipe (RandomResizedCrop + RandomHorizontalFlip); its fields
select the rest of torchvision's reference recipes, in the order of their
`ClassificationPresetTrain`: crop, flip, then TrivialAugmentWide, RandAugment or AutoAugment, all
with one interpolation. `crop="pad_crop"` is the CIFAR recipe (4-pixel zero padding, a random
32x32 crop). All randomness comes from the Generator passed in, in a fixed order of draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from resnet_jax.data.augment import INTERPOLATIONS, AutoAugment, RandAugment, TrivialAugmentWide
from resnet_jax.data.transforms import random_resized_crop_flip
from resnet_jax.runtime.errors import UserError

__all__ = ["AUTO_AUGMENTS", "CROPS", "TrainTransform", "pad_crop_flip"]

CROPS = ("random_resized", "pad_crop")
AUTO_AUGMENTS = ("none", "ta_wide", "randaugment", "autoaugment")


def pad_crop_flip(
    image: Image.Image,
    image_size: int,
    rng: np.random.Generator,
    padding: int = 4,
    flip_p: float = 0.5,
) -> np.ndarray:
    """torchvision's `RandomCrop(image_size, padding)` + `RandomHorizontalFlip(flip_p)` -> HWC uint8.

    Zero padding on every side, then a crop at a uniformly drawn offset (rows first), then the flip.
    """
    array = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    height, width = array.shape[0] + 2 * padding, array.shape[1] + 2 * padding
    if height < image_size or width < image_size:
        name = getattr(image, "filename", "") or "an image"
        raise UserError(
            f"{name} is {array.shape[1]}x{array.shape[0]} pixels, too small for a "
            f"{image_size}-pixel crop even after {padding}-pixel padding; lower the image size "
            "or use the random_resized crop."
        )
    i = int(rng.integers(0, height - image_size + 1))
    j = int(rng.integers(0, width - image_size + 1))
    padded = np.pad(array, ((padding, padding), (padding, padding), (0, 0)))
    crop = padded[i : i + image_size, j : j + image_size]
    if rng.random() < flip_p:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


@dataclass(frozen=True)
class TrainTransform:
    """What the training Loader does to each image; the defaults are today's ImageNet recipe.

    crop: "random_resized" (RandomResizedCrop with `scale` and `ratio`) or "pad_crop"
    (RandomCrop with `padding`); flip_p: RandomHorizontalFlip's probability; auto_augment: "none",
    "ta_wide" (TrivialAugmentWide with `num_magnitude_bins`), "randaugment" (`num_ops`,
    `magnitude`, `num_magnitude_bins`) or "autoaugment" (`policy`); interpolation: of the crop's
    resize and the augmentations' geometric ops, as torchvision's reference recipes share it.
    """

    crop: str = "random_resized"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    padding: int = 4
    flip_p: float = 0.5
    auto_augment: str = "none"
    num_ops: int = 2
    magnitude: int = 9
    num_magnitude_bins: int = 31
    policy: str = "imagenet"
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        for field, value, choices in [
            ("crop", self.crop, CROPS),
            ("auto_augment", self.auto_augment, AUTO_AUGMENTS),
            ("interpolation", self.interpolation, tuple(INTERPOLATIONS)),
        ]:
            if value not in choices:
                raise UserError(f"Training {field} '{value}' is not one of {', '.join(choices)}.")
        if not 0.0 <= self.flip_p <= 1.0:
            raise UserError(f"The flip probability {self.flip_p} is not in [0, 1].")
        if self.padding < 0:
            raise UserError(f"The crop padding must be >= 0 pixels, not {self.padding}.")
        self.augmentation()  # its own checks (magnitude bins, policy name)

    def augmentation(self) -> TrivialAugmentWide | RandAugment | AutoAugment | None:
        """The auto-augmentation this transform applies after the crop and flip, if any."""
        if self.auto_augment == "ta_wide":
            return TrivialAugmentWide(self.num_magnitude_bins, interpolation=self.interpolation)
        if self.auto_augment == "randaugment":
            return RandAugment(
                self.num_ops,
                self.magnitude,
                self.num_magnitude_bins,
                interpolation=self.interpolation,
            )
        if self.auto_augment == "autoaugment":
            return AutoAugment(self.policy, interpolation=self.interpolation)
        return None

    def __call__(
        self,
        image: Image.Image,
        image_size: int,
        rng: np.random.Generator,
        reduced_decode: bool = False,
    ) -> np.ndarray:
        """`image` -> (image_size, image_size, 3) uint8: crop, flip, augmentation, in that order.
        `reduced_decode`: a random resized crop of a JPEG not yet decoded decodes it at reduced
        size where the crop allows (`transforms.reduced_resized_crop`)."""
        if self.crop == "pad_crop":
            array = pad_crop_flip(image, image_size, rng, self.padding, self.flip_p)
        else:
            resample = INTERPOLATIONS[self.interpolation]
            array = random_resized_crop_flip(
                image, image_size, rng, self.scale, self.ratio, self.flip_p, resample,
                reduced_decode,
            )  # fmt: skip
        augmentation = self.augmentation()
        if augmentation is None:
            return array
        return np.array(augmentation(Image.fromarray(array), rng))
