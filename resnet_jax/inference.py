"""Prediction: weights file -> model, images -> class probabilities, and the ways to show them.

`Predictor.load` reads a `.msgpack`, `.safetensors` or `.pth`, finds the architecture from the
tensor shapes and the class names next to the weights. `Predictor.predict_files` runs fixed-size
jitted batches (the last one padded), so XLA compiles the model once per run.
"""

from __future__ import annotations

import csv
import io
import json
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
from resnet_jax.cache import enable_compilation_cache
from resnet_jax.convert import num_classes_of, resolve_arch
from resnet_jax.errors import UserError
from resnet_jax.files import atomic_write
from resnet_jax.models import ResNet, create_model
from resnet_jax.sources import IMAGE_EXTENSIONS, find_image_files, read_class_indices

PROGRESS_THRESHOLD = 100  # show a progress bar from this many images on
EXIT_SKIPPED = 2  # exit status of a run that predicted some images and skipped others
SEED_TOP_K = 5  # rows printed per image for heads with more than 10 classes
SEED_LINE = "class: {:10} prob: {:.3}"  # the seed's printed line
SEED_TITLE = "class: {} prob: {:.3}"  # and the seed's plot title


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
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
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


def format_text(
    predictions: Sequence[Prediction], classes: Sequence[str], top_k: int | None = None
) -> str:
    """The seed's lines `class: daisy      prob: 0.981`: every class in index order for heads
    of up to 10 classes, else (or with `top_k`) the top-k, highest first; one header per image."""
    index_order = top_k is None and len(classes) <= 10
    k = top_k or SEED_TOP_K
    lines = []
    for p in predictions:
        if len(predictions) > 1:
            lines.append(f"{p.image}:")
        for i in range(len(classes)) if index_order else p.ranked(k):
            lines.append(SEED_LINE.format(classes[i], float(p.probs[i])))
    return "\n".join(lines)


def to_records(
    predictions: Sequence[Prediction], classes: Sequence[str], top_k: int | None = None
) -> list[dict[str, Any]]:
    """The --json document: per image, predictions sorted by probability (all, or the top-k)."""
    return [
        {
            "image": p.image,
            "predictions": [
                {"index": i, "class": classes[i], "prob": float(p.probs[i])}
                for i in p.ranked(top_k)
            ],
        }
        for p in predictions
    ]


def write_output(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Write `to_records` output atomically: `.json` as the --json document, `.csv` one row
    per (image, prediction) with columns image, rank, index, class, prob."""
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        text = json.dumps(records, indent=2) + "\n"
    elif suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["image", "rank", "index", "class", "prob"])
        for r in records:
            for rank, p in enumerate(r["predictions"], start=1):
                writer.writerow([r["image"], rank, p["index"], p["class"], repr(p["prob"])])
        text = buffer.getvalue()
    else:
        raise UserError(f"--output {path}: use a file name ending in .csv or .json.")
    with atomic_write(path, mode="w") as f:
        f.write(text)


def _pyplot(show: bool) -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            "Plotting needs matplotlib; install it with `pip install resnet_jax[plot]`."
        ) from None
    if not show:
        matplotlib.use("Agg")  # write the file without needing a display
    import matplotlib.pyplot as plt

    return plt


MAX_PLOTTED = 16


def plot(
    predictions: Sequence[Prediction],
    classes: Sequence[str],
    save_path: str | os.PathLike | None = None,
    show: bool = True,
) -> None:
    """The images titled `class: sunflowers prob: 0.97` as the seed shows them (up to 16)."""
    plt = _pyplot(show)
    shown = predictions[:MAX_PLOTTED]
    if len(predictions) > MAX_PLOTTED:
        print(f"Plotting the first {MAX_PLOTTED} of {len(predictions)} images.", file=sys.stderr)
    cols = min(len(shown), 4)
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, p in zip(axes.flat, shown):
        top = p.ranked(1)[0]
        ax.imshow(transforms.load_rgb(p.image))
        ax.set_title(SEED_TITLE.format(classes[top], float(p.probs[top])))
    fig.tight_layout()
    if save_path is not None:
        suffix = Path(save_path).suffix.lstrip(".") or "png"
        buffer = io.BytesIO()
        fig.savefig(buffer, format=suffix)
        with atomic_write(save_path, mode="wb") as f:
            f.write(buffer.getvalue())
    if show:
        plt.show()
    plt.close(fig)


def predict_cli(
    images: Sequence[str],
    weights: str,
    class_indices: str | None = None,
    arch: str | None = None,
    top_k: int | None = None,
    json_output: bool = False,
    plot_images: bool = False,
    save_plot: str | None = None,
    output: str | None = None,
    batch_size: int = 32,
) -> int:
    """What `predict.py` does; returns the exit status (0, or EXIT_SKIPPED if images were
    skipped). Raises UserError for anything that stops the whole run."""
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k must be at least 1, not {top_k}.")
    if output is not None and Path(output).suffix.lower() not in (".csv", ".json"):
        raise UserError(f"--output {output}: use a file name ending in .csv or .json.")
    if plot_images or save_plot:
        _pyplot(plot_images)  # fail before the slow part if matplotlib is missing
    paths = find_images(images)

    enable_compilation_cache()  # a second run with the same batch shape skips compilation
    predictor = Predictor.load(weights, arch, class_indices)
    skipped: list[transforms.BadImage] = []

    def on_skip(error: transforms.BadImage) -> None:
        skipped.append(error)
        print(f"skipped: {error}", file=sys.stderr)

    # One image on its own fails the run; among several, a bad one is reported and skipped.
    predictions = predictor.predict_files(paths, batch_size, on_skip if len(paths) > 1 else None)
    if not predictions:
        raise UserError(f"None of the {len(paths)} images could be read; see the lines above.")

    classes = predictor.classes
    if json_output:
        print(json.dumps(to_records(predictions, classes, top_k), indent=2))
    else:
        print(format_text(predictions, classes, top_k))
    if output is not None:
        write_output(output, to_records(predictions, classes, top_k))
    if plot_images or save_plot:
        plot(predictions, classes, save_plot, show=plot_images)
    if skipped:
        print(
            f"{len(skipped)} of {len(paths)} images could not be read and were skipped.",
            file=sys.stderr,
        )
        return EXIT_SKIPPED
    return 0
