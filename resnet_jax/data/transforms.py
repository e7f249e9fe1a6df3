"""Image loading and the torchvision ImageNet transforms, written with Pillow and NumPy.

Each function reproduces the torchvision 0.29 algorithm it is named after, step for step, so the
eval pipeline gives bit-identical uint8 pixels and float32 inputs equal to torchvision's. The one
deliberate exception is `reduced_resized_crop`, a training crop decoded from a JPEG at reduced
size, which training uses unless told to decode in full.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from resnet_jax.models.preprocess import normalize
from resnet_jax.models.registry import IMAGENET_EVAL, EvalTransform
from resnet_jax.runtime.errors import UserError

__all__ = [
    "BadImage",
    "center_crop",
    "decode_rgb",
    "eval_size",
    "eval_transform_uint8",
    "load_rgb",
    "open_image",
    "preprocess",
    "random_resized_crop_flip",
    "reduced_resized_crop",
    "resized_crop",
    "resized_shorter_side",
    "sample_crop",
]

# Resizing the shorter side of a 1x100000 image to 256 would allocate gigabytes; refuse such
# images as bad ones, so loaders and predict report and skip them like a truncated file.
MAX_ASPECT_RATIO = 50
MAX_RESIZED_PIXELS = 50_000_000


class BadImage(UserError):
    """An image file that Pillow cannot open or fully decode."""

    def __init__(self, path: str | os.PathLike, reason: str = "") -> None:
        self.path, self.reason = path, reason
        detail = f" ({reason})" if reason else ""
        super().__init__(
            f"{os.fspath(path)} is not a readable image{detail}; delete or replace that file."
        )

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.reason)  # worker processes send it back pickled


def _check_proportions(width: int, height: int, name: str | os.PathLike) -> None:
    """Refuse an image so thin that resizing its shorter side would make a huge output."""
    if min(width, height) == 0 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise BadImage(name, f"{width}x{height} pixels, more elongated than 1:{MAX_ASPECT_RATIO}")


def _bad_image(path: str | os.PathLike, error: Exception) -> BadImage:
    if isinstance(error, UnidentifiedImageError):
        return BadImage(path, "not a format Pillow recognises")
    # Missing files and "image file is truncated" are OSErrors; modes Pillow cannot convert to
    # RGB raise ValueError; some broken headers raise SyntaxError.
    return BadImage(path, getattr(error, "strerror", None) or str(error) or type(error).__name__)


_PILLOW_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def open_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file and its header without decoding the pixels yet, so that a JPEG can
    still be decoded at reduced size (`reduced_resized_crop`); `decode_rgb` finishes the job.

    Images more elongated than 1:MAX_ASPECT_RATIO are refused here, before they are decoded.
    """
    try:
        with open(path, "rb") as f:
            # From memory: the image then holds no open file, whenever it is decoded.
            image = Image.open(io.BytesIO(f.read()))
    except _PILLOW_ERRORS as e:
        raise _bad_image(path, e) from e
    _check_proportions(image.width, image.height, path)
    image.filename = os.fspath(path)  # kept for messages about this image later
    return image


def decode_rgb(image: Image.Image) -> Image.Image:
    """Decode an image from `open_image` (all of it, so a truncated file fails here) and convert
    it to RGB exactly as torchvision's `pil_loader` does; an RGB image is not copied."""
    name = getattr(image, "filename", "") or "an in-memory image"
    try:
        image.load()
        if image.mode == "RGB":  # convert("RGB") would only copy it
            return image
        rgb = image.convert("RGB")
    except _PILLOW_ERRORS as e:
        raise _bad_image(name, e) from e
    rgb.filename = name
    return rgb


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image and convert it to RGB exactly as torchvision's `pil_loader` does.

    Like torchvision: no EXIF rotation, transparency dropped, 16-bit values clipped to 255.
    Images more elongated than 1:MAX_ASPECT_RATIO are refused before they are decoded.
    """
    return decode_rgb(open_image(path))


def eval_size(image_size: int, recipe: EvalTransform = IMAGENET_EVAL) -> int:
    """The shorter-side resize before the centre crop, in the recipe's proportion: 256 for 224."""
    return round(image_size * recipe.resize_size / recipe.crop_size)


