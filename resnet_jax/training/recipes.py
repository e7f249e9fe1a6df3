"""Published training recipes as values of `TrainConfig`'s fields: `--recipe NAME` sets them as
the flags' defaults, and flags given explicitly win (`config.recipe_config` for code).

- torchvision-v2: the recipe behind torchvision's ResNet-50 IMAGENET1K_V2 weights (76.130 ->
  80.858 top-1), the flags its reference scripts document: `--lr 0.5 --lr-scheduler
  cosineannealinglr --lr-warmup-epochs 5 --lr-warmup-method linear --auto-augment ta_wide
  --epochs 600 --random-erase 0.1 --weight-decay 0.00002 --norm-weight-decay 0.0
  --label-smoothing 0.1 --mixup-alpha 0.2 --cutmix-alpha 1.0 --train-crop-size 176
  --model-ema --val-resize-size 232 --ra-sampler --ra-reps 4` on 8 GPUs x 128 images, SGD with
  momentum 0.9, the EMA with its defaults (every 32 steps, decay 0.99998 adjusted), and the
  warm-up's start factor its default 0.01.
- cifar-paper: the CIFAR-10 recipe of He et al. 2015 (section 4.2): SGD momentum 0.9, lr 0.1,
  weight decay 1e-4, batch 128, lr / 10 at 32k and 48k iterations, stop at 64k; 4-pixel zero
  padding, a random 32x32 crop and a horizontal flip; evaluation of the 32x32 image as it is;
  resnet110 and resnet1202 warm up at lr 0.01 for the first 400 iterations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = ["RECIPES", "Recipe"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named set of option values; `values(arch)` may depend on the architecture."""

    title: str
    values: Callable[[str], dict[str, Any]]


def _torchvision_v2(arch: str) -> dict[str, Any]:
    return {
        "weights": "none", "optimizer": "sgd", "lr": 0.5, "weight_decay": 2e-5,
        "norm_weight_decay": 0.0, "schedule": "cosine", "warmup_epochs": 5.0,
        "warmup_method": "linear", "warmup_factor": 0.01, "epochs": 600, "batch_size": 1024,
        "label_smoothing": 0.1, "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "random_erase": 0.1,
        "auto_augment": "ta_wide", "ra_reps": 4, "image_size": 176, "eval_resize": 232,
        "eval_crop": 224, "model_ema": True, "model_ema_steps": 32, "model_ema_decay": 0.99998,
        "model_ema_adjust": True, "model_ema_warmup": "lr",
    }  # fmt: skip


# The paper's deepest models start at lr / 10 "until the training error is below 80% (about
# 400 iterations)".
CIFAR_WARMUP_ARCHS = ("resnet110", "resnet1202")


def _cifar_paper(arch: str) -> dict[str, Any]:
    values = {
        "dataset": "cifar10", "weights": "none", "optimizer": "sgd", "lr": 0.1,
        "weight_decay": 1e-4, "batch_size": 128, "schedule": "multistep",
        "lr_milestones": (32000, 48000), "lr_gamma": 0.1, "lr_step_unit": "steps",
        "max_steps": 64000, "train_crop_mode": "pad_crop", "crop_padding": 4, "image_size": 32,
        "eval_resize": 32, "eval_crop": 32,
    }  # fmt: skip
    if arch in CIFAR_WARMUP_ARCHS:
        values |= {"warmup_steps": 400, "warmup_method": "constant", "warmup_factor": 0.1}
    return values


RECIPES = {
    "torchvision-v2": Recipe("torchvision's ResNet-50 IMAGENET1K_V2 recipe", _torchvision_v2),
    "cifar-paper": Recipe("the ResNet paper's CIFAR-10 recipe", _cifar_paper),
}
