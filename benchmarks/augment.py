"""Images/s of each training transform on one core, ours against torchvision's, in one run.

    python benchmarks/augment.py --data-dir /work/shared/data/flowers128 --images 200 --rounds 5

Each image is decoded once up front; then each side transforms all of them, the sides
alternating (A B A B ...) so that drift and load hit both alike. "pipeline" is the whole training
transform (RandomResizedCrop + flip + augmentation, torchvision's reference-recipe order, the
output as a uint8 array); "augment only" is the augmentation alone on images already cropped to
the size. torch runs on one thread.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms as tv
from torchvision.transforms import autoaugment as tva

from resnet_jax.data.train_transform import TrainTransform
from resnet_jax.data.transforms import load_rgb

BILINEAR = tv.InterpolationMode.BILINEAR
RECIPES = {
    "none": None,
    "ta_wide": tva.TrivialAugmentWide(interpolation=BILINEAR),
    "randaugment": tva.RandAugment(interpolation=BILINEAR),
    "autoaugment": tva.AutoAugment(interpolation=BILINEAR),
}


def rate(transform: Callable, images: list) -> float:
    start = time.perf_counter()
    for image in images:
        transform(image)
    return len(images) / (time.perf_counter() - start)


def sides(name: str, size: int) -> dict[str, dict[str, Callable]]:
    """{"pipeline" | "augment only": {"ours": f, "torchvision": f}} for one recipe."""
    ours = TrainTransform(auto_augment=name)
    rng = np.random.default_rng(0)
    crop = [tv.RandomResizedCrop(size), tv.RandomHorizontalFlip()]
    theirs = tv.Compose(crop + ([RECIPES[name]] if RECIPES[name] else []))
    out = {
        "pipeline": {
            "ours": lambda image: ours(image, size, rng),
            "torchvision": lambda image: np.asarray(theirs(image)),
        }
    }
    if RECIPES[name]:
        augmentation = ours.augmentation()
        out["augment only"] = {
            "ours": lambda image: np.asarray(augmentation(image, rng)),
            "torchvision": lambda image: np.asarray(RECIPES[name](image)),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="a folder of images (searched deeply)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = sorted(
        p for p in Path(args.data_dir).rglob("*") if p.suffix.lower() in {".jpg", ".png"}
    )
    if not paths:
        parser.error(f"no .jpg or .png files under {args.data_dir}")
    step = max(1, len(paths) // args.images)
    photos = [load_rgb(p) for p in paths[::step][: args.images]]
    cropped = [tv.RandomResizedCrop(args.image_size)(p) for p in photos]
    print(
        f"{len(photos)} images, {args.image_size} px, one thread, {args.rounds} rounds alternating"
    )
    for name in RECIPES:
        for what, pair in sides(name, args.image_size).items():
            images = photos if what == "pipeline" else cropped
            for run in pair.values():  # warm-up
                rate(run, images[:20])
            rates = {side: [] for side in pair}
            for _ in range(args.rounds):
                for side, run in pair.items():
                    rates[side].append(rate(run, images))
            mean = {side: float(np.mean(r)) for side, r in rates.items()}
            print(
                f"{name:12s} {what:13s} ours {mean['ours']:7.1f} img/s  "
                f"torchvision {mean['torchvision']:7.1f} img/s  "
                f"ratio {mean['ours'] / mean['torchvision']:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
