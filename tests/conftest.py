"""Fixtures shared by folders of tests: a small torchvision model saved for predict.py, and a
private compilation cache for tests that run a command in this process."""

from __future__ import annotations

import json

import jax
import pytest
import torch

from tests.helpers import torch_resnet18, write_image

CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


@pytest.fixture(scope="module")
def predict_setup(tmp_path_factory):
    """A 5-class torchvision resnet18 saved with torch.save, its class file, and images."""
    root = tmp_path_factory.mktemp("predict")
    model = torch_resnet18(len(CLASSES), seed=2)  # a seed whose top-1 varies by image
    weights = root / "model" / "resnet18.pth"
    weights.parent.mkdir()
    torch.save(model.state_dict(), weights)
    (weights.parent / "class_indices.json").write_text(
        json.dumps({str(i): c for i, c in enumerate(CLASSES)}, indent=4)
    )
    folder = root / "images"
    folder.mkdir()
    sizes = [(300, 260), (240, 320), (256, 256)]
    images = [write_image(folder / f"img{i}.png", s, i) for i, s in enumerate(sizes)]
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image, ignored")
    return {"root": root, "model": model, "weights": weights, "images": images, "folder": folder}


@pytest.fixture(scope="module")
def private_compilation_cache(tmp_path_factory):
    """The commands turn JAX's persistent cache on: keep it out of ~/.cache, and off once the
    module is done."""
    names = [
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    ]
    saved = {n: getattr(jax.config, n) for n in names}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESNET_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
    for name, value in saved.items():
        jax.config.update(name, value)
