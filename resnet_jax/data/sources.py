"""Where labelled images come from: the `Source` interface, image folders, class-name files.

`tfds_source.TfdsSource` is the other implementation; `data.Loader` turns any source into batches.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from resnet_jax.data.transforms import load_rgb, open_image
from resnet_jax.runtime.errors import UserError
from resnet_jax.runtime.files import atomic_write

__all__ = [
    "IMAGE_EXTENSIONS", "ImageFolderSource", "RelabelledSource", "Source", "check_val_fraction",
    "find_image_files", "open_image_folder", "pick_val", "read_class_indices",
    "read_image_folder", "split_by_fraction", "val_count", "write_class_indices",
]  # fmt: skip

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_LAYOUT = "ROOT/train/<class>/*.jpg with ROOT/val/<class>/*.jpg, or ROOT/<class>/*.jpg"


class Source:
    """Random access to labelled images; subclasses read files or tfds records."""

    classes: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def label(self, i: int) -> int:
        raise NotImplementedError

    def load(self, i: int) -> Image.Image:
        """The i-th image in RGB; raises BadImage for a corrupt or unreadable one."""
        raise NotImplementedError

    def name(self, i: int) -> str:
        """A file path or record id, for warnings."""
        raise NotImplementedError

    def example(self, i: int, lazy: bool = False) -> tuple[Image.Image, int]:
        """(image, label) in one read; tfds records hold both, so they override this.

        `lazy`: the image may come opened but not decoded (`transforms.open_image`), so that a
        JPEG can still be decoded at reduced size; it is then decoded on first use.
        """
        return self.load(i), self.label(i)


class ImageFolderSource(Source):
    """Image files with integer labels, as torchvision's ImageFolder makes them."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: list[str]) -> None:
        self.samples = list(samples)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.samples)

    def label(self, i: int) -> int:
        return self.samples[i][1]

    def load(self, i: int) -> Image.Image:
        return load_rgb(self.samples[i][0])

    def example(self, i: int, lazy: bool = False) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        return (open_image(path) if lazy else load_rgb(path)), label

    def name(self, i: int) -> str:
        return self.samples[i][0]


class RelabelledSource(Source):
    """Another source's examples with each label `l` replaced by `labels[l]`, e.g. the data set's
    class order mapped onto a model's."""

    def __init__(self, source: Source, labels: Sequence[int], classes: list[str]) -> None:
        self.source = source
        self.labels = list(labels)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.source)

    def label(self, i: int) -> int:
        return self.labels[self.source.label(i)]

    def load(self, i: int) -> Image.Image:
        return self.source.load(i)

    def name(self, i: int) -> str:
        return self.source.name(i)

    def example(self, i: int) -> tuple[Image.Image, int]:
        image, label = self.source.example(i)
        return image, self.labels[label]


def _class_dirs(folder: Path) -> list[str]:
    """Sorted names of the class subfolders (hidden ones such as .ipynb_checkpoints ignored)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def find_image_files(folder: str | os.PathLike) -> list[str]:
    """All images under `folder`, recursively and sorted, like torchvision's make_dataset;
    hidden files and folders (.ipynb_checkpoints, ._photo.jpg) are skipped."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            os.path.join(root, f)
            for f in sorted(files)
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        ]
    return found


def _scan(folder: Path, classes: list[str]) -> list[list[str]]:
    """Image paths per class; UserError for a class folder without images."""
    per_class = []
    for name in classes:
        files = find_image_files(folder / name)
        if not files:
            raise UserError(
                f"Class folder {folder / name} has no images "
                f"({', '.join(IMAGE_EXTENSIONS)}); add some or remove the folder."
            )
        per_class.append(files)
    return per_class


def _samples(per_class: list[list[str]]) -> list[tuple[str, int]]:
    return [(path, label) for label, files in enumerate(per_class) for path in files]


def check_val_fraction(val_fraction: float, what: str) -> None:
    """UserError unless 0 < val_fraction < 1, the share of `what` held out for validation."""
    if not 0 < val_fraction < 1:
        raise UserError(
            f"--val-fraction must be between 0 and 1 to split {what}, got {val_fraction}."
        )


def val_count(n: int, val_fraction: float) -> int:
    """How many of a class's n examples go to val: int(n * val_fraction), as the original
    split_data.py takes them (tf_flowers: 364 of 3,670), but at least 1 and never all."""
    return min(max(int(n * val_fraction), 1), n - 1) if n > 1 else 0


