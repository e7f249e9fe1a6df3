"""resnet_jax.inference.gradcam: the maps equal the class weights of the head on layer4, and a model trained
to find a bright square points at it."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from resnet_jax.inference.gradcam import gradcam, last_stage_name, upsample
from resnet_jax.models.blocks import BasicBlock, Bottleneck
from resnet_jax.models.factory import create_model, init_variables
from resnet_jax.models.preprocess import eval_logits, normalize
from resnet_jax.models.registry import EvalTransform
from resnet_jax.models.resnet import ResNet
from resnet_jax.training.steps import create_state, train_step, zero_totals

SIZE = 96  # layer4 is 3x3 at 96 px (stride 32)
SQUARE = 24


def _tiny(block: type = BasicBlock, **kwargs) -> ResNet:
    """One block per stage: the smallest ResNet with torchvision's layout."""
    return ResNet(block, [1, 1, 1, 1], **kwargs)


def _init(model: ResNet, seed: int) -> dict:
    """Fresh variables (drawn on the host: nothing is compiled)."""
    return init_variables(model, jax.random.key(seed))


def _logits(model: ResNet, variables: dict, images: np.ndarray, transform) -> np.ndarray:
    return np.asarray(
        jax.jit(lambda v, x: eval_logits(model.apply, v, x, transform))(variables, images)
    )


def _reference_maps(model: ResNet, variables: dict, images: np.ndarray, transform) -> np.ndarray:
    """Grad-CAM written out for a linear head: dy/dA is the class's weight row over h*w."""
    trunk = model.clone(include_top=False)
    features = jax.jit(trunk.apply)(variables, normalize(images, transform.mean, transform.std))
    features = np.asarray(features)
    params = variables["params"]
    weights = np.asarray(params["fc"]["kernel"])  # (C, classes of fc)
    if model.head == "append":
        weights = weights @ np.asarray(params["head"]["kernel"])
    top = np.argmax(_logits(model, variables, images, transform), -1)
    h, w = features.shape[1:3]
    maps = np.maximum(np.einsum("nhwc,cn->nhw", features, weights[:, top]) / (h * w), 0)
    return maps / np.maximum(maps.max(axis=(1, 2), keepdims=True), 1e-30)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 3},
        {"num_classes": 3, "head": "append", "frozen_stages": 5},
        {"num_classes": 3, "block": Bottleneck, "groups": 32, "width_per_group": 4},  # ResNeXt
    ],
)
def test_maps_are_the_head_weights_on_layer4_for_both_heads_and_blocks(kwargs):
    model = _tiny(**kwargs)
    variables = _init(model, 1)
    images = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    transform = EvalTransform(resize_size=110, crop_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3)

    probs, maps = jax.jit(lambda v, x: gradcam(model, v, x, transform))(variables, images)
    assert probs.shape == (4, 3) and maps.shape == (4, 3, 3)
    logits = _logits(model, variables, images, transform)
    np.testing.assert_allclose(probs, jax.nn.softmax(logits), atol=1e-6)
    want = _reference_maps(model, variables, images, transform)
    assert want.max() == 1.0  # the check below is not about all-zero maps
    np.testing.assert_allclose(maps, want, atol=1e-5)
    assert float(maps.min()) >= 0.0
    assert upsample(maps[0], SIZE).shape == (SIZE, SIZE)


def test_the_feature_map_is_the_last_stage_output():
    assert last_stage_name(_tiny()) == "layer4"
    assert last_stage_name(create_model("resnet56")) == "layer3"


def _squares(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy dark images; the odd ones have a bright square (class 1). Also its top-left corner."""
    images = rng.integers(0, 90, (n, SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.arange(n) % 2
    corners = rng.integers(0, SIZE - SQUARE + 1, (n, 2))
    for image, label, (y, x) in zip(images, labels, corners):
        if label:
            image[y : y + SQUARE, x : x + SQUARE] = 230
    return images, labels.astype(np.int32), corners


@pytest.fixture(scope="module")
def square_finder():
    """A tiny ResNet trained for a few dozen steps to tell images with a square from those without."""
    model = _tiny(num_classes=2)
    state = create_state(model.apply, optax.adam(1e-3), _init(model, 0))
    step = jax.jit(train_step)
    rng = np.random.default_rng(0)
    for _ in range(40):
        images, labels, _ = _squares(rng, 16)
        batch = {"image": images, "label": labels, "mask": np.ones(16, bool)}
        state, _ = step(state, batch, zero_totals())
    return model, {"params": state.params, "batch_stats": state.batch_stats}


def test_the_map_of_a_trained_model_lies_on_the_square(square_finder):
    model, variables = square_finder
    images, labels, corners = _squares(np.random.default_rng(1), 32)  # held out
    probs, maps = jax.jit(lambda v, x: gradcam(model, v, x))(variables, images)
    assert np.mean(np.argmax(probs, -1) == labels) >= 0.9  # it learned the task

    on_square, mass = [], []
    for cam, (y, x) in zip(np.asarray(maps)[labels == 1], corners[labels == 1]):
        heat = np.asarray(upsample(cam, SIZE))
        inside = np.zeros((SIZE, SIZE), bool)
        inside[y : y + SQUARE, x : x + SQUARE] = True
        peak = np.unravel_index(np.argmax(heat), heat.shape)
        near = np.zeros_like(inside)  # the square and one layer4 cell (32 px) around it
        near[max(y - 16, 0) : y + SQUARE + 16, max(x - 16, 0) : x + SQUARE + 16] = True
        on_square.append(near[peak])
        mass.append(heat[inside].mean() / heat[~inside].mean())
    assert np.mean(on_square) >= 0.9, on_square
    assert np.median(mass) >= 2.0, mass
