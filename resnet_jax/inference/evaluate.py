"""Evaluation: a weights file scored on a labelled image set (top-1, top-5, mean cross-entropy,
per-class accuracy and the confusion matrix), as `evaluate.py` reports it.

The batches are validation's (`data.Loader(train=False)`) and so is the step
(`steps.eval_step` through `DataParallel`), so a model trained here scores exactly what
`train.py` reported for the same images and batch size. Classes are matched by name: each class
folder (or tfds label) must be one of the model's classes, whose order may differ; ImageNet's
synset folders (`n01440764`) match torchvision's 1000 classes. Model classes without a folder
are allowed (a subset such as Imagenette): their images are absent, yet predicting them still
counts as wrong.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np
import optax
from tqdm import tqdm

from resnet_jax.data.loader import Loader
from resnet_jax.data.sources import RelabelledSource, Source, read_image_folder
from resnet_jax.data.transforms import BadImage, eval_size
from resnet_jax.inference.eval_result import EvalResult
from resnet_jax.inference.predictor import Predictor, imagenet_classes, imagenet_wnids
from resnet_jax.models.registry import EvalTransform
from resnet_jax.runtime.errors import UserError
from resnet_jax.training.config import check_options, option
from resnet_jax.training.parallel import DataParallel
from resnet_jax.training.reporting import progress_bar
from resnet_jax.training.steps import create_state, zero_totals

__all__ = ["TTA", "EvalConfig", "evaluate", "match_classes", "open_eval_data"]

TTA = {"none": False, "flip": True}  # --tta -> eval_step's `flip`
SHOWN_NAMES = 8  # class names quoted in a message, at most


@dataclasses.dataclass
class EvalConfig:
    """Every option of an evaluation; `evaluate.py`'s flags map one to one onto these fields."""

    weights: str | None = option(
        None,
        ".msgpack from train.py/convert_weights.py, .pth/.safetensors, or hf:ORG/NAME on the "
        "Hugging Face hub",
        required=True,
        metavar="FILE|hf:ORG/NAME",
    )
    data_dir: str | None = option(
        None,
        "labelled images: ROOT/<class>/*.jpg, or ROOT/val/<class>/*.jpg when ROOT has a val/ "
        "folder (as train.py's --data-dir); class folders are matched to the model's classes "
        "by name (ImageNet's synset folders such as n01440764 to torchvision's classes); model "
        "classes without a folder are allowed",
        metavar="ROOT",
    )
    dataset: str | None = option(
        None, "a tensorflow-datasets name instead of --data-dir (e.g. tf_flowers)", metavar="NAME"
    )
    split: str | None = option(
        None,
        "tfds: the split, e.g. validation or 'train[-10%%:]' (default: the one train.py "
        "validates on: validation, else test, else the last 10%% of train); --data-dir: the "
        "subfolder of ROOT to use (default: val if there is one, else ROOT itself)",
    )
    arch: str | None = option(None, "architecture, e.g. resnet50 (default: from the weights)")
    class_indices: str | None = option(
        None,
        "the model's class names (default: those in the weights' metadata, else "
        "class_indices.json beside the weights, else ImageNet's for 1000 classes)",
        metavar="FILE",
    )
    resize: int | None = option(
        None,
        "resize the shorter side to this before the centre crop (default: the weights' eval "
        "transform from their metadata, else the architecture's ImageNet one: 256 for 224; "
        "with only --crop, in that proportion)",
        minimum=1,
        metavar="PIXELS",
    )
    crop: int | None = option(
        None, "centre crop size (default: the weights' eval transform)", minimum=1,
        metavar="PIXELS",
    )  # fmt: skip
    batch_size: int = option(
        32,
        "images per batch; the one train.py ran with gives its validation numbers to the bit",
        minimum=1,
    )
    tta: str = option(
        "none",
        "test-time augmentation: flip scores the mean softmax of each image and its mirror",
        choices=TTA,
    )
    workers: int = option(0, "image decoding threads; 0: one per CPU core", minimum=0)
    json: bool = option(False, "print the result as one JSON document instead of one line")
    output: str | None = option(
        None,
        "also write the result to FILE.csv (one row per class) or FILE.json (the --json "
        "document: per-class rows and the confusion matrix)",
        metavar="FILE",
    )
    confusion_png: str | None = option(
        None, "also draw the confusion matrix into FILE.png (needs matplotlib)", metavar="FILE"
    )