def pick_val(keys: Sequence[str], val_fraction: float) -> set[str]:
    """The keys of one class that go to val: the first `val_count` ranked by their SHA-256.

    The choice does not depend on listing order, and adding a key moves at most one other.
    """
    ranked = sorted(keys, key=lambda k: hashlib.sha256(k.encode()).digest())
    return set(ranked[: val_count(len(keys), val_fraction)])


def split_by_fraction(
    files: list[str], val_fraction: float, class_dir: str | os.PathLike
) -> tuple[list[str], list[str]]:
    """Deterministic (train, val) split of the files of one class folder (see `pick_val`).

    Files are keyed by their path relative to `class_dir`, so the split is the same wherever
    the dataset lives.
    """
    keys = {f: Path(f).relative_to(class_dir).as_posix() for f in files}
    val = pick_val(list(keys.values()), val_fraction)
    return [f for f in files if keys[f] not in val], [f for f in files if keys[f] in val]


def open_image_folder(
    root: str | os.PathLike, val_fraction: float = 0.1
) -> tuple[ImageFolderSource, ImageFolderSource, list[str]]:
    """ROOT/train + ROOT/val, or ROOT/<class> split per class by `val_fraction`."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(
            f"Data folder {root} does not exist; pass --data-dir with an image folder "
            f"laid out as {_LAYOUT}."
        )
    train_dir, val_dir = root / "train", root / "val"
    if train_dir.is_dir() != val_dir.is_dir():
        have, missing = ("train", "val") if train_dir.is_dir() else ("val", "train")
        raise UserError(
            f"{root} has a {have}/ folder but no {missing}/ folder; add "
            f"{root / missing}/<class>/ images with the same class folders."
        )
    if train_dir.is_dir():
        classes, val_classes = _class_dirs(train_dir), _class_dirs(val_dir)
        if classes != val_classes:
            only_train = sorted(set(classes) - set(val_classes)) or "none"
            only_val = sorted(set(val_classes) - set(classes)) or "none"
            raise UserError(
                f"{train_dir} and {val_dir} have different class folders (only in "
                f"train: {only_train}; only in val: {only_val}); make them match."
            )
        if not classes:
            raise UserError(
                f"{train_dir} has no class folders; put images in "
                f"{train_dir}/<class>/ and {val_dir}/<class>/."
            )
        train = _samples(_scan(train_dir, classes))
        val = _samples(_scan(val_dir, classes))
    else:
        check_val_fraction(val_fraction, str(root))
        classes = _class_dirs(root)
        if not classes:
            raise UserError(f"{root} has no class folders with images; lay it out as {_LAYOUT}.")
        splits = [
            split_by_fraction(files, val_fraction, root / name)
            for name, files in zip(classes, _scan(root, classes))
        ]
        train, val = _samples([t for t, _ in splits]), _samples([v for _, v in splits])
        if not val:
            raise UserError(
                f"val_fraction={val_fraction} leaves no validation images in {root}; "
                f"raise it or add ROOT/train and ROOT/val folders."
            )
    return ImageFolderSource(train, classes), ImageFolderSource(val, classes), classes


def read_image_folder(folder: str | os.PathLike) -> ImageFolderSource:
    """All images of FOLDER/<class>/, labelled by the sorted class folder names (no split)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"Data folder {folder} does not exist; pass a folder of class folders.")
    classes = _class_dirs(folder)
    if not classes:
        raise UserError(f"{folder} has no class folders; lay it out as {folder}/<class>/*.jpg.")
    return ImageFolderSource(_samples(_scan(folder, classes)), classes)


def write_class_indices(path: str | os.PathLike, classes: Sequence[str]) -> None:
    """Write {"0": "daisy", ...} as indented JSON, atomically."""
    text = json.dumps({str(i): name for i, name in enumerate(classes)}, indent=4)
    with atomic_write(path, "w") as f:
        f.write(text)


def read_class_indices(path: str | os.PathLike) -> list[str]:
    """Class names in label order from a file written by `write_class_indices`."""
    try:
        table = json.loads(Path(path).read_text())
        classes = [table[str(i)] for i in range(len(table))]
    except FileNotFoundError:
        raise UserError(
            f"Class index file {path} does not exist; pass the one written next to the checkpoint."
        ) from None
    except OSError as e:  # a folder, no permission
        raise UserError(
            f"Cannot read class index file {path} ({e.strerror or e}); pass a readable "
            "class_indices.json."
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(
            f'{path} is not a class index file like {{"0": "daisy", ...}}; '
            "pass the one written next to the checkpoint."
        ) from None
    if not all(isinstance(c, str) for c in classes):
        raise UserError(f"{path} has class names that are not strings; fix or rewrite the file.")
    return classes
