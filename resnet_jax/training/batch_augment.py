"""Augmentations of a whole normalised batch on the device: random erasing, then Mixup or
CutMix, with the semantics of torchvision's `transforms.v2.RandomErasing`, `MixUp` and `CutMix`.

torchvision's reference scripts erase per image after Normalize (so value 0 is the mean colour)
and mix the collated batch afterwards, each row with the row before it (`roll(1, 0)`), one
lambda per batch from Beta(alpha, alpha); with both alphas set, `RandomChoice` picks one of the
two per batch (`switch_prob` is the chance of CutMix; torchvision's: 0.5). Here the batch is the
global one, so one lambda serves all devices where torchvision draws one per GPU.

A row mixed with a padding or unreadable row (mask False) stays as it is, so that an image the
loader could not read never leaks into the loss.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "BatchAugment", "Boxes", "Mixed", "augment_batch", "cutmix", "cutmix_box", "erase",
    "erase_boxes", "mixed_targets", "mixup",
]  # fmt: skip

ERASE_SCALE = (0.02, 0.33)  # RandomErasing's defaults: the erased share of the image,
ERASE_RATIO = (0.3, 3.3)  # its aspect ratio,
ERASE_ATTEMPTS = 10  # and the boxes it tries before giving up on an image


@dataclasses.dataclass(frozen=True)
class BatchAugment:
    """Which batch augmentations a train step applies (hashable: a static jit argument)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    switch_prob: float = 0.5  # with both alphas set: the chance of CutMix rather than Mixup
    erase_prob: float = 0.0  # RandomErasing's p, per image

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


class Mixed(NamedTuple):
    """A mixed batch: the target of row r is `weight[r]` of `label[r]` plus the rest of
    `partner[r]` (`mixed_targets` makes the probabilities)."""

    images: jax.Array
    label: jax.Array
    partner: jax.Array
    weight: jax.Array


class Boxes(NamedTuple):
    """One box per image, in pixels; height 0 erases nothing."""

    top: jax.Array
    left: jax.Array
    height: jax.Array
    width: jax.Array


def mixed_targets(mixed: Mixed, num_classes: int) -> jax.Array:
    """(n, num_classes) probabilities, as torchvision's `_mixup_label`."""
    own = jax.nn.one_hot(mixed.label, num_classes)
    other = jax.nn.one_hot(mixed.partner, num_classes)
    w = mixed.weight[:, None]
    return other * (1.0 - w) + own * w


def _partners(labels: jax.Array, mask: jax.Array, lam: jax.Array) -> tuple[jax.Array, ...]:
    """Each row's partner label (the row before it), its own weight (`lam`, or 1 where the
    partner is not a real image) and whether the partner is real."""
    partner_real = jnp.roll(mask, 1, axis=0)
    weight = jnp.where(partner_real, lam, 1.0).astype(jnp.float32)
    return jnp.roll(labels, 1, axis=0), weight, partner_real


def mixup(images: jax.Array, labels: jax.Array, mask: jax.Array, lam: jax.Array) -> Mixed:
    """`MixUp`: each image blended with the one before it, lam of its own."""
    partner, weight, _ = _partners(labels, mask, lam)
    w = weight.astype(images.dtype)[:, None, None, None]
    mixed = jnp.roll(images, 1, axis=0) * (1 - w) + images * w
    return Mixed(mixed, labels, partner, weight)


def cutmix_box(
    lam: jax.Array, center_x: jax.Array, center_y: jax.Array, height: int, width: int
) -> tuple[jax.Array, Boxes]:
    """`CutMix.make_params` from its draws: the box around (center_x, center_y) with sides
    sqrt(1 - lam) of the image's, clipped to it, and lam corrected to the box's true area."""
    r = 0.5 * jnp.sqrt(1.0 - lam)
    half_w = jnp.floor(r * width).astype(jnp.int32)
    half_h = jnp.floor(r * height).astype(jnp.int32)
    x1, x2 = jnp.maximum(center_x - half_w, 0), jnp.minimum(center_x + half_w, width)
    y1, y2 = jnp.maximum(center_y - half_h, 0), jnp.minimum(center_y + half_h, height)
    lam_adjusted = 1.0 - ((x2 - x1) * (y2 - y1)) / (width * height)
    return lam_adjusted.astype(jnp.float32), Boxes(y1, x1, y2 - y1, x2 - x1)


