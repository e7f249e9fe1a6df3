"""Tiny image folders and `train.py` subprocess runs shared by the training tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Small enough for seconds per epoch on a shared 2-core CPU (3 steps of 6 images at 48 px), and
# smooth enough (SGD, small lr, BatchNorm over 6 images of 2x2 or more pixels) that runs on one
# and two devices agree to float tolerance. The same flags everywhere share one compilation.
TINY = {"arch": "resnet18", "weights": "none", "image_size": 48, "batch_size": 6, "workers": 1,
        "optimizer": "sgd", "lr": 1e-3}  # fmt: skip
TINY_ARGS = [a for k, v in TINY.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def make_image_folder(root: Path, classes: int = 3, train: int = 6, val: int = 2) -> Path:
    """root/train/<class>/*.jpg and root/val/<class>/*.jpg: noise with one bright channel per
    class, so the classes can be learnt in a few steps."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (44, 40, 3)).astype(np.uint8)
                pixels[..., c % 3] += 150
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


def train_env(cache_dir: Path, devices: int = 1) -> dict[str, str]:
    """The environment for a `train.py` subprocess: a private compilation cache, N CPU devices."""
    env = dict(os.environ, RESNET_JAX_CACHE=str(cache_dir), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def run_train(
    args: list[str], env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in the repository root; output captured as text."""
    return subprocess.run(
        [sys.executable, "train.py", *args],
        check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
