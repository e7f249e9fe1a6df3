"""resnet_jax.training.batch_augment against torchvision.transforms.v2's MixUp, CutMix and
RandomErasing given the same random draws."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from resnet_jax.training import batch_augment as ba
from tests.helpers import nchw

CLASSES = 5


def normalised_batch(n: int = 4, height: int = 12, width: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, height, width, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, n).astype(np.int32)
    return images, labels, np.ones(n, bool)


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.numpy().transpose(0, 2, 3, 1)


def fix_lambda(monkeypatch, transform, lam: float) -> None:
    monkeypatch.setattr(transform._dist, "sample", lambda shape=(): torch.tensor([lam]))


@pytest.mark.parametrize("lam", [0.0, 0.27, 0.93])
def test_mixup_equals_torchvision(monkeypatch, lam):
    images, labels, mask = normalised_batch()
    mixup = v2.MixUp(alpha=0.2, num_classes=CLASSES)
    fix_lambda(monkeypatch, mixup, lam)
    want_images, want_targets = mixup(nchw(images), torch.tensor(labels, dtype=torch.int64))
    got = ba.mixup(jnp.asarray(images), labels, mask, jnp.float32(lam))
    np.testing.assert_allclose(got.images, nhwc(want_images), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ba.mixed_targets(got, CLASSES), want_targets, atol=1e-7)


@pytest.mark.parametrize(
    "lam, center", [(0.31, (3, 7)), (0.05, (0, 11)), (0.8, (9, 0)), (0.999, (5, 5))]
)
def test_cutmix_equals_torchvision(monkeypatch, lam, center):
    """The box and the corrected lambda of `CutMix.make_params` from the same lambda and box
    centre (torch.randint patched to return it), and the pasted images and mixed labels."""
    images, labels, mask = normalised_batch(height=12, width=10)
    cut = v2.CutMix(alpha=1.0, num_classes=CLASSES)
    fix_lambda(monkeypatch, cut, lam)
    draws = iter([torch.tensor([center[0]]), torch.tensor([center[1]])])  # r_x, then r_y
    monkeypatch.setattr(torch, "randint", lambda *args, **kwargs: next(draws))
    want_images, want_targets = cut(nchw(images), torch.tensor(labels, dtype=torch.int64))
    lam_adjusted, box = ba.cutmix_box(jnp.float32(lam), center[0], center[1], 12, 10)
    got = ba.cutmix(jnp.asarray(images), labels, mask, lam_adjusted, box)
    np.testing.assert_array_equal(got.images, nhwc(want_images))
    np.testing.assert_allclose(ba.mixed_targets(got, CLASSES), want_targets, atol=1e-7)


def test_random_erasing_equals_torchvisions_erase():
    images, _, _ = normalised_batch(n=3, height=9, width=11)
    boxes = ba.Boxes(*map(jnp.array, ([1, 0, 4], [2, 0, 0], [5, 0, 3], [4, 0, 11])))
    got = ba.erase(jnp.asarray(images), boxes)
    for k in range(3):
        i, j, h, w = (int(b[k]) for b in boxes)
        want = F.erase(nchw(images[k : k + 1])[0], i, j, h, w, torch.tensor([0.0]))
        np.testing.assert_array_equal(got[k], want.numpy().transpose(1, 2, 0))
    np.testing.assert_array_equal(got[1], images[1])  # height 0: nothing erased


def torchvision_erase_box(uniforms, height, width):
    """`RandomErasing.make_params`'s loop, its draws read from `uniforms` ((area, log-ratio)
    pairs in [0, 1)) instead of torch's generator: the first fitting (h, w), or None."""
    log_ratio = (math.log(0.3), math.log(3.3))
    for u_area, u_ratio in uniforms:
        erase_area = height * width * (0.02 + (0.33 - 0.02) * u_area)
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
        h = round(math.sqrt(erase_area * aspect_ratio))
        w = round(math.sqrt(erase_area / aspect_ratio))
        if h < height and w < width:
            return h, w
    return None


@jax.jit
def erase_draws(key: jax.Array) -> tuple[jax.Array, ...]:
    """The uniform draws behind `erase_boxes(key, 400, ...)`, split from the key as it does."""
    k_apply, k_area, k_ratio, _, _ = jax.random.split(key, 5)
    return (jax.random.uniform(k_apply, (400,)), jax.random.uniform(k_area, (400, 10)),
            jax.random.uniform(k_ratio, (400, 10)))  # fmt: skip


