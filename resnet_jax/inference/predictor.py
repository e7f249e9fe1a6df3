"""Prediction: weights file -> model, images -> class probabilities (shown by predict_output).

`Predictor.load` reads a `.msgpack`, `.safetensors` or `.pth`, finds the architecture (and head
layout) from the tensors, and takes the eval transform and class names from the file's metadata
(see `metadata.py`), so a trained model predicts exactly as it was validated. Its batches are
made as the validation batches are (`data.Loader(train=False)` and `steps.eval_logits`), in one
size (the last one padded), so XLA compiles the model once per run.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from resnet_jax.data.loader import Loader
from resnet_jax.data.sources import (
    IMAGE_EXTENSIONS,
    ImageFolderSource,
    find_image_files,
    read_class_indices,
)
from resnet_jax.data.transforms import BadImage, eval_size
from resnet_jax.inference.gradcam import gradcam
from resnet_jax.models.preprocess import eval_logits
from resnet_jax.models.registry import IMAGENET_EVAL, EvalTransform
from resnet_jax.models.resnet import ResNet
from resnet_jax.runtime.errors import UserError
from resnet_jax.weights.io import read_metadata
from resnet_jax.weights.metadata import ModelMetadata, check_metadata
from resnet_jax.weights.torch_names import head_of, num_classes_of, resolve_arch

__all__ = [
    "Prediction", "Predictor", "find_images", "imagenet_classes", "imagenet_wnids",
    "load_class_names",
]  # fmt: skip

PROGRESS_THRESHOLD = 100  # show a progress bar from this many images on


@dataclass(frozen=True)
class Prediction:
    """The softmax output for one image."""

    image: str
    probs: np.ndarray  # (num_classes,) float32
    cam: np.ndarray | None = None  # (h, w) Grad-CAM map of the top class, in [0, 1]

    def ranked(self, top_k: int | None = None) -> list[int]:
        """Class indices, most probable first (all of them, or the first `top_k`)."""
        # A stable sort keeps ties in index order.
        order = np.argsort(-self.probs, kind="stable")
        return [int(i) for i in order[:top_k]]


def _package_lines(name: str) -> list[str]:
    return resources.files("resnet_jax.data").joinpath(name).read_text("utf-8").splitlines()


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names in index order, as torchvision lists them."""
    return _package_lines("imagenet_classes.txt")


def imagenet_wnids() -> list[str]:
    """The WordNet ids of the same 1000 classes (`n01440764`, ...): ImageNet's folder names,
    sorted, which is torchvision's class order."""
    return _package_lines("imagenet_wnids.txt")


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
    """A model with its variables, class names and eval transform, and a jitted softmax."""

    def __init__(
        self,
        model: ResNet,
        variables: dict,
        classes: Sequence[str],
        transform: EvalTransform = IMAGENET_EVAL,
        arch: str | None = None,
    ) -> None:
        self.model = model
        self.arch = arch  # the registry name, when known
        self.variables = jax.device_put(
            {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        )
        self.classes = list(classes)
        self.transform = transform
        self._forward = jax.jit(
            lambda v, x: jax.nn.softmax(eval_logits(model.apply, v, x, transform), axis=-1)
        )
        self._gradcam = jax.jit(lambda v, x: gradcam(model, v, x, transform))

    @property
    def image_size(self) -> int:
        """The side of the (square) images the model sees: the eval crop."""
        return self.transform.crop_size

    @classmethod
    def load(
        cls,
        weights: str | os.PathLike,
        arch: str | None = None,
        class_indices: str | os.PathLike | None = None,
        image_size: int | None = None,
    ) -> Predictor:
        """Read a weights file and its metadata: the eval transform and classes it was validated
        with. Without metadata (.pth, older files): the architecture's ImageNet eval transform.
        `image_size` overrides the crop (the resize keeps its proportion); `arch` (default:
        detected from the shapes) is checked against the weights."""
        from resnet_jax.weights.io import load_variables  # safetensors/msgpack only when needed

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
        head = head_of(variables)
        metadata = read_metadata(weights)
        if metadata is None:
            metadata = ModelMetadata.default(arch, num_classes, head)
        else:
            check_metadata(metadata, arch, num_classes, head, weights)
        transform = metadata.transform
        if image_size is not None:
            if image_size < 1:
                raise UserError(f"--image-size must be at least 1, not {image_size}.")
            resize = eval_size(image_size, transform)
            transform = dataclasses.replace(transform, crop_size=image_size, resize_size=resize)
        if class_indices is None and metadata.classes is not None:
            classes = list(metadata.classes)
        else:
            classes = load_class_names(num_classes, weights, class_indices)
        return cls(metadata.create_model(), variables, classes, transform, arch)

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Eval-transformed uint8 NHWC images (`transforms.eval_transform_uint8`) ->
        (N, num_classes) probabilities, in one call."""
        return np.asarray(self._forward(self.variables, images))

    def predict_files(
        self,
        paths: Sequence[str | os.PathLike],
        batch_size: int = 32,
        on_skip: Callable[[BadImage], None] | None = None,
        progress: bool | None = None,
        cam: bool = False,
    ) -> list[Prediction]:
        """Predict each readable image in `paths`, in order; `on_skip` gets each unreadable one
        (default: raise). Batches have one size, min(batch_size, len(paths)): one compilation.
        `cam`: also each image's Grad-CAM map (`gradcam.gradcam`), from the same forward pass.
        `progress` (default: from PROGRESS_THRESHOLD images on): a bar on stderr."""
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, not {batch_size}.")
        if not paths:
            return []
        source = ImageFolderSource([(os.fspath(p), 0) for p in paths], classes=[])
        loader = Loader(
            source, min(batch_size, len(paths)), train=False, image_size=self.transform.crop_size,
            resize_size=self.transform.resize_size, on_skip=on_skip or _raise,
        )  # fmt: skip
        results: list[Prediction] = []
        pending: tuple[list[str], Any, np.ndarray] | None = None

        def collect() -> None:
            names, out, mask = pending
            probs, maps = out if cam else (out, None)
            maps = np.asarray(maps)[mask] if cam else [None] * len(names)
            results.extend(map(Prediction, names, np.asarray(probs)[mask], maps))

        show = len(paths) >= PROGRESS_THRESHOLD if progress is None else progress
        with tqdm(total=len(paths), disable=not show, unit="img", file=sys.stderr) as bar:
            for rows, batch in zip(loader.indices(0), loader.epoch(0)):
                mask = batch["mask"]
                forward = self._gradcam if cam else self._forward
                out = forward(self.variables, batch["image"])  # asynchronous dispatch
                if pending is not None:
                    collect()  # the previous batch, while this one runs
                pending = ([source.name(i) for i in rows[mask]], out, mask)
                bar.update(int(np.sum(rows >= 0)))
            if pending is not None:
                collect()
        return results


def _raise(error: BadImage) -> None:
    raise error
