"""Prediction: weights file -> model, images -> class probabilities (shown by predict_output).

`Predictor.load` reads a `.msgpack`, `.safetensors` or `.pth`, finds the architecture from the
tensor shapes and the class names next to the weights. `Predictor.predict_files` runs fixed-size
jitted batches (the last one padded), so XLA compiles the model once per run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from resnet_jax import transforms
from resnet_jax.convert import num_classes_of, resolve_arch
from resnet_jax.data import default_workers
from resnet_jax.errors import UserError
from resnet_jax.models import ResNet, create_model
from resnet_jax.sources import IMAGE_EXTENSIONS, find_image_files, read_class_indices

__all__ = ["Prediction", "Predictor", "find_images", "imagenet_classes", "load_class_names"]

PROGRESS_THRESHOLD = 100  # show a progress bar from this many images on


@dataclass(frozen=True)
class Prediction:
    """The softmax output for one image."""

    image: str
    probs: np.ndarray  # (num_classes,) float32

    def ranked(self, top_k: int | None = None) -> list[int]:
        """Class indices, most probable first (all of them, or the first `top_k`)."""
        # A stable sort keeps ties in index order.
        order = np.argsort(-self.probs, kind="stable")
        return [int(i) for i in order[:top_k]]


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names in index order, as torchvision lists them."""
    text = resources.files("resnet_jax").joinpath("imagenet_classes.txt").read_text("utf-8")
    return text.splitlines()


def find_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given and, for each directory, its image files (recursively, sorted by path;
    hidden ones skipped, as in training)."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(map(Path, find_image_files(item)))
            if not found:
                raise UserError(
                    f"The folder {item} contains no images ({', '.join(IMAGE_EXTENSIONS)}); "
                    "point at a folder of images."
                )
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            raise UserError(f"{item} does not exist; pass an image file or a folder of images.")
    if not paths:
        raise UserError("No images given; pass at least one image file or folder.")
    return paths


def load_class_names(
    num_classes: int, weights: str | os.PathLike, class_indices: str | os.PathLike | None = None
) -> list[str]:
    """Names from `class_indices` (default: class_indices.json beside the weights), ImageNet's
    for a 1000-class head without a file, else the indices themselves."""
    path = Path(class_indices) if class_indices else Path(weights).parent / "class_indices.json"
    if class_indices or path.is_file():
        names = read_class_indices(path)
        if len(names) != num_classes:
            raise UserError(
                f"{path} names {len(names)} classes but the weights have {num_classes} outputs; "
                "pass the class_indices.json written with these weights (--class-indices)."
            )
        return names
    if num_classes == 1000:
        return imagenet_classes()
    print(
        f"warning: no class_indices.json beside {weights}; classes are shown by index.",
        file=sys.stderr,
    )
    return [str(i) for i in range(num_classes)]


class Predictor:
    """A model with its variables and class names, and a jitted softmax over its logits."""

    def __init__(
        self, model: ResNet, variables: dict, classes: Sequence[str], image_size: int = 224
    ) -> None:
        self.model = model
        self.variables = jax.device_put(
            {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        )
        self.classes = list(classes)
        self.image_size = image_size
        self._forward = jax.jit(
            lambda v, x: jax.nn.softmax(model.apply(v, x, train=False), axis=-1)
        )

    @classmethod
    def load(
        cls,
        weights: str | os.PathLike,
        arch: str | None = None,
        class_indices: str | os.PathLike | None = None,
        image_size: int = 224,
    ) -> Predictor:
        """Read a weights file; `arch` (default: detected from the shapes) is checked against it."""
        from resnet_jax.weights import load_variables  # safetensors/msgpack only when needed

        variables = load_variables(weights)
        arch = resolve_arch(variables, arch)
        num_classes = num_classes_of(variables)
        if num_classes is None:
            raise UserError(f"{weights} has no classification head (fc); predicting needs one.")
        if not all(np.isfinite(x).all() for x in jax.tree.leaves(variables)):
            raise UserError(
                f"{weights} holds weights that are not finite (NaN or infinity); use the "
                "weights of a run that trained without diverging."
            )
        classes = load_class_names(num_classes, weights, class_indices)
        return cls(create_model(arch, num_classes=num_classes), variables, classes, image_size)

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed NHWC float32 images -> (N, num_classes) probabilities, in one call."""
        return np.asarray(self._forward(self.variables, images))

    def predict_files(
        self,
        paths: Sequence[str | os.PathLike],
        batch_size: int = 32,
        on_skip: Callable[[transforms.BadImage], None] | None = None,
        progress: bool | None = None,
    ) -> list[Prediction]:
        """Predict each readable image in `paths`, in order; `on_skip` gets each unreadable one
        (default: raise). Batches have one size, min(batch_size, len(paths)): one compilation."""
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, not {batch_size}.")
        size = min(batch_size, len(paths))
        shape = (size, self.image_size, self.image_size, 3)
        results: list[Prediction] = []
        pending: tuple[list[str], Any] | None = None

        def collect() -> None:
            names, probs = pending
            results.extend(Prediction(n, p) for n, p in zip(names, np.asarray(probs)))

        show = len(paths) >= PROGRESS_THRESHOLD if progress is None else progress
        with tqdm(total=len(paths), disable=not show, unit="img", file=sys.stderr) as bar:
            for names, batch in self._batches(paths, size, on_skip, bar):
                n = len(names)
                if n < size:  # pad the last batch: the same shape, no new compilation
                    batch = np.concatenate([batch, np.zeros((size - n, *shape[1:]), np.float32)])
                probs = self._forward(self.variables, batch)[:n]  # asynchronous dispatch
                if pending is not None:
                    collect()  # the previous batch, while this one runs
                pending = (names, probs)
            if pending is not None:
                collect()
        return results

    def _batches(
        self,
        paths: Sequence[str | os.PathLike],
        size: int,
        on_skip: Callable[[transforms.BadImage], None] | None,
        bar: tqdm,
    ) -> Iterator[tuple[list[str], np.ndarray]]:
        """(names, stacked images) of at most `size` readable images, decoded by a thread pool."""

        def load(path: str | os.PathLike) -> np.ndarray | transforms.BadImage:
            try:
                return transforms.preprocess(transforms.load_rgb(path), self.image_size)
            except transforms.BadImage as e:
                return e

        names: list[str] = []
        arrays: list[np.ndarray] = []
        with ThreadPoolExecutor(max_workers=default_workers()) as pool:
            for start in range(0, len(paths), size):
                chunk = paths[start : start + size]
                for path, image in zip(chunk, pool.map(load, chunk)):
                    if isinstance(image, transforms.BadImage):
                        if on_skip is None:
                            raise image
                        on_skip(image)
                    else:
                        names.append(os.fspath(path))
                        arrays.append(image)
                    if len(names) == size:
                        yield names, np.stack(arrays)
                        names, arrays = [], []
                bar.update(len(chunk))
        if names:
            yield names, np.stack(arrays)
