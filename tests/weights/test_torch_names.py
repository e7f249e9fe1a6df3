"""Conversion: every torchvision architecture, loaded without torch, gives torch's logits (the
CIFAR family's checkpoints: test_cifar_checkpoints.py)."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from resnet_jax import (
    ARCHITECTURES,
    UserError,
    check_variables,
    detect_arch,
    flax_to_torch,
    torch_to_flax,
)
from resnet_jax.weights.torch_names import arch_from_torch_shapes
from tests.helpers import nchw, numpy_state_dict, randomised_torch_model, relative_error

# Runs in a process where `import torch` fails: load both formats, convert, run, save logits.
NO_TORCH_RUN = """
import sys
sys.modules["torch"] = None
sys.modules["torchvision"] = None
import numpy as np
import resnet_jax
from resnet_jax.weights.torch_format import load_torch_state_dict
folder = sys.argv[1]
x = np.load(f"{folder}/input.npy")
for arch in sys.argv[2:]:
    zipped = load_torch_state_dict(f"{folder}/{arch}.pth")
    legacy = load_torch_state_dict(f"{folder}/{arch}-legacy.pth")
    assert zipped.keys() == legacy.keys() and all(np.array_equal(zipped[k], legacy[k]) for k in zipped)
    found = resnet_jax.detect_arch(zipped)
    variables = resnet_jax.torch_to_flax(zipped)
    resnet_jax.check_variables(variables, found)
    model = resnet_jax.create_model(found, num_classes=10)
    logits = model.apply(resnet_jax.stack_blocks(variables, model), x)
    np.save(f"{folder}/{arch}-{found}.npy", np.asarray(logits))
"""


TORCHVISION = [name for name, a in ARCHITECTURES.items() if a.stem == "imagenet"]


@pytest.fixture(scope="module")
def torch_checkpoints(tmp_path_factory):
    """Every architecture as zip and legacy .pth files, with torch's eval logits."""
    folder = tmp_path_factory.mktemp("checkpoints")
    x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
    np.save(folder / "input.npy", x)
    logits = {}
    for i, arch in enumerate(TORCHVISION):
        model = randomised_torch_model(arch, seed=i, num_classes=10).eval()
        with torch.no_grad():
            logits[arch] = model(nchw(x)).numpy()
        torch.save(model.state_dict(), folder / f"{arch}.pth")
        torch.save(
            model.state_dict(), folder / f"{arch}-legacy.pth", _use_new_zipfile_serialization=False
        )
    return folder, logits


@pytest.mark.slow
def test_every_architecture_matches_torch_without_torch(torch_checkpoints):
    folder, logits = torch_checkpoints
    subprocess.run(
        [sys.executable, "-c", NO_TORCH_RUN, str(folder), *logits], check=True, timeout=600
    )
    for arch, want in logits.items():
        got = np.load(folder / f"{arch}-{arch}.npy")  # the file name proves detect_arch was right
        assert relative_error(got, want) <= 1e-5, arch


@pytest.mark.parametrize("arch", ["resnet18", "resnext50_32x4d"])
def test_round_trip_is_exact_and_loads_into_torchvision(arch):
    model = randomised_torch_model(arch)
    state = numpy_state_dict(model)
    back = flax_to_torch(torch_to_flax(state))
    assert back.keys() == state.keys()
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):  # unused by torch's BatchNorm; written as 0
            assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key
    model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_conversion_copies_instead_of_aliasing():
    state = numpy_state_dict(randomised_torch_model("resnet18"))
    variables = torch_to_flax(state)
    state["bn1.running_mean"][:] = 123.0
    assert not np.any(variables["batch_stats"]["bn1"]["mean"] == 123.0)


def test_wrong_architecture_lists_the_problem_keys():
    variables = torch_to_flax(numpy_state_dict(randomised_torch_model("resnet34")))
    with pytest.raises(
        UserError, match=r"do not fit resnet18: .*unexpected: layer1\.2\.conv1\.weight"
    ):
        check_variables(variables, "resnet18")
    with pytest.raises(
        UserError,
        match=r"85 missing: .*wrong shape: layer1\.0\.conv1\.weight \(64, 64, 3, 3\) \(expected \(64, 64, 1, 1\)\)",
    ):
        check_variables(variables, "resnet50")


def test_truncated_checkpoint_and_wrong_head_are_refused():
    state = numpy_state_dict(randomised_torch_model("resnet18"))
    del state["layer4.1.bn2.running_var"]
    variables = torch_to_flax(state)
    with pytest.raises(UserError, match=r"1 missing: layer4\.1\.bn2\.running_var"):
        check_variables(variables, "resnet18")
    full = torch_to_flax(numpy_state_dict(randomised_torch_model("resnet18")))
    check_variables(full, "resnet18")
    with pytest.raises(UserError, match=r"fc\.weight \(1000, 512\) \(expected \(5, 512\)\)"):
        check_variables(full, "resnet18", num_classes=5)


def test_detect_arch_refuses_what_it_does_not_know():
    state = numpy_state_dict(randomised_torch_model("resnet18"))
    with pytest.raises(UserError, match="not a known ResNet"):
        detect_arch({k: v for k, v in state.items() if not k.startswith("layer4.1")})
    with pytest.raises(UserError, match="not a torchvision ResNet"):
        detect_arch({"classifier.weight": np.zeros((2, 2))})
    with pytest.raises(UserError, match="not part of a torchvision ResNet"):
        torch_to_flax({"classifier.weight": np.zeros((2, 2)), **state})


def test_arch_from_torch_shapes_needs_no_tensor_values():
    state = numpy_state_dict(randomised_torch_model("resnext50_32x4d"))
    shapes = {k: v.shape for k, v in state.items()}
    assert arch_from_torch_shapes(shapes) == "resnext50_32x4d"
    with pytest.raises(UserError, match=r"wrong shape: layer1\.0\.conv1\.weight"):
        arch_from_torch_shapes({**shapes, "layer1.0.conv1.weight": (64, 64, 1, 1)})
    # Skipped on the way in, so a large or unpaired one could hide data: refused instead.
    for key, shape in (("bn1.num_batches_tracked", (2**20,)), ("x.num_batches_tracked", ())):
        with pytest.raises(UserError, match=f"'{key}' is not part of"):
            arch_from_torch_shapes({**shapes, key: shape})


@pytest.mark.parametrize("dtype", ["complex64", "int64", "uint16", "float8_e4m3fn"])
def test_check_variables_refuses_non_float_weights(dtype):
    variables = torch_to_flax(numpy_state_dict(randomised_torch_model("resnet18")))
    variables["batch_stats"]["bn1"]["var"] = variables["batch_stats"]["bn1"]["var"].astype(
        jnp.dtype(dtype)
    )
    with pytest.raises(UserError, match=f"bn1.running_var is {dtype}"):
        check_variables(variables, "resnet18")