def resized_shorter_side(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_height, new_width) of torchvision's `Resize(size)`: shorter side to `size`."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)  # truncates, like torchvision
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(array: np.ndarray, size: int) -> np.ndarray:
    """torchvision's `CenterCrop(size)` on an HWC array, zero-padding first when it is too small."""
    height, width = array.shape[:2]
    if size > height or size > width:
        pad_h, pad_w = max(size - height, 0), max(size - width, 0)
        padding = [(pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2)]
        array = np.pad(array, padding + [(0, 0)] * (array.ndim - 2))
        height, width = array.shape[:2]
    # Python's round() rounds halves to even; torchvision uses it, so an odd margin of 2k+1
    # puts the extra pixel on the top/left side only when k is odd.
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return array[top : top + size, left : left + size]


def eval_transform_uint8(
    image: Image.Image, image_size: int = 224, resize_size: int | None = None
) -> np.ndarray:
    """`Resize(resize_size) + CenterCrop(image_size)` on a PIL image -> HWC uint8 RGB array;
    `resize_size` defaults to `eval_size(image_size)` (256 for 224).

    Raises BadImage for an image whose resized copy would exceed the pixel budget.
    """
    name = getattr(image, "filename", "") or "an in-memory image"
    _check_proportions(image.width, image.height, name)
    resize_size = eval_size(image_size) if resize_size is None else resize_size
    new_h, new_w = resized_shorter_side(image.height, image.width, resize_size)
    if new_h * new_w > MAX_RESIZED_PIXELS:
        reason = f"resizing it to {new_w}x{new_h} would exceed {MAX_RESIZED_PIXELS:,} pixels"
        raise BadImage(name, reason)
    image = decode_rgb(image)
    if (new_h, new_w) != (image.height, image.width):
        # Pillow's bilinear filter always antialiases, as torchvision's PIL path does.
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    return np.array(center_crop(np.asarray(image), image_size))  # a writable copy


def preprocess(image: Image.Image, image_size: int = 224) -> np.ndarray:
    """The torchvision ImageNet eval transform: PIL image -> HWC float32 normalised array."""
    return normalize(eval_transform_uint8(image, image_size))


def sample_crop(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Sample the crop box (i, j, h, w) exactly as torchvision's `RandomResizedCrop.get_params`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w

    # Fallback: the largest centred crop whose aspect ratio is clamped into `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(
    image: Image.Image,
    box: tuple[int, int, int, int],
    size: int,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> np.ndarray:
    """torchvision's `F.resized_crop(image, i, j, h, w, [size, size], BILINEAR)` -> HWC uint8;
    `resample` is the interpolation (torchvision's `InterpolationMode` on PIL images).
    """
    i, j, h, w = box
    # Crop first, then resize: resizing with a `box` argument would blend in pixels outside it.
    crop = decode_rgb(image).crop((j, i, j + w, i + h))
    if crop.size != (size, size):
        crop = crop.resize((size, size), resample)
    return np.array(crop)


def reduced_resized_crop(
    image: Image.Image,
    box: tuple[int, int, int, int],
    size: int,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> np.ndarray:
    """`resized_crop` from a JPEG decoded at 1/2, 1/4 or 1/8 of its size: the largest reduction
    that leaves the box at least `size` pixels on each side (Pillow's `draft`: libjpeg skips
    that share of the inverse DCT). Close to torchvision's crop, not bit-identical.

    Decodes in full, exactly as `resized_crop`, what cannot be reduced: images that are not
    JPEGs or already decoded, and boxes under twice `size`.
    """
    i, j, h, w = box
    factor = next((f for f in (8, 4, 2) if min(h, w) >= f * size), 1)
    width = image.width
    drafted = image.draft("RGB", (width // factor, image.height // factor)) if factor > 1 else None
    if drafted is None:
        return resized_crop(image, box, size, resample)
    scale = width / drafted[1][2]  # the reduction Pillow chose: `factor`
    # The box in the reduced image's coordinates, fractions kept: cropping at whole pixels first
    # would shift the crop by up to half a reduced pixel (see tests/data/test_transforms.py).
    region = (j / scale, i / scale, (j + w) / scale, (i + h) / scale)
    resized = decode_rgb(image).resize((size, size), resample, box=region)
    return np.array(resized)


def random_resized_crop_flip(
    image: Image.Image,
    image_size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
    reduced_decode: bool = False,
) -> np.ndarray:
    """The ImageNet training augmentation: RandomResizedCrop + RandomHorizontalFlip -> HWC uint8.

    `reduced_decode`: a JPEG still undecoded (`open_image`) is cropped by `reduced_resized_crop`.
    """
    box = sample_crop(image.height, image.width, rng, scale, ratio)
    crop = reduced_resized_crop if reduced_decode else resized_crop
    array = crop(image, box, image_size, resample)
    if rng.random() < flip_p:
        array = array[:, ::-1]
    return np.ascontiguousarray(array)
