"""resnet_jax.data.train_transform: the default is the old crop + flip, pad_crop is torchvision's
RandomCrop(32, padding=4) + RandomHorizontalFlip given the same draws, the auto-augmentations
come after the flip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as tv
from torchvision.transforms import functional as tvf

from resnet_jax.data import augment as A
from resnet_jax.data.train_transform import TrainTransform, pad_crop_flip
from resnet_jax.data.transforms import random_resized_crop_flip, sample_crop
from resnet_jax.runtime.errors import UserError
from tests.helpers import photo_like


def test_default_is_random_resized_crop_flip_bit_for_bit():
    image = photo_like(97, 61, 0)
    for seed in range(20):
        got = TrainTransform()(image, 24, np.random.default_rng(seed))
        want = random_resized_crop_flip(image, 24, np.random.default_rng(seed))
        assert got.dtype == np.uint8 and got.shape == (24, 24, 3)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("interpolation", ["nearest", "bicubic"])
def test_the_crop_resizes_with_the_interpolation(interpolation):
    image = photo_like(97, 61, 1)
    transform = TrainTransform(interpolation=interpolation, flip_p=0.0)
    mode = tv.InterpolationMode(interpolation)
    for seed in range(5):
        box = sample_crop(61, 97, np.random.default_rng(seed))
        want = tvf.resized_crop(image, *box, [24, 24], mode)
        np.testing.assert_array_equal(transform(image, 24, np.random.default_rng(seed)), want)
    bilinear = TrainTransform(flip_p=0.0)(image, 24, np.random.default_rng(0))
    assert not np.array_equal(transform(image, 24, np.random.default_rng(0)), bilinear)


def torch_draws(monkeypatch: pytest.MonkeyPatch, offsets: list[int], flips: list[float]) -> None:
    """torch.randint hands out `offsets`, torch.rand `flips`, as torchvision's transforms ask."""
    monkeypatch.setattr(torch, "randint", lambda low, high, size: torch.tensor([offsets.pop(0)]))
    monkeypatch.setattr(torch, "rand", lambda size: torch.tensor([flips.pop(0)]))


@pytest.mark.parametrize("size", [(32, 32), (40, 35), (30, 24)])  # (width, height)
def test_pad_crop_flip_equals_torchvision_given_the_same_offsets(size, monkeypatch):
    image = photo_like(*size, seed=2)
    reference = tv.Compose([tv.RandomCrop(32, padding=4), tv.RandomHorizontalFlip()])
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(60):
        state = rng.bit_generator.state
        got = pad_crop_flip(image, 32, rng)
        replay = np.random.default_rng()
        replay.bit_generator.state = state
        i = int(replay.integers(0, size[1] + 8 - 32 + 1))
        j = int(replay.integers(0, size[0] + 8 - 32 + 1))
        flip = replay.random()
        seen.add((i, j, flip < 0.5))
        torch_draws(monkeypatch, [i, j], [flip])
        np.testing.assert_array_equal(got, np.asarray(reference(image)), err_msg=str((i, j)))
    possible = (size[1] + 8 - 31) * (size[0] + 8 - 31) * 2
    assert len(seen) >= min(possible, 30) and {f for *_, f in seen} == {True, False}


def test_pad_crop_reaches_every_offset_and_pads_with_zeros():
    image = Image.new("RGB", (32, 32), (200, 100, 50))
    rng = np.random.default_rng(0)
    crops = [pad_crop_flip(image, 32, rng, flip_p=0.0) for _ in range(2000)]
    # The zero border shows where the crop sits: rows/columns of black on the top/left side.
    tops = {int((c[:, 16, 0] == 0)[:4].sum()) - int((c[:, 16, 0] == 0)[-4:].sum()) for c in crops}
    assert tops == set(range(-4, 5))
    assert all(set(np.unique(c)) <= {0, 50, 100, 200} for c in crops)


def test_pad_crop_too_small_for_the_crop_is_a_user_error():
    image = photo_like(20, 30, 3)
    with pytest.raises(UserError, match="20x30 pixels, too small for a 32-pixel crop even after"):
        pad_crop_flip(image, 32, np.random.default_rng(0))
    assert pad_crop_flip(image, 28, np.random.default_rng(0)).shape == (28, 28, 3)


@pytest.mark.parametrize(
    "settings, augmentation",
    [
        ({"auto_augment": "ta_wide"}, A.TrivialAugmentWide(interpolation="bilinear")),
        (
            {
                "auto_augment": "randaugment",
                "num_ops": 3,
                "magnitude": 5,
                "interpolation": "nearest",
            },
            A.RandAugment(3, 5),
        ),
        (
            {"auto_augment": "autoaugment", "policy": "cifar10", "crop": "pad_crop"},
            A.AutoAugment("cifar10", interpolation="bilinear"),
        ),
    ],
)
def test_auto_augment_runs_after_the_crop_and_flip_on_the_same_generator(settings, augmentation):
    transform = TrainTransform(**settings)
    assert transform.augmentation() == augmentation
    image = photo_like(40, 36, 4)
    crop = TrainTransform(crop=transform.crop, interpolation=transform.interpolation)
    changed = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        want = np.asarray(augmentation(Image.fromarray(crop(image, 32, rng)), rng))
        got = transform(image, 32, np.random.default_rng(seed))
        np.testing.assert_array_equal(got, want)
        changed += not np.array_equal(got, crop(image, 32, np.random.default_rng(seed)))
    assert changed > 6


def test_bad_settings_are_user_errors():
    for settings, message in [
        ({"crop": "center"}, "Training crop 'center' is not one of random_resized, pad_crop"),
        ({"auto_augment": "ra"}, "auto_augment 'ra' is not one of none, ta_wide, randaugment"),
        ({"interpolation": "box"}, "interpolation 'box' is not one of nearest, bilinear, bicubic"),
        ({"flip_p": 1.5}, r"flip probability 1.5 is not in \[0, 1\]"),
        ({"padding": -1}, "padding must be >= 0 pixels, not -1"),
        ({"auto_augment": "randaugment", "magnitude": 40}, "magnitude 40 is not in"),
        ({"auto_augment": "autoaugment", "policy": "coco"}, "policy 'coco' is not one of"),
    ]:
        with pytest.raises(UserError, match=message):
            TrainTransform(**settings)
    TrainTransform(magnitude=40)  # RandAugment's settings matter only when it is chosen