@pytest.mark.parametrize("height, width", [(7, 30)])
def test_erase_boxes_follow_random_erasings_sampling(height, width):
    """Our boxes are the first fitting attempt of the same draws, at a position inside the
    image; p is the share erased."""
    n, key = 400, jax.random.key(3)
    boxes = jax.device_get(
        jax.jit(ba.erase_boxes, static_argnums=range(1, 5))(key, n, height, width, 0.7)
    )
    u_apply, u_area, u_ratio = map(np.asarray, erase_draws(key))
    coin = u_apply < 0.7
    for k in range(n):
        want = torchvision_erase_box(zip(u_area[k], u_ratio[k], strict=True), height, width)
        got = (int(boxes.height[k]), int(boxes.width[k]))
        assert got == (want if coin[k] and want else (0, 0)), k
        assert 0 <= boxes.top[k] <= height - got[0] and 0 <= boxes.left[k] <= width - got[1]
    assert abs(np.mean(boxes.height > 0) - 0.7) < 0.1
    assert len(set(zip(boxes.top, boxes.left, strict=True))) > n // 4  # positions vary


def test_erase_box_statistics_match_torchvisions_sampler():
    """The erased share of a 16x16 image, ours against torchvision's own sampler."""
    torch.manual_seed(0)
    eraser = v2.RandomErasing(p=1.0)
    image = torch.zeros(3, 16, 16)
    theirs = []
    for _ in range(1500):
        params = eraser.make_params([image])
        theirs.append(params["h"] * params["w"] / 256 if params["v"] is not None else 0.0)
    boxes = jax.jit(ba.erase_boxes, static_argnums=range(1, 5))(
        jax.random.key(0), 1500, 16, 16, 1.0
    )
    ours = np.asarray(boxes.height * boxes.width) / 256
    assert abs(ours.mean() - np.mean(theirs)) < 0.05 * np.mean(theirs)
    assert abs(np.mean(ours == 0) - np.mean(np.array(theirs) == 0)) < 0.02


def test_a_row_whose_partner_is_padding_stays_unmixed():
    images, labels, mask = normalised_batch(n=4)
    mask[1] = False  # row 2's partner
    mixed = ba.mixup(jnp.asarray(images), labels, mask, jnp.float32(0.3))
    np.testing.assert_array_equal(mixed.images[2], images[2])
    assert mixed.weight.tolist() == pytest.approx([0.3, 0.3, 1.0, 0.3])
    lam, box = ba.cutmix_box(jnp.float32(0.3), 5, 6, 12, 10)
    cut = ba.cutmix(jnp.asarray(images), labels, mask, lam, box)
    np.testing.assert_array_equal(cut.images[2], images[2])
    assert not np.array_equal(cut.images[3], images[3])


def test_augment_batch_chooses_one_mix_per_batch_by_the_switch_probability():
    images, labels, mask = normalised_batch(n=4, height=16, width=16)
    spec = ba.BatchAugment(mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.25)
    run = jax.jit(ba.augment_batch, static_argnums=4)  # one compilation (vmap's takes longer)
    rolled, kinds = np.roll(images, 1, axis=0), []
    for seed in range(200):
        out = jax.device_get(run(jax.random.key(seed), images, labels, mask, spec))
        out_images, weight = out.images, out.weight
        same = out_images == images
        if same.all():
            continue  # an empty CutMix box or a Mixup lambda of 1: either
        # CutMix takes each pixel from one of the two images; Mixup blends them.
        is_cutmix = bool((same | (out_images == rolled)).all())
        kinds.append(is_cutmix)
        if is_cutmix:
            assert weight[0] == pytest.approx(same[0, ..., 0].mean(), abs=1e-6)
    assert 0.15 < np.mean(kinds) < 0.35 and len(kinds) > 150
    plain = ba.augment_batch(jax.random.key(0), jnp.asarray(images), labels, mask,
                             ba.BatchAugment())  # fmt: skip
    np.testing.assert_array_equal(plain.images, images)
    assert plain.weight.tolist() == [1.0] * 4
