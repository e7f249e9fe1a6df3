"""Images/s of resnet_jax.data.loader.Loader against torchvision's ImageFolder + DataLoader, per
core and by number of workers.

    python benchmarks/data_pipeline.py                                   # generated 500x375 JPEGs
    python benchmarks/data_pipeline.py --data-dir ../shared/data/flowers128 --limit 1000
    python benchmarks/data_pipeline.py --data-dir /tmp/photos4000 --make 4000x3000 \\
        --from ../shared/data/flowers128 --images 128                  # made once, then reused
    python benchmarks/data_pipeline.py --workers 1 2 4 8 16             # a bigger host

Both sides read the same files with the same transforms (RandomResizedCrop(224) + flip for
train, Resize(256) + CenterCrop(224) for eval) into uint8 batches, as our trainer takes them
(torchvision: PILToTensor, collated). Sides: ours (worker processes; training crops of JPEGs
decoded at reduced size where the crop allows), ours with threads, ours decoding in full
(bit-identical to torchvision), torchvision. Each side runs alternately, A B C A B C, to
cancel drift. "img/s" is wall-clock throughput; "img/CPU-s" counts the CPU time of the whole
process tree (loader process and workers), so it is images/s per fully busy core and holds up
on a shared machine where wall-clock figures do not.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as tv

from resnet_jax.data.loader import Loader
from resnet_jax.data.sources import ImageFolderSource, find_image_files, open_image_folder
from resnet_jax.data.transforms import (
    load_rgb,
    open_image,
    reduced_resized_crop,
    resized_crop,
    sample_crop,
)
from resnet_jax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD


def textured(seed: Image.Image, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """`seed` upscaled to width x height with texture at two scales: at JPEG quality 90 about
    2.2 bits per pixel, as camera photos are, with their decode times."""
    base = np.asarray(seed.convert("RGB").resize((width, height), Image.Resampling.BICUBIC))
    mid = rng.integers(0, 256, (max(height // 6, 1), max(width // 6, 1), 3), dtype=np.uint8)
    mid = np.asarray(Image.fromarray(mid).resize((width, height), Image.Resampling.BICUBIC))
    fine = rng.standard_normal((height, width, 1), dtype=np.float32)
    pixels = base + (mid.astype(np.float32) - 127.5) * (12 / 74) + fine * 4
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_one(job: tuple[str | None, str, int, int, int]) -> None:
    seed_path, out, width, height, seed = job
    rng = np.random.default_rng(seed)
    if seed_path is None:  # no photos: random colour fields
        seed_image = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    else:
        seed_image = Image.open(seed_path)
    textured(seed_image, width, height, rng).save(out, quality=90)


def make_images(root: Path, size: tuple[int, int], count: int, photos: str | None) -> None:
    """`count` JPEGs in ROOT/train/<class>/ made from the photos of PHOTOS/<class>/ (or, without
    photos, 5 classes of colour fields); ROOT/val links to ROOT/train."""
    if photos is not None:
        _, _, classes = open_image_folder(photos)
        folder = Path(photos) / "train" if (Path(photos) / "train").is_dir() else Path(photos)
        per_class = [find_image_files(folder / c) for c in classes]
    else:
        classes, per_class = [f"class{c}" for c in range(5)], [[None] * count] * 5
    jobs = []
    for k in range(count):
        c = k % len(classes)
        seed_path = per_class[c][(k // len(classes)) % len(per_class[c])]
        (root / "train" / classes[c]).mkdir(parents=True, exist_ok=True)
        jobs.append((seed_path, str(root / "train" / classes[c] / f"{k:05d}.jpg"), *size, k))
    with multiprocessing.get_context("spawn").Pool() as pool:
        pool.map(make_one, jobs, chunksize=4)
    (root / "val").symlink_to("train")


def subset(source: ImageFolderSource, limit: int | None) -> ImageFolderSource:
    """At most `limit` images, spread over the classes (a fixed random choice)."""
    if limit is None or limit >= len(source):
        return source
    samples = random.Random(0).sample(source.samples, limit)
    return ImageFolderSource(sorted(samples), source.classes)


def warm_page_cache(source: ImageFolderSource) -> None:
    for path, _ in source.samples:
        Path(path).read_bytes()


def cpu_seconds() -> float:
    """CPU time of this process, its live children and the children it has reaped."""
    me, reaped = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    total = me.ru_utime + me.ru_stime + reaped.ru_utime + reaped.ru_stime
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:  # ended between the listing and now
            continue
        total += times.user + times.system
    return total


def measure(run: Callable[[], int]) -> tuple[float, float]:
    """(images/s, images per CPU-second) of one epoch."""
    start, start_cpu = time.perf_counter(), cpu_seconds()
    count = run()
    return count / (time.perf_counter() - start), count / (cpu_seconds() - start_cpu)


def ours(loader: Loader) -> Callable[[], int]:
    """One epoch of `loader` per call; the worker processes start now, untimed."""
    epochs = iter(range(10**9))
    next(loader.epoch(next(epochs)))  # the generator is dropped: the epoch ends early

    def run() -> int:
        return sum(int(batch["mask"].sum()) for batch in loader.epoch(next(epochs)))

    return run


def torchvision_side(
    source: ImageFolderSource, folder: str, train: bool, workers: int, args, to_float: bool
) -> Callable[[], int]:
    """torchvision's ImageFolder + DataLoader on the same images; `to_float`: as its reference
    training recipe ends, ConvertImageDtype(float32) + Normalize, else uint8 batches."""
    size = args.image_size
    crop = (
        [tv.RandomResizedCrop(size), tv.RandomHorizontalFlip()]
        if train
        else [tv.Resize(round(size * 256 / 224)), tv.CenterCrop(size)]
    )
    crop.append(tv.PILToTensor())
    if to_float:
        crop += [tv.ConvertImageDtype(torch.float32), tv.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    chosen = {os.path.abspath(path) for path, _ in source.samples}
    dataset = datasets.ImageFolder(
        folder, tv.Compose(crop), is_valid_file=lambda p: os.path.abspath(p) in chosen
    )
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=train, drop_last=train, num_workers=workers
    )

    def run() -> int:
        return sum(len(images) for images, _ in loader)

    return run


def fidelity(source: ImageFolderSource, size: int, crops: int) -> None:
    """How far reduced decoding moves a training crop from torchvision's crop of the same box."""
    rng = np.random.default_rng(0)
    differences, reduced = [], 0
    for k in range(crops):
        path = source.samples[k % len(source)][0]
        full = load_rgb(path)
        box = sample_crop(full.height, full.width, rng)
        want = resized_crop(full, box, size).astype(np.float64)  # torchvision's pixels
        image = open_image(path)
        got = reduced_resized_crop(image, box, size)
        if image.size != full.size:  # decoded at reduced size
            reduced += 1
            differences.append(np.abs(got - want))
    if not differences:
        print(f"reduced decode: none of {crops} crops could be decoded at reduced size")
        return
    mse = np.array([np.mean(d**2) for d in differences])
    psnr = 10 * np.log10(255**2 / np.maximum(mse, 1e-12))
    print(
        f"reduced decode vs torchvision's crop of the same box: {reduced} of {crops} crops "
        f"decoded at reduced size; |difference| mean {np.mean([d.mean() for d in differences]):.2f}, "
        f"max {max(d.max() for d in differences):.0f} (of 255); PSNR mean {psnr.mean():.1f} dB, "
        f"min {psnr.min():.1f} dB",
        flush=True,
    )