def _inside(boxes: Boxes, height: int, width: int) -> jax.Array:
    """(n, height, width, 1) True inside each image's box (boxes of one row broadcast)."""
    rows, cols = jnp.arange(height), jnp.arange(width)
    top, left = jnp.atleast_1d(boxes.top), jnp.atleast_1d(boxes.left)
    in_rows = (rows >= top[:, None]) & (rows < (top + jnp.atleast_1d(boxes.height))[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + jnp.atleast_1d(boxes.width))[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :])[..., None]


def cutmix(
    images: jax.Array, labels: jax.Array, mask: jax.Array, lam: jax.Array, box: Boxes
) -> Mixed:
    """`CutMix`: the box (one for the batch) pasted from the image before each image; `lam`
    is the corrected one from `cutmix_box`."""
    partner, weight, partner_real = _partners(labels, mask, lam)
    paste = _inside(box, *images.shape[1:3]) & partner_real[:, None, None, None]
    return Mixed(jnp.where(paste, jnp.roll(images, 1, axis=0), images), labels, partner, weight)


def erase_boxes(key: jax.Array, n: int, height: int, width: int, p: float) -> Boxes:
    """`RandomErasing(p).make_params` for each of n images: with probability p, the first of
    ERASE_ATTEMPTS boxes (area share from ERASE_SCALE, log-uniform aspect from ERASE_RATIO)
    that fits strictly inside the image, at a uniform position; none when none fits."""
    k_apply, k_area, k_ratio, k_top, k_left = jax.random.split(key, 5)
    shape = (n, ERASE_ATTEMPTS)
    area = height * width * jax.random.uniform(k_area, shape, minval=ERASE_SCALE[0],
                                               maxval=ERASE_SCALE[1])  # fmt: skip
    log_ratio = (math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]))
    aspect = jnp.exp(jax.random.uniform(k_ratio, shape, minval=log_ratio[0], maxval=log_ratio[1]))
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (h < height) & (w < width)
    first = jnp.argmax(fits, axis=1)[:, None]
    h = jnp.take_along_axis(h, first, axis=1)[:, 0]
    w = jnp.take_along_axis(w, first, axis=1)[:, 0]
    applied = (jax.random.uniform(k_apply, (n,)) < p) & jnp.any(fits, axis=1)
    top = jax.random.randint(k_top, (n,), 0, height - h + 1)
    left = jax.random.randint(k_left, (n,), 0, width - w + 1)
    return Boxes(top, left, jnp.where(applied, h, 0), jnp.where(applied, w, 0))


def erase(images: jax.Array, boxes: Boxes, value: float = 0.0) -> jax.Array:
    """torchvision's `F.erase(image, i, j, h, w, value)` on each NHWC image with its box."""
    return jnp.where(_inside(boxes, *images.shape[1:3]), jnp.asarray(value, images.dtype), images)


def augment_batch(
    key: jax.Array, images: jax.Array, labels: jax.Array, mask: jax.Array, spec: BatchAugment
) -> Mixed:
    """Random erasing, then Mixup or CutMix (see the module docstring) on normalised NHWC
    images; without mixing, every row keeps its own label with weight 1."""
    k_erase, k_choice, k_mixup, k_cutmix, k_x, k_y = jax.random.split(key, 6)
    n, height, width = images.shape[:3]
    if spec.erase_prob > 0:
        images = erase(images, erase_boxes(k_erase, n, height, width, spec.erase_prob))
    if not spec.mixes:
        return Mixed(images, labels, labels, jnp.ones(n, jnp.float32))
    results = []
    if spec.mixup_alpha > 0:
        lam = jax.random.beta(k_mixup, spec.mixup_alpha, spec.mixup_alpha)
        results.append(mixup(images, labels, mask, lam))
    if spec.cutmix_alpha > 0:
        lam = jax.random.beta(k_cutmix, spec.cutmix_alpha, spec.cutmix_alpha)
        x, y = jax.random.randint(k_x, (), 0, width), jax.random.randint(k_y, (), 0, height)
        lam, box = cutmix_box(lam, x, y, height, width)
        results.append(cutmix(images, labels, mask, lam, box))
    if len(results) == 1:
        return results[0]
    use_cutmix = jax.random.uniform(k_choice) < spec.switch_prob
    return jax.tree.map(lambda c, m: jnp.where(use_cutmix, c, m), results[1], results[0])