def evaluate(config: EvalConfig) -> EvalResult:
    """Score `config.weights` on `config`'s labelled images; see the module docstring."""
    check_options(config)
    if config.weights is None:
        raise UserError("Pass --weights with the weights file to evaluate.")
    data, where = open_eval_data(config.data_dir, config.dataset, config.split)
    predictor = Predictor.load(config.weights, config.arch, config.class_indices)
    transform = _override(predictor.transform, config.resize, config.crop)
    labels = match_classes(data.classes, predictor.classes, where)
    source = RelabelledSource(data, labels, predictor.classes)
    totals, skipped = _score(predictor, source, transform, config)
    count = int(totals["count"])
    if count == 0:
        raise UserError(f"None of the {len(source)} images in {where} could be read.")
    return EvalResult(
        weights=str(config.weights), data=where, arch=predictor.arch,
        classes=tuple(predictor.classes), folders=tuple(data.classes), labels=tuple(labels),
        confusion=np.asarray(totals["confusion"]), loss=float(totals["loss"]) / count,
        top1=float(totals["correct"]) / count, top5=float(totals["top5"]) / count,
        images=count, skipped=skipped, transform=transform, tta=config.tta,
    )  # fmt: skip


def open_eval_data(
    data_dir: str | None, dataset: str | None, split: str | None
) -> tuple[Source, str]:
    """The labelled images to score and how to name them: an image folder (its `split`
    subfolder, else val/ if present, else itself) or a tfds split."""
    if (data_dir is None) == (dataset is None):
        raise UserError("Pass either --data-dir ROOT (an image folder) or --dataset NAME (tfds).")
    if dataset is not None:
        from resnet_jax.data.tfds import open_tfds_split  # tfds is slow to import: only when used

        source = open_tfds_split(dataset, split)
        return source, f"tfds {dataset} {source.split}"
    root = Path(data_dir).expanduser()
    if split is not None:
        folder = root / split
        if not folder.is_dir():
            raise UserError(f"{root} has no {split}/ folder; pass the --split that it has.")
    else:
        folder = root / "val" if (root / "val").is_dir() else root
    return read_image_folder(folder), str(folder)


def match_classes(folders: list[str], classes: list[str], where: str) -> list[int]:
    """The model's output index of each data set class, found by name (a synset id names one of
    torchvision's ImageNet classes too); UserError for a class the model does not know."""
    index = {name: i for i, name in enumerate(classes)}
    if list(classes) == imagenet_classes():
        index.update({wnid: i for i, wnid in enumerate(imagenet_wnids())})
    unknown = [name for name in folders if name not in index]
    if unknown:
        hint = (
            "the weights carry no class names, so pass --class-indices"
            if classes == [str(i) for i in range(len(classes))]
            else "rename the folders to the model's class names or pass --class-indices"
        )
        raise UserError(
            f"{where} has {len(unknown)} classes the model does not know ({_names(unknown)}); "
            f"its {len(classes)} classes are {_names(classes)}; {hint}."
        )
    labels = [index[name] for name in folders]
    for i, label in enumerate(labels):
        if label in labels[:i]:
            first = folders[labels.index(label)]
            raise UserError(
                f"{where}: {first} and {folders[i]} name the same model class "
                f"({classes[label]}); keep one of them."
            )
    return labels


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN_NAMES])
    return shown + (f", ... ({len(names) - SHOWN_NAMES} more)" if len(names) > SHOWN_NAMES else "")


def _override(transform: EvalTransform, resize: int | None, crop: int | None) -> EvalTransform:
    """The weights' eval transform with --resize/--crop; a crop alone keeps the proportion."""
    if crop is not None and resize is None:
        resize = eval_size(crop, transform)
    return dataclasses.replace(
        transform,
        resize_size=transform.resize_size if resize is None else resize,
        crop_size=transform.crop_size if crop is None else crop,
    )


def _score(
    predictor: Predictor, source: Source, transform: EvalTransform, config: EvalConfig
) -> tuple[dict[str, np.ndarray], int]:
    """The totals of `steps.eval_step` over every batch, and the number of unreadable images."""
    dp = DataParallel()
    dp.check_batch_size(config.batch_size)
    loader = Loader(
        source, config.batch_size, train=False, image_size=transform.crop_size,
        resize_size=transform.resize_size, workers=config.workers, on_skip=_report_skip,
    )  # fmt: skip
    # eval_step reads a TrainState's params, batch_stats and apply_fn; this one cannot train.
    state = dp.replicate(create_state(predictor.model.apply, optax.identity(), predictor.variables))
    step = dp.jit_eval_step(transform, flip=TTA[config.tta])
    totals = dp.replicate(zero_totals(len(predictor.classes), top5=True))
    with progress_bar(len(loader), "evaluate") as bar:
        for batch in dp.prefetch(loader.epoch(0)):
            totals = step(state, batch, totals)
            bar.update()
    return jax.device_get(totals), loader.skipped


def _report_skip(error: BadImage) -> None:
    tqdm.write(f"skipped: {error}", file=sys.stderr)