def compare(name: str, folder: str, source: ImageFolderSource, train: bool, args) -> None:
    """One line per number of workers: each side's img/s and img/CPU-s, and the ratios."""
    mode = "train" if train else "eval"
    first: dict[str, float] = {}
    variants = {"ours": {"processes": True}}
    if not args.quick:
        variants["threads"] = {"processes": False}
        if train:
            variants["full decode"] = {"processes": True, "reduced_decode": False}
    for workers in args.workers:
        common = {"train": train, "image_size": args.image_size, "workers": workers}
        loaders = {
            side: Loader(source, args.batch_size, **common, **options)
            for side, options in variants.items()
        }
        sides = {side: ours(loader) for side, loader in loaders.items()}
        sides["torchvision"] = torchvision_side(source, folder, train, workers, args, True)
        if not args.quick:
            sides["torchvision uint8"] = torchvision_side(
                source, folder, train, workers, args, False
            )
        rates: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
        for _ in range(args.rounds):
            for side, run in sides.items():
                rates[side].append(measure(run))
        mean = {side: np.mean(r, axis=0) for side, r in rates.items()}
        first = first or {side: m[0] for side, m in mean.items()}
        tv_wall, tv_cpu = mean["torchvision"]
        cells = [
            f"{side} {wall:6.1f} img/s {cpu:6.1f} img/CPU-s (x{wall / first[side]:.2f})"
            for side, (wall, cpu) in mean.items()
        ]
        print(
            f"{name} {mode:5s} {len(source):5d} images, {workers:2d} workers: "
            + "; ".join(cells)
            + f"; ours/torchvision {mean['ours'][0] / tv_wall:.2f}x img/s, "
            f"{mean['ours'][1] / tv_cpu:.2f}x img/CPU-s",
            flush=True,
        )
        for loader in loaders.values():
            loader.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        help="ImageFolder root (train/ + val/, or class folders); with --make, where the made "
        "images go unless they are there already; default: 500x375 JPEGs in a temporary folder",
    )
    parser.add_argument("--make", metavar="WxH", help="make JPEGs of this size (default 500x375)")
    parser.add_argument("--from", dest="photos", help="an ImageFolder whose photos --make enlarges")
    parser.add_argument("--images", type=int, default=500, help="how many images --make makes")
    parser.add_argument("--limit", type=int, help="use at most this many images of each split")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=2, help="A B C alternations per setting")
    parser.add_argument("--modes", nargs="+", default=["train", "eval"], choices=["train", "eval"])
    parser.add_argument("--quick", action="store_true", help="only ours and torchvision")
    parser.add_argument(
        "--fidelity", type=int, default=200, metavar="N",
        help="first compare N reduced-decode training crops with torchvision's (0: skip)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)  # collation in the main process; workers use one thread each

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_dir or tmp)
        if (args.make or args.data_dir is None) and not (root / "train").is_dir():
            width, height = map(int, (args.make or "500x375").split("x"))
            start = time.perf_counter()
            make_images(root, (width, height), args.images, args.photos)
            print(f"made {args.images} JPEGs in {time.perf_counter() - start:.0f} s")
        train_source, val_source, _ = open_image_folder(root)
        with Image.open(train_source.samples[0][0]) as first:
            size = "x".join(map(str, first.size))
        print(
            f"data {root} (first image {size}), batch {args.batch_size}, "
            f"{len(os.sched_getaffinity(0))} CPUs, {args.rounds} rounds, "
            f"load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        name = root.name
        if args.fidelity:
            fidelity(subset(train_source, args.limit), args.image_size, args.fidelity)
        for mode in args.modes:
            train = mode == "train"
            source = subset(train_source if train else val_source, args.limit)
            warm_page_cache(source)
            compare(name, str(root / ("train" if train else "val")), source, train, args)


if __name__ == "__main__":
    main()
