"""resnet_jax.data.transforms against torchvision 0.29's own PIL transforms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as tv
from torchvision.datasets.folder import pil_loader
from torchvision.transforms import functional as tvf

from resnet_jax.data import transforms as T
from resnet_jax.models import preprocess as P
from resnet_jax.runtime.errors import UserError

# (width, height): odd sizes, both orientations, extreme aspect ratios, images smaller than the crop.
SIZES = [
    (224, 224),
    (256, 256),
    (500, 375),
    (375, 500),
    (333, 517),
    (517, 333),
    (257, 255),
    (300, 224),
    (224, 300),
    (1001, 77),
    (77, 1001),
    (600, 20),
    (100, 50),
    (50, 100),
    (13, 7),
]


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "1":
        return Image.fromarray(rng.random((height, width)) < 0.5)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4}.get(mode, 1)
    data = rng.integers(0, 256, (height, width, channels), dtype=np.uint8).tobytes()
    return Image.frombytes(mode, (width, height), data)


def torchvision_eval(image_size: int, resize: int) -> tv.Compose:
    return tv.Compose(
        [
            tv.Resize(resize),
            tv.CenterCrop(image_size),
            tv.ToTensor(),
            tv.Normalize(P.IMAGENET_MEAN, P.IMAGENET_STD),
        ]
    )


def as_hwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).numpy()


def test_eval_size():
    assert T.eval_size(224) == 256
    assert T.eval_size(128) == 146
    assert T.eval_size(112) == 128


@pytest.mark.parametrize("image_size, resize", [(224, 256), (128, 146)])
def test_preprocess_matches_torchvision(image_size, resize):
    reference = torchvision_eval(image_size, resize)
    for k, (w, h) in enumerate(SIZES):
        image = random_image(w, h, seed=k)
        ours = T.preprocess(image, image_size)
        theirs = as_hwc(reference(image))
        assert ours.dtype == np.float32 and ours.shape == (image_size, image_size, 3)
        np.testing.assert_array_equal(ours, theirs, err_msg=str((w, h)))


@pytest.mark.parametrize("image_size, resize", [(224, 256), (128, 146)])
def test_eval_uint8_is_bit_identical(image_size, resize):
    reference = tv.Compose([tv.Resize(resize), tv.CenterCrop(image_size)])
    for k, (w, h) in enumerate(SIZES):
        image = random_image(w, h, seed=100 + k)
        ours = T.eval_transform_uint8(image, image_size)
        assert ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, np.asarray(reference(image)), err_msg=str((w, h)))


def test_resize_output_size_matches_torchvision():
    for h in [1, 2, 7, 77, 223, 224, 225, 375, 500, 1001, 4032]:
        for w in [1, 3, 50, 224, 333, 640, 3024]:
            expected = tvf._compute_resized_output_size((h, w), [256])
            assert list(T.resized_shorter_side(h, w, 256)) == expected, (h, w)


def test_center_crop_pads_like_torchvision():
    # Not reachable from preprocess (eval_size >= image_size), but CenterCrop's contract.
    for k, (w, h, size) in enumerate(
        [
            (100, 50, 224),
            (51, 300, 224),
            (9, 4, 6),
            (5, 5, 8),
            (10, 3, 5),
            (225, 224, 224),
            (227, 230, 224),
        ]
    ):
        image = random_image(w, h, seed=200 + k)
        expected = np.asarray(tvf.center_crop(image, [size]))
        np.testing.assert_array_equal(T.center_crop(np.asarray(image), size), expected)


def test_normalize_matches_to_tensor_and_normalize_exactly():
    pixels = np.stack([np.arange(256, dtype=np.uint8)] * 3, axis=-1).reshape(16, 16, 3)
    reference = tv.Compose([tv.ToTensor(), tv.Normalize(P.IMAGENET_MEAN, P.IMAGENET_STD)])
    theirs = as_hwc(reference(Image.fromarray(pixels)))
    ours = P.normalize(pixels)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)
    batch = np.stack([pixels, pixels[::-1]])  # NHWC
    np.testing.assert_array_equal(P.normalize(batch)[1], P.normalize(pixels[::-1]))


def test_normalize_on_jax_inside_jit():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    out = jax.jit(P.normalize)(jnp.asarray(pixels))
    assert isinstance(out, jax.Array) and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), P.normalize(pixels))
    values = jnp.arange(256, dtype=jnp.uint8)[:, None].repeat(3, axis=1)  # every uint8 value
    np.testing.assert_array_equal(
        np.asarray(jax.jit(P.normalize)(values)), P.normalize(np.asarray(values))
    )


def test_normalize_in_jit_after_switching_on_x64():
    """Traced once in float32 mode, then inside `jax.enable_x64` (as float64 tests do)."""
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    want = np.asarray(jax.jit(P.normalize)(pixels))
    with jax.enable_x64(True):
        np.testing.assert_array_equal(np.asarray(jax.jit(P.normalize)(pixels)), want)


def test_normalize_rejects_float_input():
    with pytest.raises(TypeError, match="uint8"):
        P.normalize(np.zeros((4, 4, 3), np.float32))


def test_resized_crop_matches_torchvision():
    image = random_image(317, 211, seed=3)
    rng = np.random.default_rng(0)
    boxes = [(0, 0, 211, 317), (5, 7, 32, 32), (0, 0, 1, 1), (100, 200, 111, 117)]
    boxes += [T.sample_crop(211, 317, rng) for _ in range(20)]
    for i, j, h, w in boxes:
        expected = tvf.resized_crop(image, i, j, h, w, [32, 32], tv.InterpolationMode.BILINEAR)
        np.testing.assert_array_equal(
            T.resized_crop(image, (i, j, h, w), 32), np.asarray(expected), err_msg=str((i, j, h, w))
        )


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_random_resized_crop_flip_uses_sampled_box(flip_p):
    image = random_image(120, 90, seed=4)
    box = T.sample_crop(90, 120, np.random.default_rng(7))
    crop = T.resized_crop(image, box, 48)
    out = T.random_resized_crop_flip(image, 48, np.random.default_rng(7), flip_p=flip_p)
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, crop[:, ::-1] if flip_p else crop)


def test_random_resized_crop_flip_is_deterministic_per_seed():
    image = random_image(96, 80, seed=5)
    a = T.random_resized_crop_flip(image, 32, np.random.default_rng(1))
    b = T.random_resized_crop_flip(image, 32, np.random.default_rng(1))
    c = T.random_resized_crop_flip(image, 32, np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_flip_happens_about_half_the_time():
    image = random_image(40, 40, seed=6)
    rng = np.random.default_rng(0)
    # scale=(1, 1) and ratio=(1, 1) make the crop the whole image, leaving only the flip random.
    outs = [
        T.random_resized_crop_flip(image, 40, rng, scale=(1, 1), ratio=(1, 1)) for _ in range(200)
    ]
    flipped = sum(np.array_equal(o, np.asarray(image)[:, ::-1]) for o in outs)
    assert sum(np.array_equal(o, np.asarray(image)) for o in outs) + flipped == 200
    assert 70 < flipped < 130


def test_sample_crop_statistics_match_torchvision():
    height, width, n = 200, 300, 3000
    rng = np.random.default_rng(0)
    ours = np.array([T.sample_crop(height, width, rng) for _ in range(n)])
    i, j, h, w = ours.T
    assert (i >= 0).all() and (j >= 0).all() and (h > 0).all() and (w > 0).all()
    assert (i + h <= height).all() and (j + w <= width).all()
    area = h * w / (height * width)
    assert area.min() >= 0.07 and area.max() <= 1.0
    assert (w / h).min() >= 0.74 and (w / h).max() <= 1.35
    assert len({tuple(b) for b in ours}) > n // 2  # varied, not stuck on the fallback

    torch.manual_seed(0)
    tensor = torch.empty(3, height, width)
    params = tv.RandomResizedCrop.get_params(tensor, [0.08, 1.0], [3 / 4, 4 / 3])
    theirs = np.array(
        [params]
        + [
            tv.RandomResizedCrop.get_params(tensor, [0.08, 1.0], [3 / 4, 4 / 3])
            for _ in range(n - 1)
        ]
    )
    for column in range(4):  # same distribution: means agree within a few standard errors
        a, b = ours[:, column].astype(float), theirs[:, column].astype(float)
        assert abs(a.mean() - b.mean()) < 4 * np.sqrt((a.var() + b.var()) / n), column


@pytest.mark.parametrize(
    "height, width, scale, expected",
    [
        (10, 1000, (0.08, 1.0), (0, 493, 10, 13)),  # too wide: height kept, width = 4/3 * height
        (1000, 10, (0.08, 1.0), (493, 0, 13, 10)),  # too tall: width kept, height = 4/3 * width
        (11, 1000, (0.08, 1.0), (0, 492, 11, 15)),  # 14.67 rounds to 15, not down to 14
        (1000, 11, (0.08, 1.0), (492, 0, 15, 11)),
        (50, 60, (2.0, 3.0), (0, 0, 50, 60)),  # impossible scale, ratio in range: whole image
    ],
)
def test_sample_crop_fallback_matches_torchvision(height, width, scale, expected):
    rng = np.random.default_rng(0)
    tensor = torch.empty(1, height, width)
    for _ in range(5):
        theirs = tv.RandomResizedCrop.get_params(tensor, list(scale), [3 / 4, 4 / 3])
        assert T.sample_crop(height, width, rng, scale) == tuple(theirs) == expected


def write_mode_images(folder):
    """One file per awkward mode, the way users meet them."""
    rng = np.random.default_rng(0)
    paths = {}
    random_image(20, 15, 1, "L").save(paths.setdefault("L", folder / "gray.png"))
    random_image(20, 15, 2, "RGBA").save(paths.setdefault("RGBA", folder / "rgba.png"))
    random_image(20, 15, 3, "CMYK").save(paths.setdefault("CMYK", folder / "cmyk.jpg"))
    random_image(20, 15, 4, "1").save(paths.setdefault("1", folder / "bits.png"))
    palette = random_image(20, 15, 5, "P")
    palette.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    palette.save(paths.setdefault("P", folder / "palette.png"), transparency=7)
    gray16 = Image.fromarray(rng.integers(0, 65536, (15, 20), dtype=np.uint16))
    gray16.save(paths.setdefault("I;16", folder / "gray16.png"))
    gray32 = Image.fromarray(rng.integers(-300, 300, (15, 20), dtype=np.int32))
    gray32.save(paths.setdefault("I", folder / "gray32.tif"))
    return paths


def test_load_rgb_matches_torchvision_pil_loader(tmp_path):
    for mode, path in write_mode_images(tmp_path).items():
        with Image.open(path) as raw:
            assert raw.mode == mode and (mode != "P" or "transparency" in raw.info)
        ours = T.load_rgb(path)
        assert ours.mode == "RGB" and ours.size == (20, 15)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(pil_loader(path)), err_msg=mode)


def test_load_rgb_clips_16_bit_like_torchvision(tmp_path):
    path = tmp_path / "levels.png"
    Image.fromarray(np.array([[0, 100, 255, 256, 65535]], dtype=np.uint16)).save(path)
    np.testing.assert_array_equal(np.asarray(T.load_rgb(path))[0, :, 0], [0, 100, 255, 255, 255])


def test_load_rgb_rejects_bad_files(tmp_path):
    good = tmp_path / "good.jpg"
    random_image(64, 64).save(good, quality=90)
    data = good.read_bytes()
    files = {
        "truncated.jpg": data[: len(data) // 2],
        "empty.jpg": b"",
        "notes.jpg": b"these are my holiday notes\n",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    for name in [*files, "missing.jpg"]:
        with pytest.raises(T.BadImage) as info:
            T.load_rgb(tmp_path / name)
        message = str(info.value)
        assert isinstance(info.value, UserError) and str(info.value.path) == str(tmp_path / name)
        assert name in message and "\n" not in message
    assert T.load_rgb(good).size == (64, 64)


def test_eval_transform_converts_non_rgb_input():
    gray = random_image(64, 48, seed=8, mode="L")
    expected = T.eval_transform_uint8(gray.convert("RGB"), 32)
    np.testing.assert_array_equal(T.eval_transform_uint8(gray, 32), expected)


def save_png(path, width, height):
    Image.new("RGB", (width, height)).save(path)
    return path


def test_elongated_images_are_bad_images_before_decoding(tmp_path):
    # A 1 x 100000 PNG is a few hundred bytes; resized for eval it would be 256 x 25,600,000.
    path = tmp_path / "line.png"
    Image.new("L", (100_000, 1)).save(path)
    assert path.stat().st_size < 2000
    with pytest.raises(T.BadImage, match="100000x1 pixels, more elongated than 1:50") as info:
        T.load_rgb(path)
    assert info.value.path == path and "line.png" in str(info.value)
    assert T.load_rgb(save_png(tmp_path / "ok.png", 500, 10)).size == (500, 10)  # 1:50 is fine


def test_eval_resize_beyond_the_pixel_budget_is_a_bad_image(tmp_path):
    with pytest.raises(T.BadImage, match="more elongated than 1:50"):
        T.eval_transform_uint8(Image.new("RGB", (1, 100)), 224)
    # Square, but an image size whose resize would hold 8000 x 8000 pixels.
    with pytest.raises(T.BadImage, match="8000x8000 would exceed 50,000,000 pixels") as info:
        T.eval_transform_uint8(T.load_rgb(save_png(tmp_path / "small.png", 8, 8)), 7000)
    assert "small.png" in str(info.value)  # load_rgb's image remembers its file
    assert T.eval_transform_uint8(Image.new("RGB", (8, 8)), 224).shape == (224, 224, 3)


def write_photo(path, width: int = 640, height: int = 480, seed: int = 0):
    """A JPEG of smooth colour fields with a little grain, as photos have."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (15, 20, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    grain = rng.normal(0, 3, (height, width, 1))
    Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


