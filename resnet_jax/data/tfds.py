"""tensorflow-datasets as a `Source`, read through tfds's TensorFlow-free ArrayRecord path."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from resnet_jax.data.sources import Source, check_val_fraction
from resnet_jax.data.transforms import BadImage
from resnet_jax.runtime.errors import UserError
from resnet_jax.runtime.network import PROBE_TIMEOUT_S, describe, probe

__all__ = ["TfdsSource", "download_problem", "open_tfds", "open_tfds_split", "split_names"]

_USE_FOLDER = "pass --data-dir with an ImageFolder instead"


class TfdsSource(Source):
    """One split of a prepared tfds dataset; records are {'image': uint8 HWC, 'label': int}."""

    def __init__(self, records: Any, classes: list[str], split: str) -> None:
        self.records = records  # a tfds ArrayRecordDataSource: len() and [i]
        self.classes = classes
        self.split = split

    def __len__(self) -> int:
        return len(self.records)

    def example(self, i: int, lazy: bool = False) -> tuple[Image.Image, int]:
        try:
            record = self.records[i]
            array = record["image"]
            if array.ndim == 3 and array.shape[-1] == 1:  # tfds keeps grayscale as (H, W, 1)
                array = array[..., 0]
            image = Image.fromarray(array).convert("RGB")
        except Exception as e:  # a record tfds or Pillow cannot decode
            raise BadImage(self.name(i), f"{type(e).__name__}: {e}") from e
        image.filename = self.name(i)  # so later messages (e.g. the pixel budget) name the record
        return image, int(record["label"])

    def load(self, i: int) -> Image.Image:
        return self.example(i)[0]

    def label(self, i: int) -> int:
        return int(self.records[i]["label"])  # decodes the image too; the loader uses example()

    def name(self, i: int) -> str:
        return f"{self.split}[{i}]"


def download_problem(urls: list[str], timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """'<url> (<problem>)' for the first of `urls` that cannot be fetched, or None.

    tfds retries a failing download for minutes; this answers within seconds.
    """
    for url in urls:
        if (error := probe(url, timeout)) is not None:
            return f"{url} ({describe(error)})"
    return None


class _GFile:
    """`tf.io.gfile.GFile` for local paths, through `etils.epath` (which tfds depends on)."""

    def __new__(cls, path: Any, mode: str = "r") -> Any:
        from etils import epath

        return epath.Path(path).open(mode)


class _TensorFlowShim:
    """The two TensorFlow calls tfds makes while preparing an image dataset without it:
    `tf.io.gfile.GFile` (opening a downloaded archive, writing its extracted files, reading
    them, as CIFAR's builder does) and `tf.compat.as_text` (the archive's member names)."""

    io = types.SimpleNamespace(gfile=types.SimpleNamespace(GFile=_GFile))
    compat = types.SimpleNamespace(
        as_text=lambda text: text.decode("utf-8") if isinstance(text, bytes) else text
    )


def _encode_with_pillow(encoder: Any, array: np.ndarray) -> bytes:
    """tfds's `_ImageEncoder._encode_image` (a numpy image to PNG or JPEG bytes) with Pillow
    instead of TensorFlow; tfds reads the bytes back with Pillow or OpenCV either way."""
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    return encoder._encode_pil_image(image)


@contextlib.contextmanager
def _without_tensorflow(builder: Any) -> Iterator[None]:
    """Let tfds prepare `builder`'s dataset when TensorFlow is absent.

    tfds 4.9 writes ArrayRecord datasets without TensorFlow, but its archive extractor and some
    builders (CIFAR reads its extracted files) still reach for `tf.io.gfile` and
    `tf.compat.as_text`, and numpy images are encoded with `tf.image`: while preparing, those
    modules get `_TensorFlowShim` as their `tf` and images are encoded with Pillow.
    """
    from tensorflow_datasets.core.download import extractor
    from tensorflow_datasets.core.features import image_feature

    if importlib.util.find_spec("tensorflow"):
        yield
        return
    modules = [extractor, sys.modules[type(builder).__module__]]
    saved = [(m, "tf", m.tf) for m in modules if hasattr(m, "tf")]
    encoder = image_feature._ImageEncoder
    saved.append((encoder, "_encode_image", encoder._encode_image))
    replacements = [_TensorFlowShim] * (len(saved) - 1) + [_encode_with_pillow]
    for (owner, name, _), replacement in zip(saved, replacements, strict=True):
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def _prepare(builder: Any, name: str, download: bool) -> None:
    """Download and convert `name` to ArrayRecord, failing fast with a UserError when offline."""
    if not download:
        raise UserError(
            f"tfds dataset '{name}' is not prepared in {builder.data_dir} and "
            f"downloading is off; allow downloading or {_USE_FOLDER}."
        )
    problem = download_problem(sorted(builder.url_infos or {}))
    if problem:
        raise UserError(f"Cannot download tfds dataset '{name}' from {problem}; {_USE_FOLDER}.")
    try:
        with _without_tensorflow(builder):
            builder.download_and_prepare(file_format="array_record")
    except ModuleNotFoundError as e:
        if e.name != "tensorflow":
            raise
        raise UserError(
            f"Preparing tfds dataset '{name}' needs TensorFlow (pip install "
            f"tensorflow); install it or {_USE_FOLDER}."
        ) from None


def split_names(splits: Any, val_fraction: float) -> tuple[str, str]:
    """(train, val) tfds split strings: 'validation' or 'test' if the dataset has one, else the last
    `val_fraction` of 'train' (tfds rounds the boundary: tf_flowers' 3,670 give 3,303 / 367)."""
    for val in ("validation", "test"):
        if val in splits:
            return "train", val
    check_val_fraction(val_fraction, "tfds 'train'")
    percent = f"{round(val_fraction * 100, 6):g}%"
    return f"train[:-{percent}]", f"train[-{percent}:]"


def _prepared_builder(name: str, data_dir: str | None, download: bool) -> tuple[Any, list[str]]:
    """The tfds builder of `name`, prepared as ArrayRecord in `data_dir`, and its class names."""
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.DatasetNotFoundError:
        raise UserError(
            f"tfds has no dataset named '{name}'; check the name or {_USE_FOLDER}."
        ) from None
    features = builder.info.features
    label = features["label"] if "label" in features else None  # noqa: SIM401 (no .get)
    if "image" not in features or not isinstance(label, tfds.features.ClassLabel):
        raise UserError(
            f"tfds dataset '{name}' has no 'image' and 'label' class features; {_USE_FOLDER}."
        )
    if not builder.is_prepared():
        _prepare(builder, name, download)
    elif builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise UserError(
            f"tfds dataset '{name}' in {builder.data_dir} is stored as "
            f"{builder.info.file_format.value}, which needs TensorFlow to read; "
            f"choose another tfds data folder to prepare it as ArrayRecord there."
        )
    return builder, list(label.names)


def open_tfds(
    name: str, *, val_fraction: float = 0.1, data_dir: str | None = None, download: bool = True
) -> tuple[TfdsSource, TfdsSource, list[str]]:
    """(train, val, classes) of tfds dataset `name`, prepared as ArrayRecord in `data_dir`."""
    builder, classes = _prepared_builder(name, data_dir, download)
    train, val = split_names(builder.info.splits, val_fraction)
    sources = [TfdsSource(builder.as_data_source(split=s), classes, s) for s in (train, val)]
    return sources[0], sources[1], classes


def open_tfds_split(
    name: str,
    split: str | None = None,
    *,
    val_fraction: float = 0.1,
    data_dir: str | None = None,
    download: bool = True,
) -> TfdsSource:
    """One split of tfds dataset `name` (tfds syntax: 'validation', 'train[-10%:]'); by default
    the one `open_tfds` validates on."""
    builder, classes = _prepared_builder(name, data_dir, download)
    splits = builder.info.splits
    if split is None:
        split = split_names(splits, val_fraction)[1]
    try:
        splits[split]  # tfds parses the spec here: its split names, slices and `+`
    except (ValueError, KeyError, AssertionError):
        raise UserError(
            f"tfds dataset '{name}' has no split '{split}' (its splits: "
            f"{', '.join(sorted(splits))}); pass one, or a slice such as 'train[-10%:]'."
        ) from None
    return TfdsSource(builder.as_data_source(split=split), classes, split)
