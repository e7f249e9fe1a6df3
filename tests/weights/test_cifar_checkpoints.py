"""The public CIFAR ResNet checkpoints (Idelbayev's pytorch_resnet_cifar10: `.th` files holding
{'state_dict': a DataParallel state dict, 'best_prec1': ...}, classifier `linear`): read without
torch, detected, predicted with, converted and exported back to the same names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from resnet_jax import UserError, create_model
from resnet_jax.inference.predictor import Predictor
from resnet_jax.models.factory import init_variables
from resnet_jax.models.registry import CIFAR_EVAL
from resnet_jax.models.scan import stack_blocks
from resnet_jax.weights.conversion import convert_file
from resnet_jax.weights.io import load_variables, save_variables
from resnet_jax.weights.torch_names import (
    arch_from_torch_shapes,
    check_variables,
    flax_to_torch,
    torch_to_flax,
)
from tests.helpers import (
    TorchCifarResNet,
    nchw,
    numpy_state_dict,
    randomised_cifar_model,
    relative_error,
)

ROOT = Path(__file__).resolve().parents[2]


def save_like_pytorch_resnet_cifar10(path: Path, model: torch.nn.Module) -> Path:
    """What that project's trainer writes: the DataParallel model's state dict in a wrapper."""
    state = torch.nn.DataParallel(model).state_dict()
    assert all(key.startswith("module.") for key in state)
    torch.save({"state_dict": state, "best_prec1": 91.25}, path)
    return path


@pytest.fixture(scope="module")
def resnet20_file(tmp_path_factory):
    tmodel = randomised_cifar_model("resnet20", seed=3).eval()
    path = tmp_path_factory.mktemp("cifar") / "resnet20-12fca82f.th"
    return save_like_pytorch_resnet_cifar10(path, tmodel), tmodel


def torch_logits(tmodel: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return tmodel.eval()(nchw(x)).numpy()


def test_th_file_loads_and_gives_torchs_logits(resnet20_file):
    path, tmodel = resnet20_file
    variables = load_variables(path)  # the wrapper and the `module.` prefix are dropped
    assert variables["params"]["fc"]["kernel"].shape == (64, 10)
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    logits = create_model("resnet20").apply(variables, x)
    assert relative_error(logits, torch_logits(tmodel, x)) <= 2e-6


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"])
def test_every_depth_is_detected_from_names_and_shapes(name):
    n = (int(name.removeprefix("resnet")) - 2) // 6
    shapes = {k: tuple(v.shape) for k, v in TorchCifarResNet(n).state_dict().items()}
    assert arch_from_torch_shapes(shapes) == name


def test_detection_of_plain_and_option_b_networks():
    plain = {k: tuple(v.shape) for k, v in TorchCifarResNet(3, None).state_dict().items()}
    assert arch_from_torch_shapes(plain) == "resnet20"  # the same tensors: the residual twin
    option_b = {k: tuple(v.shape) for k, v in TorchCifarResNet(3, "B").state_dict().items()}
    with pytest.raises(UserError, match=r"not a known ResNet .*cifar stem, option B shortcuts"):
        arch_from_torch_shapes(option_b)
    with pytest.raises(UserError, match="Checkpoint key 'fc.weight' is not part of"):
        arch_from_torch_shapes({**plain, "fc.weight": (10, 64)})


def test_problems_are_named_with_the_checkpoints_names(resnet20_file):
    variables = load_variables(resnet20_file[0])
    del variables["params"]["fc"]["bias"]
    with pytest.raises(UserError, match=r"1 missing: linear\.bias"):
        check_variables(variables, "resnet20", num_classes=10)


def test_export_gives_the_checkpoints_names_back(resnet20_file, tmp_path):
    path, tmodel = resnet20_file
    assert convert_file(path, tmp_path / "r20.safetensors") == ("resnet20", 269_722)
    exported = load_file(tmp_path / "r20.safetensors")
    assert exported.keys() == tmodel.state_dict().keys()
    assert "linear.weight" in exported and "fc.weight" not in exported
    fresh = TorchCifarResNet(3)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(torch_logits(fresh, x), torch_logits(tmodel, x))


def test_scanned_variables_are_saved_one_entry_per_block(tmp_path):
    model = create_model("resnet56")
    variables = init_variables(model)
    assert "layer2_scan" in variables["params"]
    save_variables(tmp_path / "r56.msgpack", variables)
    loaded = load_variables(tmp_path / "r56.msgpack")
    assert "layer2_scan" not in loaded["params"] and "layer2_8" in loaded["params"]
    state = flax_to_torch(variables)
    want = randomised_cifar_model("resnet56").state_dict()
    assert state.keys() == want.keys()
    assert all(state[k].shape == tuple(want[k].shape) for k in want)
    assert jax.tree.all(jax.tree.map(np.array_equal, stack_blocks(loaded, model), variables))


def test_predictor_reads_a_th_file_with_cifars_transform(resnet20_file, tmp_path):
    path, tmodel = resnet20_file
    predictor = Predictor.load(path)
    assert predictor.transform == CIFAR_EVAL and predictor.classes == [str(i) for i in range(10)]
    images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    x = (images / np.float32(255) - np.float32(CIFAR_EVAL.mean)) / np.float32(CIFAR_EVAL.std)
    want = torch.softmax(torch.from_numpy(torch_logits(tmodel, x.astype(np.float32))), -1)
    np.testing.assert_allclose(predictor.predict_arrays(images), want.numpy(), atol=1e-6)


def test_torch_to_flax_round_trip_is_exact_for_option_b():
    state = numpy_state_dict(randomised_cifar_model("resnet20", shortcut="B"))
    back = flax_to_torch(torch_to_flax(state))
    assert back.keys() == state.keys()
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):
            assert np.array_equal(back[key], value), key


@pytest.mark.slow
def test_convert_weights_and_predict_command_lines_read_th_files(resnet20_file, tmp_path):
    path, _ = resnet20_file
    image = tmp_path / "cat.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(image)

    def run(script: str, *args: Path) -> subprocess.CompletedProcess:
        command = [sys.executable, str(ROOT / script), *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)

    assert "resnet20" in run("convert_weights.py", path, tmp_path / "r20.msgpack").stdout
    done = run("predict.py", image, "--weights", path)
    assert done.stdout.count("class: ") == 10 and "shown by index" in done.stderr
