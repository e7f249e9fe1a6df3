"""Images/s of resnet_jax.data.loader.Loader against torchvision ImageFolder + DataLoader, same workers.

    python benchmarks/data_pipeline.py --workers 2                       # generated 500x375 JPEGs
    python benchmarks/data_pipeline.py --workers 2 --data-dir PATH/TO/IMAGE_FOLDER

Both sides read the same files with the same transforms (RandomResizedCrop(224) + flip for
train, Resize(256) + CenterCrop(224) for eval) and run alternately, A B A B, to cancel drift.
Ours hands out uint8 batches (normalised later on the device); torchvision's include ToTensor +
Normalize, as a torchvision training script needs them. "ours+norm" also normalises on the host.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as tv

from resnet_jax.data.loader import Loader
from resnet_jax.data.sources import ImageFolderSource, open_image_folder
from resnet_jax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize


def photo_like(rng: np.random.Generator, width: int = 500, height: int = 375) -> Image.Image:
    """Smooth colour fields plus fine noise: JPEG sizes and decode times close to real photos."""
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.int16)
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8))


def generate(root: Path, classes: int, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            photo_like(rng).save(root / f"class{c}" / f"{i:04d}.jpg", quality=90)


def warm_page_cache(folder: str) -> None:
    for dirpath, _, files in os.walk(folder):
        for name in files:
            Path(dirpath, name).read_bytes()


def time_ours(
    source: ImageFolderSource, train: bool, args: argparse.Namespace, host_normalize: bool
) -> float:
    loader = Loader(
        source, args.batch_size, train=train, image_size=args.image_size, workers=args.workers
    )
    start, count = time.perf_counter(), 0
    for batch in loader.epoch(0):
        if host_normalize:
            normalize(batch["image"])
        count += int(batch["mask"].sum())
    return count / (time.perf_counter() - start)


def time_torchvision(folder: str, train: bool, args: argparse.Namespace) -> float:
    size = args.image_size
    crop = (
        [tv.RandomResizedCrop(size), tv.RandomHorizontalFlip()]
        if train
        else [tv.Resize(round(size * 256 / 224)), tv.CenterCrop(size)]
    )
    transform = tv.Compose([*crop, tv.ToTensor(), tv.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    loader = DataLoader(
        datasets.ImageFolder(folder, transform),
        batch_size=args.batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=args.workers,
    )
    start, count = time.perf_counter(), 0
    for images, _ in loader:
        count += len(images)
    return count / (time.perf_counter() - start)


def compare(
    name: str, folder: str, source: ImageFolderSource, train: bool, args: argparse.Namespace
) -> None:
    sides = {
        "ours": lambda: time_ours(source, train, args, host_normalize=False),
        "ours+norm": lambda: time_ours(source, train, args, host_normalize=True),
        "torchvision": lambda: time_torchvision(folder, train, args),
    }
    for run in sides.values():  # warm-up: imports, worker start, allocator
        run()
    rates: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side, run in sides.items():
            rates[side].append(run())
    mean = {side: float(np.mean(r)) for side, r in rates.items()}
    tv_rate = mean["torchvision"]
    print(
        f"{name:5s} {len(source):5d} images  "
        + "  ".join(f"{side} {m:7.1f} img/s" for side, m in mean.items())
        + f"  ratio ours/torchvision {mean['ours'] / tv_rate:.2f}x"
        + f" (ours+norm {mean['ours+norm'] / tv_rate:.2f}x)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        help="ImageFolder root (train/ + val/, or class folders); "
        "default: generate 500x375 JPEGs in a temporary folder",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=2, help="A B alternations per mode")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)  # collation in the main process; workers use one thread each

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_dir) if args.data_dir else Path(tmp)
        if args.data_dir is None:  # eval reads the same generated images as train
            generate(root / "train", args.classes, args.per_class)
            (root / "val").symlink_to(root / "train")
        train_source, val_source, _ = open_image_folder(root)
        train_dir, val_dir = str(root / "train"), str(root / "val")
        print(
            f"data {args.data_dir or 'generated 500x375 JPEG'}, workers {args.workers}, "
            f"batch {args.batch_size}, {os.cpu_count()} CPUs, {args.rounds} rounds",
            flush=True,
        )
        warm_page_cache(train_dir)
        warm_page_cache(val_dir)
        compare("train", train_dir, train_source, True, args)
        compare("eval", val_dir, val_source, False, args)


if __name__ == "__main__":
    main()