# (box (i, j, h, w) in the 640x480 photo, the reduction for a 32-px crop: the largest of 8, 4, 2
# that leaves the box's shorter side at least 32 px). Boxes off the reduced pixel grid, where
# cropping at whole reduced pixels instead would differ from torchvision's crop by 2-8 levels on
# average, 4x as much as the fractional box.
REDUCED_BOXES = [
    ((0, 0, 480, 640), 8),
    ((37, 51, 300, 256), 8),
    ((37, 51, 300, 255), 4),
    ((101, 13, 200, 150), 4),
    ((5, 301, 70, 90), 2),
]


@pytest.mark.parametrize("box, factor", REDUCED_BOXES)
def test_reduced_decode_maps_the_box_into_the_smaller_image(tmp_path, box, factor):
    path = write_photo(tmp_path / "photo.jpg")
    image = T.open_image(path)
    got = T.reduced_resized_crop(image, box, 32)
    assert image.size == (-(-640 // factor), -(-480 // factor))  # decoded at 1/factor
    want = np.asarray(
        tvf.resized_crop(pil_loader(path), *box, [32, 32], tv.InterpolationMode.BILINEAR)
    )
    assert got.shape == want.shape == (32, 32, 3) and got.dtype == np.uint8
    difference = np.abs(got.astype(int) - want)
    # Another decode and another filter: not bit-identical, but close.
    assert 0 < difference.mean() < 1.6, difference.mean()
    assert difference.max() <= 16, difference.max()


def test_reduced_decode_falls_back_to_the_exact_crop(tmp_path):
    """Small boxes, decoded images and non-JPEG files: torchvision's crop, bit for bit."""
    path = write_photo(tmp_path / "photo.jpg")
    png = tmp_path / "photo.png"
    Image.open(path).save(png)
    full = pil_loader(path)
    cases = [
        (T.open_image(path), (10, 10, 63, 200)),  # shorter side under 2 x 32
        (T.load_rgb(path), (0, 0, 480, 640)),  # already decoded
        (T.open_image(png), (0, 0, 480, 640)),  # not a JPEG
    ]
    for image, box in cases:
        want = tvf.resized_crop(full, *box, [32, 32], tv.InterpolationMode.BILINEAR)
        np.testing.assert_array_equal(T.reduced_resized_crop(image, box, 32), np.asarray(want))


def test_random_resized_crop_flip_with_reduced_decode_is_close_to_the_full_decode(tmp_path):
    path = write_photo(tmp_path / "photo.jpg", seed=1)
    for seed in range(20):
        full = T.random_resized_crop_flip(T.load_rgb(path), 32, np.random.default_rng(seed))
        reduced = T.random_resized_crop_flip(
            T.open_image(path), 32, np.random.default_rng(seed), reduced_decode=True
        )
        assert np.abs(reduced.astype(int) - full).mean() < 2  # the same box, the same flip


def test_a_truncated_jpeg_fails_when_decoded_at_reduced_size(tmp_path):
    path = write_photo(tmp_path / "photo.jpg")
    path.write_bytes(path.read_bytes()[:3000])
    image = T.open_image(path)  # the header is fine
    with pytest.raises(T.BadImage, match="photo.jpg is not a readable image"):
        T.reduced_resized_crop(image, (0, 0, 480, 640), 32)
