"""resnet_jax.data.augment against torchvision 0.29's autoaugment on PIL images.

The random halves differ (numpy against torch), so the tests hand both sides the same draws: our
`sample` gets them from a scripted Generator, torchvision's `forward` from patched torch.randint
and torch.rand. The images must then be equal, and both sides must have asked for draws from the
same ranges (so that real draws follow the same distribution).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import autoaugment as tva
from torchvision.transforms import functional as tvf

from resnet_jax.data import augment as A
from resnet_jax.runtime.errors import UserError
from tests.helpers import photo_like

MODES = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


def texture(kind: str, width: int, height: int) -> Image.Image:
    """Regular patterns with sharp and soft edges: stripes, rings, bricks, a dim flat photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    if kind == "stripes":
        phase = (x * math.cos(0.5) + y * math.sin(0.5)) / 3.0
        pixels = np.stack([np.sin(phase), np.sin(1.7 * phase), np.cos(0.6 * phase)], -1)
        pixels = 127.5 + 127.5 * pixels
    elif kind == "rings":
        radius = np.hypot(x - width / 3, y - height / 2)
        pixels = np.stack([radius * 9 % 256, 255 - radius * 5 % 256, radius * 2 % 256], -1)
    elif kind == "bricks":
        row = (y // 8).astype(int)
        mortar = (y % 8 < 1) | ((x + 6 * (row % 2)) % 12 < 1)
        shade = 140 + 40 * np.sin(row * 1.3 + (x + 6 * (row % 2)) // 12)
        pixels = np.where(mortar[..., None], 215, np.stack([shade, shade * 0.45, shade * 0.3], -1))
    else:  # a dim, low-contrast, nearly grey photo: AutoContrast and Equalize have work to do
        return Image.fromarray(
            (np.asarray(photo_like(width, height, 7)) // 5 + 90).astype(np.uint8)
        )
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


IMAGES = {
    "photo 40x30": photo_like(40, 30, 0),
    "photo 33x57": photo_like(33, 57, 1),
    "stripes 48x48": texture("stripes", 48, 48),
    "rings 37x29": texture("rings", 37, 29),
    "bricks 64x40": texture("bricks", 64, 40),
    "dim 30x30": texture("dim", 30, 30),
    "flat grey 16x16": Image.new("RGB", (16, 16), (128, 128, 128)),
}


class Script:
    """Fixed draws for both sides: numpy Generator methods for ours, torch.randint/rand for
    torchvision's; each side's requested ranges are recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ours: list = []
        self.theirs: list = []
        self.asked_ours: list = []
        self.asked_theirs: list = []
        monkeypatch.setattr(torch, "randint", self._randint)
        monkeypatch.setattr(torch, "rand", self._rand)

    def load(self, *draws) -> Script:
        self.ours, self.theirs = list(draws), list(draws)
        return self

    def integers(self, high: int, size: int | None = None):
        self.asked_ours.append(("integers", high, size))
        return np.asarray(self.ours.pop(0)) if size else self.ours.pop(0)

    def random(self, size: int):
        self.asked_ours.append(("random", size))
        return np.asarray(self.ours.pop(0), np.float64)

    def _randint(self, high: int, size: tuple, dtype=None) -> torch.Tensor:
        self.asked_theirs.append(("integers", high, size[0] if size != (1,) else None))
        return torch.tensor(self.theirs.pop(0)).reshape(size)

    def _rand(self, size: tuple) -> torch.Tensor:
        self.asked_theirs.append(("random", size[0]))
        return torch.tensor(self.theirs.pop(0), dtype=torch.float32)

    def assert_consumed_alike(self) -> None:
        assert self.ours == [] and self.theirs == []
        assert self.asked_ours == self.asked_theirs


def assert_pixels_equal(ours: Image.Image, theirs: Image.Image, what) -> None:
    assert ours.mode == theirs.mode == "RGB" and ours.size == theirs.size
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs), err_msg=str(what))


def test_linspace32_is_torch_linspace_bit_for_bit():
    ranges = [
        (0.0, 0.3),
        (0.0, 0.99),
        (0.0, 135.0),
        (255.0, 0.0),
        (0.0, 150 / 331 * 37),
        (3.7, -12.1),
    ]
    for (start, end), steps in itertools.product(ranges, range(2, 130)):
        want = torch.linspace(start, end, steps).numpy()
        got = A.linspace32(start, end, steps)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want, err_msg=str((start, end, steps)))


@pytest.mark.parametrize("bins", [2, 3, 10, 11, 17, 31, 32, 45])
def test_magnitude_tables_and_signs_are_torchvisions(bins):
    for height, width in [(224, 224), (32, 32), (176, 201)]:
        spaces = [
            (tva.TrivialAugmentWide()._augmentation_space(bins), True),
            (tva.RandAugment()._augmentation_space(bins, (height, width)), False),
            (tva.AutoAugment()._augmentation_space(bins, (height, width)), False),
        ]
        for space, wide in spaces:
            for op, (table, signed) in space.items():
                ours = A.magnitudes(op, bins, height, width, wide)
                assert (op in A.SIGNED_OPS) == signed, op
                if table.ndim == 0:
                    assert ours is None, op
                else:
                    assert ours.dtype == table.numpy().dtype, op
                    np.testing.assert_array_equal(ours, table.numpy(), err_msg=op)
    assert list(tva.TrivialAugmentWide()._augmentation_space(bins)) == list(A.OPS)
    assert list(tva.RandAugment()._augmentation_space(bins, (8, 8))) == list(A.OPS)


def test_autoaugment_policies_are_torchvisions():
    for name, policy in A.AUTOAUGMENT_POLICIES.items():
        theirs = tva.AutoAugment()._get_policies(tva.AutoAugmentPolicy(name))
        assert [tuple(sub) for sub in theirs] == list(policy), name


def test_inverse_affine_matrix_is_torchvisions():
    rng = np.random.default_rng(0)
    for _ in range(300):
        center = [0, 0] if rng.random() < 0.3 else list(rng.integers(1, 300, 2) * 0.5)
        translate = [int(t) for t in rng.integers(-40, 40, 2)]
        shear = [float(s) for s in rng.uniform(-45, 45, 2) * (rng.random(2) < 0.7)]
        want = tvf._get_inverse_affine_matrix(center, 0.0, translate, 1.0, shear)
        assert A.inverse_affine_matrix(center, translate, shear) == want


@pytest.mark.parametrize("name", list(IMAGES))
def test_trivial_augment_wide_equals_torchvision_for_every_choice(name, monkeypatch):
    """All 14 ops x 31 bins x both signs, one interpolation per image."""
    image = IMAGES[name]
    interpolation = list(MODES)[list(IMAGES).index(name) % len(MODES)]
    ours = A.TrivialAugmentWide(interpolation=interpolation)
    theirs = tva.TrivialAugmentWide(interpolation=MODES[interpolation])
    script = Script(monkeypatch)
    for op_id, op in enumerate(A.OPS):
        bins = range(31) if A.magnitudes(op, 31, 8, 8, True) is not None else [None]
        signs = [0, 1] if op in A.SIGNED_OPS else [None]
        for bin_, sign in itertools.product(bins, signs):
            draws = [d for d in (op_id, bin_, sign) if d is not None]
            got = ours(image, script.load(*draws))
            assert_pixels_equal(got, theirs(image), (op, bin_, sign))
    script.assert_consumed_alike()


@pytest.mark.parametrize("magnitude, bins", [(0, 31), (9, 31), (30, 31), (5, 10)])
def test_rand_augment_equals_torchvision_for_op_pairs(magnitude, bins, monkeypatch):
    image = IMAGES["photo 33x57"]
    ours = A.RandAugment(2, magnitude, bins, interpolation="bilinear")
    theirs = tva.RandAugment(2, magnitude, bins, interpolation=InterpolationMode.BILINEAR)
    script = Script(monkeypatch)
    n = len(A.OPS)
    for first, shift, signs in itertools.product(range(n), (1, 5), [(0, 1), (1, 0)]):
        second = (first + shift) % n
        draws = []
        for op_id, sign in [(first, signs[0]), (second, signs[1])]:
            draws += [op_id, sign] if A.OPS[op_id] in A.SIGNED_OPS else [op_id]
        got = ours(image, script.load(*draws))
        assert_pixels_equal(got, theirs(image), (A.OPS[first], A.OPS[second], signs))
    script.assert_consumed_alike()


@pytest.mark.parametrize("policy", list(A.AUTOAUGMENT_POLICIES))
def test_auto_augment_equals_torchvision_for_every_sub_policy(policy, monkeypatch):
    image = IMAGES["bricks 64x40"]
    fill = (10, 200, 30)  # also the fill of the area rotated or sheared in
    ours = A.AutoAugment(policy, fill=fill)
    theirs = tva.AutoAugment(tva.AutoAugmentPolicy(policy), fill=list(fill))
    script = Script(monkeypatch)
    # Both ops applied, either one, or (p < 1) neither; the signs both ways round.
    probs = [(0.0, 0.0), (0.0, 0.75), (0.75, 0.0), (0.25, 1.0)]
    for sub_policy, prob, signs in itertools.product(range(25), probs, [(0, 1), (1, 0)]):
        got = ours(image, script.load(sub_policy, prob, signs))
        assert_pixels_equal(got, theirs(image), (sub_policy, prob, signs))
    script.assert_consumed_alike()


@pytest.mark.parametrize("interpolation", list(MODES))
def test_every_op_with_fill_equals_torchvisions_apply_op(interpolation):
    """`apply_op` alone, a non-black fill, the standard tables at a few bins, every image size."""
    fill = (250, 0, 99)
    for name, image in IMAGES.items():
        for op in (*A.OPS, "Invert"):
            table = A.magnitudes(op, 31, image.height, image.width, wide=False)
            values = [0.0] if table is None else [float(table[b]) for b in (1, 12, 30)]
            for magnitude in values:
                for signed in {magnitude, -magnitude} if op in A.SIGNED_OPS else {magnitude}:
                    got = A.apply_ops(image, [(op, signed)], interpolation, fill)
                    want = tva._apply_op(image, op, signed, MODES[interpolation], list(fill))
                    assert_pixels_equal(got, want, (name, op, signed))


def test_grayscale_images_work_as_in_torchvision():
    image = IMAGES["photo 33x57"].convert("L")
    for op, magnitude in [("Rotate", 12.0), ("ShearY", -0.2), ("TranslateX", 7.0), ("Color", 0.5)]:
        for fill in (0, 77):
            got = A.apply_ops(image, [(op, magnitude)], "bilinear", fill)
            want = tva._apply_op(image, op, magnitude, InterpolationMode.BILINEAR, [fill])
            assert got.mode == "L"
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=op)


def test_changing_one_op_changes_the_image():
    """The equality tests above can fail: each op with a non-zero magnitude alters a photo."""
    image = IMAGES["dim 30x30"]
    for op in (*A.OPS[1:], "Invert"):
        table = A.magnitudes(op, 31, image.height, image.width, wide=True)
        magnitude = 0.0 if table is None else float(table[20])
        assert not np.array_equal(A.apply_op(image, op, magnitude), image), op


def test_sampling_covers_every_choice_with_a_numpy_generator():
    rng = np.random.default_rng(0)
    ta = [A.TrivialAugmentWide().sample(rng, 32, 32)[0] for _ in range(4000)]
    counts = {op: sum(o == op for o, _ in ta) for op in A.OPS}
    assert min(counts.values()) > 200 and max(counts.values()) < 380  # 4000 / 14 = 286 each
    rotations = {m for o, m in ta if o == "Rotate"}
    table = {float(m) for m in A.magnitudes("Rotate", 31, 32, 32, wide=True)}
    assert rotations <= table | {-m for m in table} and len(rotations) > 50
    assert max(rotations) == 135.0 and min(rotations) == -135.0
    ra = [A.RandAugment().sample(rng, 32, 32) for _ in range(500)]
    assert all(len(ops) == 2 for ops in ra)
    assert {abs(m) for ops in ra for o, m in ops if o == "Rotate"} == {9 * 1.0}  # bin 9 of 0..30
    aa = [A.AutoAugment().sample(rng, 32, 32) for _ in range(2000)]
    assert {len(ops) for ops in aa} == {0, 1, 2}
    equalize_share = np.mean([any(o == "Equalize" for o, _ in ops) for ops in aa])
    assert 0.35 < equalize_share < 0.55  # 0.45 by the ImageNet policy's probabilities


def test_same_generator_state_gives_the_same_image():
    image = IMAGES["photo 33x57"]
    for augmentation in (A.TrivialAugmentWide(), A.RandAugment(), A.AutoAugment()):
        outs = [augmentation(image, np.random.default_rng(s)) for s in (5, 5, 6, 7, 8)]
        arrays = [np.asarray(o) for o in outs]
        np.testing.assert_array_equal(arrays[0], arrays[1])
        assert any(not np.array_equal(arrays[0], a) for a in arrays[2:])


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="Interpolation 'lanczos' is not one of nearest, bilinear"):
        A.TrivialAugmentWide(interpolation="lanczos")
    with pytest.raises(UserError, match=r"magnitude 31 is not in \[0, 30\]"):
        A.RandAugment(magnitude=31)
    with pytest.raises(UserError, match="at least 2, not 1"):
        A.TrivialAugmentWide(1)
    with pytest.raises(UserError, match="policy 'mnist' is not one of imagenet, cifar10, svhn"):
        A.AutoAugment("mnist")
    with pytest.raises(ValueError, match="unknown augmentation op 'Blur'"):
        A.apply_op(IMAGES["photo 40x30"], "Blur", 1.0)
