"""How predictions are shown: the original script's lines, JSON/CSV records, titled images and
Grad-CAM heat maps."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from resnet_jax.data import transforms
from resnet_jax.inference.gradcam import upsample
from resnet_jax.inference.predictor import Prediction
from resnet_jax.models.registry import EvalTransform
from resnet_jax.runtime.errors import UserError
from resnet_jax.runtime.files import atomic_write, make_folder
from resnet_jax.runtime.plotting import matplotlib_figure

__all__ = [
    "CAM_SUFFIX",
    "ORIGINAL_LINE",
    "ORIGINAL_TITLE",
    "ORIGINAL_TOP_K",
    "check_cam_dir",
    "check_plot_path",
    "format_text",
    "output_format",
    "plot",
    "save_cams",
    "to_records",
    "write_output",
]  # fmt: skip

ORIGINAL_TOP_K = 5  # rows printed per image for heads with more than 10 classes
ORIGINAL_LINE = "class: {:10} prob: {:.3}"  # the original predict.py's printed line
ORIGINAL_TITLE = "class: {} prob: {:.3}"  # and its plot title
OUTPUT_SUFFIXES = (".csv", ".json")
CAM_SUFFIX = ".cam.png"  # tulip.jpg -> tulip.cam.png
CAM_ALPHA = 0.4  # opacity of the heat map over the image


def format_text(
    predictions: Sequence[Prediction], classes: Sequence[str], top_k: int | None = None
) -> str:
    """The original's lines `class: daisy      prob: 0.981`: every class in index order for heads
    of up to 10 classes, else (or with `top_k`) the top-k, highest first; one header per image."""
    index_order = top_k is None and len(classes) <= 10
    k = top_k or ORIGINAL_TOP_K
    lines = []
    for p in predictions:
        if len(predictions) > 1:
            lines.append(f"{p.image}:")
        for i in range(len(classes)) if index_order else p.ranked(k):
            lines.append(ORIGINAL_LINE.format(classes[i], float(p.probs[i])))
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


def output_format(path: str | os.PathLike) -> str:
    """The format of an --output file, 'json' or 'csv' from its suffix; UserError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise UserError(f"--output {path}: use a file name ending in .csv or .json.")
    return suffix[1:]


def write_output(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Write `to_records` output atomically: `.json` as the --json document, `.csv` one row
    per (image, prediction) with columns image, rank, index, class, prob."""
    if output_format(path) == "json":
        text = json.dumps(records, indent=2) + "\n"
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["image", "rank", "index", "class", "prob"])
        for r in records:
            for rank, p in enumerate(r["predictions"], start=1):
                writer.writerow([r["image"], rank, p["index"], p["class"], repr(p["prob"])])
        text = buffer.getvalue()
    with atomic_write(path, mode="w") as f:
        f.write(text)


def _pyplot(show: bool) -> Any:
    matplotlib_figure("Plotting")
    import matplotlib

    if not show:
        matplotlib.use("Agg")  # write the file without needing a display
    import matplotlib.pyplot as plt

    return plt


def _plot_format(path: str | os.PathLike) -> str:
    return Path(path).suffix.lstrip(".").lower() or "png"


def check_plot_path(save_path: str | os.PathLike | None, show: bool) -> None:
    """UserError, before any work, if matplotlib is missing or cannot write `save_path`'s format."""
    plt = _pyplot(show)
    if save_path is None:
        return
    suffix = _plot_format(save_path)
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if suffix not in formats:
        raise UserError(
            f"--save-plot {save_path}: matplotlib cannot write .{suffix} files; "
            f"use one of: {', '.join('.' + f for f in sorted(formats))}."
        )


MAX_PLOTTED = 16


def plot(
    predictions: Sequence[Prediction],
    classes: Sequence[str],
    save_path: str | os.PathLike | None = None,
    show: bool = True,
) -> None:
    """The images titled `class: sunflowers prob: 0.97` as the original shows them (up to 16)."""
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
        ax.set_title(ORIGINAL_TITLE.format(classes[top], float(p.probs[top])))
    fig.tight_layout()
    if save_path is not None:
        _save_figure(fig, save_path)
    if show:
        plt.show()
    plt.close(fig)


def _save_figure(fig: Any, path: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format=_plot_format(path))
    with atomic_write(path, mode="wb") as f:
        f.write(buffer.getvalue())


def check_cam_dir(folder: str | os.PathLike) -> None:
    """UserError, before any work, if matplotlib is missing or the --cam folder cannot be made;
    creates the folder."""
    matplotlib_figure("--cam")
    make_folder(folder)


def _cam_names(predictions: Sequence[Prediction]) -> list[str]:
    """`<stem>.cam.png` per image; a stem seen before gets `-2`, `-3`, ... (a/x.jpg, b/x.jpg)."""
    names, seen = [], set()
    for p in predictions:
        stem, n = Path(p.image).stem, 1
        while (name := stem + (f"-{n}" if n > 1 else "") + CAM_SUFFIX) in seen:
            n += 1
        seen.add(name)
        names.append(name)
    return names


def save_cams(
    predictions: Sequence[Prediction],
    classes: Sequence[str],
    folder: str | os.PathLike,
    transform: EvalTransform,
) -> list[Path]:
    """For each prediction with a Grad-CAM map: the eval-cropped image the model saw, its map
    upsampled and overlaid (jet colormap), titled with the top class, as FOLDER/<stem>.cam.png."""
    Figure = matplotlib_figure("--cam")
    written = []
    for p, name in zip(predictions, _cam_names(predictions)):
        if p.cam is None:
            raise ValueError(f"{p.image} has no Grad-CAM map; predict with cam=True.")
        image = transforms.load_rgb(p.image)
        crop = transforms.eval_transform_uint8(image, transform.crop_size, transform.resize_size)
        top = p.ranked(1)[0]
        fig = Figure(figsize=(4, 4.3))
        ax = fig.subplots()
        ax.imshow(crop)
        ax.imshow(upsample(p.cam, transform.crop_size), cmap="jet", alpha=CAM_ALPHA, vmin=0, vmax=1)
        ax.set_title(ORIGINAL_TITLE.format(classes[top], float(p.probs[top])))
        ax.axis("off")
        fig.tight_layout()
        path = Path(folder) / name
        _save_figure(fig, path)
        written.append(path)
    return written
