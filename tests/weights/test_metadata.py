"""resnet_jax.weights.metadata: weights files that carry their classes, eval transform and head layout."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import torchvision
from flax import serialization

from resnet_jax.inference.predictor import Predictor
from resnet_jax.models.factory import create_model, init_variables
from resnet_jax.models.registry import EvalTransform
from resnet_jax.runtime.errors import UserError
from resnet_jax.weights.conversion import convert_file
from resnet_jax.weights.io import load_variables, read_metadata, save_variables
from resnet_jax.weights.metadata import ModelMetadata

TRAINED = ModelMetadata(
    "resnet18",
    3,
    ("daisy", "roses", "tulips"),
    image_size=48,
    resize_size=55,
    crop_size=48,
    weights="ema",
)


@pytest.fixture(scope="module")
def variables():
    """Random resnet18 variables with a 3-class fc."""
    return init_variables(create_model("resnet18", num_classes=3))


@pytest.mark.parametrize("suffix", [".msgpack", ".safetensors"])
def test_round_trip_in_both_formats_and_through_convert(variables, tmp_path, suffix):
    path = tmp_path / f"best{suffix}"
    save_variables(path, variables, TRAINED)
    assert read_metadata(path) == TRAINED
    assert TRAINED.transform == EvalTransform(55, 48)
    other = ".safetensors" if suffix == ".msgpack" else ".msgpack"
    convert_file(path, tmp_path / f"converted{other}")
    assert read_metadata(tmp_path / f"converted{other}") == TRAINED


def test_files_stay_loadable_by_torch_and_older_readers(variables, tmp_path):
    save_variables(tmp_path / "best.safetensors", variables, TRAINED)
    state = safetensors.torch.load_file(tmp_path / "best.safetensors")
    torchvision.models.resnet18(num_classes=3).load_state_dict(state)
    # The header is the standard string table, readable without this package.
    header_size = int.from_bytes((tmp_path / "best.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "best.safetensors").read_bytes()[8 : 8 + header_size])
    assert header["__metadata__"]["image_size"] == "48"
    assert header["__metadata__"]["classes"] == '["daisy", "roses", "tulips"]'
    assert header["__metadata__"]["weights"] == "ema"

    save_variables(tmp_path / "best.msgpack", variables, TRAINED)
    tree = serialization.msgpack_restore((tmp_path / "best.msgpack").read_bytes())
    assert list(tree) == ["metadata", "batch_stats", "params"]  # metadata first: read alone
    assert sorted(load_variables(tmp_path / "best.msgpack")) == ["batch_stats", "params"]


def test_files_without_metadata_fall_back_to_the_registry(variables, tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "x.pth")
    save_variables(tmp_path / "plain.msgpack", variables)
    save_variables(tmp_path / "plain.safetensors", variables)
    for name in ("plain.msgpack", "plain.safetensors", "x.pth"):
        assert read_metadata(tmp_path / name) is None
    # torchvision's newer recipe for resnext101_64x4d was measured after a resize to 232.
    assert ModelMetadata.default("resnext101_64x4d", 1000).transform == EvalTransform(232, 224)
    assert ModelMetadata.default("resnet18", 5).transform == EvalTransform(256, 224)
    assert ModelMetadata.default("resnet18", 5).weights == "raw"
    predictor = Predictor.load(tmp_path / "plain.msgpack")
    assert predictor.transform == EvalTransform(256, 224)
    assert predictor.classes == ["0", "1", "2"]  # no names anywhere: indices


def test_predictor_uses_the_metadata_unless_told_otherwise(variables, tmp_path):
    save_variables(tmp_path / "best.msgpack", variables, TRAINED)
    (tmp_path / "class_indices.json").write_text(json.dumps({"0": "a", "1": "b", "2": "c"}))
    predictor = Predictor.load(tmp_path / "best.msgpack")
    assert predictor.transform == EvalTransform(55, 48) and predictor.image_size == 48
    assert predictor.classes == ["daisy", "roses", "tulips"]
    larger = Predictor.load(
        tmp_path / "best.msgpack", class_indices=tmp_path / "class_indices.json", image_size=96
    )
    assert larger.transform == EvalTransform(110, 96)  # the resize keeps 55/48
    assert larger.classes == ["a", "b", "c"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image_size": "forty"}, "'image_size' is 'forty'"),
        ({"num_classes": "0"}, "'num_classes' is '0'"),
        ({"classes": '["a"]'}, "'classes'"),
        ({"classes": '{"0": "a", "1": "b", "2": "c"}'}, "'classes'"),
        ({"std": "[0.2, 0.2, 0]"}, "'std'"),
        ({"arch": "resnet19"}, "'arch' is 'resnet19'"),
        ({"head": "prepend"}, "'head' is 'prepend'"),
        ({"weights": "swa"}, "'weights' is 'swa'"),
        ({"num_classes": None}, "'num_classes' is missing"),
    ],
)
def test_damaged_metadata_is_one_line(change, message, tmp_path):
    table = {k: v for k, v in {**TRAINED.to_strings(), **change}.items() if v is not None}
    with pytest.raises(UserError, match=message) as error:
        ModelMetadata.from_strings(table, tmp_path / "best.msgpack")
    assert "best.msgpack" in str(error.value) and "write the file again" in str(error.value)


def test_metadata_that_contradicts_the_tensors_is_refused(variables, tmp_path):
    wrong = ModelMetadata("resnet18", 5)
    save_variables(tmp_path / "best.msgpack", variables, wrong)
    for load in (Predictor.load, lambda p: convert_file(p, tmp_path / "x.safetensors")):
        with pytest.raises(UserError, match="describes a 5-class resnet18 .* 3-class resnet18"):
            load(tmp_path / "best.msgpack")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(UserError, match="cut.safetensors is damaged"):
        read_metadata(tmp_path / "cut.safetensors")
