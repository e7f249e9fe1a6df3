"""resnet_jax.inference.predictor: agreement with torchvision, batches, bad images, class names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms as T

from resnet_jax.inference import predictor as inference
from resnet_jax.inference.predictor import Predictor
from resnet_jax.runtime.errors import UserError
from resnet_jax.weights.conversion import convert_file
from tests.helpers import torch_resnet18

CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


@pytest.fixture(scope="module")
def predictor(predict_setup):
    return Predictor.load(predict_setup["weights"])


def _torch_probs(model: torch.nn.Module, paths: list[Path]) -> np.ndarray:
    tf = T.Compose(
        [
            T.Resize(256),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return torch.softmax(model(x), dim=1).numpy()


def test_agrees_with_torchvision_and_compiles_once(predict_setup, predictor):
    assert predictor.classes == CLASSES
    assert predictor.model.num_classes == 5
    paths = predict_setup["images"]
    # Batch size 2 over 3 images: the last batch is padded, not dropped, not recompiled.
    predictions = predictor.predict_files(paths, batch_size=2)
    assert [p.image for p in predictions] == [str(p) for p in paths]
    ours = np.stack([p.probs for p in predictions])
    want = _torch_probs(predict_setup["model"], paths)
    assert want.max(axis=1).min() < 0.99  # the check below is not about saturated softmaxes
    np.testing.assert_array_equal(ours.argmax(1), want.argmax(1))
    np.testing.assert_allclose(ours, want, atol=1e-5, rtol=0)
    assert predictor._forward._cache_size() == 1


def test_appended_head_is_found_from_torch_names_and_agrees_with_torch(predict_setup, tmp_path):
    """torchvision's resnet18 followed by a Linear(1000, 5), saved with the extra layer as
    `head.weight` / `head.bias`: the head layout comes from the names, in every format."""
    model = torch_resnet18(1000, seed=3)
    torch.manual_seed(4)
    head = torch.nn.Linear(1000, len(CLASSES))
    state = {**model.state_dict(), **{f"head.{k}": v for k, v in head.state_dict().items()}}
    torch.save(state, tmp_path / "appended.pth")
    convert_file(tmp_path / "appended.pth", tmp_path / "appended.safetensors")
    assert {"fc.weight", "head.weight", "head.bias"} <= set(
        load_file(tmp_path / "appended.safetensors")
    )
    loaded = torchvision.models.resnet18().load_state_dict(
        load_file(tmp_path / "appended.safetensors"), strict=False
    )
    assert sorted(loaded.unexpected_keys) == ["head.bias", "head.weight"]
    assert not loaded.missing_keys
    predictor = Predictor.load(tmp_path / "appended.safetensors")
    assert predictor.model.head == "append" and predictor.model.num_classes == len(CLASSES)
    ours = np.stack([p.probs for p in predictor.predict_files(predict_setup["images"])])
    want = _torch_probs(torch.nn.Sequential(model, head).eval(), predict_setup["images"])
    np.testing.assert_allclose(ours, want, atol=1e-5, rtol=0)


def test_predict_arrays_matches_files(predict_setup, predictor):
    from resnet_jax.data.transforms import eval_transform_uint8, load_rgb

    path = predict_setup["images"][0]
    probs = predictor.predict_arrays(eval_transform_uint8(load_rgb(path))[None])
    assert probs.shape == (1, 5)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(probs[0], predictor.predict_files([path])[0].probs)


def test_bad_image_skipped_in_order(predict_setup):
    good = predict_setup["images"]
    broken = predict_setup["folder"] / "broken.jpg"
    small = Predictor.load(predict_setup["weights"], image_size=64)
    skipped = []
    paths = [good[0], broken, good[1], good[2]]
    predictions = small.predict_files(paths, batch_size=2, on_skip=skipped.append)
    assert [p.image for p in predictions] == [str(p) for p in good]
    assert [s.path for s in skipped] == [str(broken)]
    # Without on_skip, an unreadable image stops the run with a UserError naming it.
    with pytest.raises(UserError, match="broken.jpg"):
        small.predict_files(paths, batch_size=2)
    assert small._forward._cache_size() == 1


def test_find_images(predict_setup, tmp_path):
    found = inference.find_images([predict_setup["folder"], predict_setup["images"][0]])
    names = [p.name for p in found]
    assert names == ["broken.jpg", "img0.png", "img1.png", "img2.png", "img0.png"]
    with pytest.raises(UserError, match="does not exist"):
        inference.find_images([tmp_path / "missing.jpg"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="contains no images"):
        inference.find_images([tmp_path / "empty"])


def test_imagenet_names_fallback(tmp_path):
    names = inference.load_class_names(1000, tmp_path / "w.msgpack")
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"
    assert names == inference.imagenet_classes()


def test_class_file_size_mismatch(tmp_path):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"0": "a", "1": "b"}))
    with pytest.raises(UserError, match="2 classes but the weights have 5"):
        inference.load_class_names(5, tmp_path / "w.msgpack", path)
    with pytest.raises(UserError, match="does not exist"):
        inference.load_class_names(5, tmp_path / "w.msgpack", tmp_path / "nope.json")


def test_cam_maps_come_with_the_predictions(predict_setup, predictor):
    paths = predict_setup["images"]
    with_cam = predictor.predict_files(paths, batch_size=2, cam=True)
    without = predictor.predict_files(paths, batch_size=2)
    for a, b in zip(with_cam, without):
        assert a.image == b.image and b.cam is None
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)
        assert a.cam.shape == (7, 7) and a.cam.max() == 1.0 and a.cam.min() >= 0.0
