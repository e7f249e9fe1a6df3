"""tensorflow-datasets as a `Source`, read through tfds's TensorFlow-free ArrayRecord path."""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds
from PIL import Image

from resnet_jax.data.sources import Source, check_val_fraction
from resnet_jax.data.transforms import BadImage
from resnet_jax.runtime.errors import UserError

__all__ = ["TfdsSource", "check_download", "open_tfds", "split_names"]

PROBE_TIMEOUT_S = 10.0
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


def _fetch_problem(url: str, timeout: float) -> str | None:
    """Why the first byte of `url` cannot be fetched within `timeout`, or None when it can.

    Runs in a daemon thread because name resolution has no timeout of its own.
    """
    problems: list[str | None] = []

    def fetch() -> None:
        request = urllib.request.Request(url, headers={"Range": "bytes=0-0"})
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                problems.append(None)
        except urllib.error.HTTPError as e:
            problems.append(f"HTTP {e.code}")
        except (OSError, ValueError, http.client.HTTPException) as e:  # DNS, refused, TLS...
            problems.append(str(getattr(e, "reason", e)))

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(timeout)
    return problems[0] if problems else f"no answer within {timeout:g} s"


def check_download(urls: list[str], timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """'<url> (<problem>)' for the first of `urls` that cannot be fetched, or None.

    tfds retries a failing download for minutes; this answers within seconds.
    """
    for url in urls:
        if problem := _fetch_problem(url, timeout):
            return f"{url} ({problem})"
    return None


@contextlib.contextmanager
def _tensorflow_free_archives() -> Iterator[None]:
    """Let tfds open downloaded archives without TensorFlow.

    tfds 4.9 prepares ArrayRecord datasets without TensorFlow except for one call: iterating over a
    downloaded archive opens it with `tf.io.gfile.GFile`. This swaps in `epath`'s `open` for that
    one private helper while preparing, and only when TensorFlow is absent.
    """
    from etils import epath
    from tensorflow_datasets.core.download import extractor

    if importlib.util.find_spec("tensorflow") or not hasattr(extractor, "_open_or_pass"):
        yield
        return

    @contextlib.contextmanager
    def open_or_pass(path_or_fobj: Any) -> Iterator[Any]:
        if isinstance(path_or_fobj, epath.PathLikeCls):
            with epath.Path(path_or_fobj).open("rb") as f:
                yield f
        else:
            yield path_or_fobj

    original = extractor._open_or_pass
    extractor._open_or_pass = open_or_pass
    try:
        yield
    finally:
        extractor._open_or_pass = original


def _prepare(builder: Any, name: str, download: bool) -> None:
    """Download and convert `name` to ArrayRecord, failing fast with a UserError when offline."""
    if not download:
        raise UserError(
            f"tfds dataset '{name}' is not prepared in {builder.data_dir} and "
            f"downloading is off; allow downloading or {_USE_FOLDER}."
        )
    problem = check_download(sorted(builder.url_infos or {}))
    if problem:
        raise UserError(f"Cannot download tfds dataset '{name}' from {problem}; {_USE_FOLDER}.")
    try:
        with _tensorflow_free_archives():
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


def open_tfds(
    name: str, *, val_fraction: float = 0.1, data_dir: str | None = None, download: bool = True
) -> tuple[TfdsSource, TfdsSource, list[str]]:
    """(train, val, classes) of tfds dataset `name`, prepared as ArrayRecord in `data_dir`."""
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
    classes = list(label.names)
    train, val = split_names(builder.info.splits, val_fraction)
    sources = [TfdsSource(builder.as_data_source(split=s), classes, s) for s in (train, val)]
    return sources[0], sources[1], classes
