"""Fixtures shared by the test modules: torchvision references and comparison helpers.

torch is the reference every parity test measures us against; the helpers below are what those
tests share. Each is a fixture of the same name (`def test_x(relative_error): ...`).
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import traverse_util

from resnet_jax.convert import torch_to_flax
from resnet_jax.models import ResNet
from resnet_jax.torch_format import LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION


@pytest.fixture(scope="session")
def flat():
    """tree -> {'params/layer1_0/conv1/kernel': host array, ...}."""
    return lambda tree: traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def _randomised_torch_model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A torchvision model whose BatchNorm parameters and running statistics are all random.

    `resnext14_32x4d` is a one-block-per-stage grouped model used where depth would hurt.
    """
    torch.manual_seed(seed)
    if name == "resnext14_32x4d":
        resnet = torchvision.models.resnet
        model = resnet.ResNet(
            resnet.Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4, **kwargs
        )
    else:
        model = getattr(torchvision.models, name)(**kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _relative_error(got, want) -> float:
    """max |got - want| / max |want|: the error measure used for every comparison with torch."""
    want = np.asarray(want)
    return float(np.abs(np.asarray(got) - want).max() / max(np.abs(want).max(), 1e-12))


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _torch_step(tmodel: torch.nn.Module, x: np.ndarray, labels: np.ndarray) -> dict:
    """torch's eval logits, then one train-mode forward and backward: logits, gradients and
    updated running statistics, with Flax names."""
    with torch.no_grad():
        eval_logits = tmodel.eval()(_nchw(x)).numpy()
    logits = tmodel.train()(_nchw(x))
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
    grads = {n: p.grad.numpy() for n, p in tmodel.named_parameters()}
    return {
        "eval_logits": eval_logits,
        "logits": logits.detach().numpy(),
        "batch_stats": torch_to_flax(_numpy_state_dict(tmodel))["batch_stats"],
        "grads": torch_to_flax(grads)["params"],
    }


@partial(jax.jit, static_argnums=0)  # one compilation: op by op takes twice as long
def _flax_step(model: ResNet, variables: dict, x: np.ndarray, labels: np.ndarray) -> dict:
    """What `torch_step` returns, from our model."""

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
        loss = -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1))
        return loss, (logits, updates["batch_stats"])

    grads, (logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(variables["params"])
    eval_logits = model.apply(variables, x, train=False)
    return {
        "eval_logits": eval_logits,
        "logits": logits,
        "batch_stats": batch_stats,
        "grads": grads,
    }


def _step_errors(got: dict, want: dict) -> dict[str, float]:
    """The relative error of every output, running statistic and gradient, by name."""
    errors = {}
    for part, tree in got.items():
        flat_want = dict(jax.tree_util.tree_leaves_with_path(want[part]))
        flat_got = jax.tree_util.tree_leaves_with_path(tree)
        assert len(flat_got) == len(flat_want), part
        for path, leaf in flat_got:
            errors[part + jax.tree_util.keystr(path)] = _relative_error(leaf, flat_want[path])
    return errors


def _tensorboard_series(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    series = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}
    for tag in tags["images"]:
        series[tag] = [(e.step, e.encoded_image_string) for e in events.Images(tag)]
    return series


# ---------------------------------------------------------------- the helpers as fixtures


@pytest.fixture(scope="session")
def randomised_torch_model():
    """name, seed=0, **kwargs -> a torchvision model with random BatchNorm statistics."""
    return _randomised_torch_model


@pytest.fixture(scope="session")
def numpy_state_dict():
    """torch model -> {name: NumPy array}."""
    return _numpy_state_dict


@pytest.fixture(scope="session")
def relative_error():
    """max |got - want| / max |want|, the measure of every comparison with torch."""
    return _relative_error


@pytest.fixture(scope="session")
def nchw():
    """NHWC NumPy images -> an NCHW torch tensor."""
    return _nchw


@pytest.fixture(scope="session")
def torch_step():
    """torch's eval logits, train logits, gradients and running statistics, Flax names."""
    return _torch_step


@pytest.fixture(scope="session")
def flax_step():
    """What torch_step returns, from our model (jitted)."""
    return _flax_step


@pytest.fixture(scope="session")
def step_errors():
    """The relative error of every entry of two step results, by name."""
    return _step_errors


@pytest.fixture(scope="session")
def tensorboard_series():
    """A folder of event files -> {tag: [(step, value or PNG bytes)]}, read by TensorBoard's
    own reader (restart markers applied)."""
    return _tensorboard_series


# ---------------------------------------------------------------- hand-written .pth files


class _OldStorage:
    """A storage as torch 0.x pickled it: by persistent id, possibly as a view of another."""

    def __init__(self, key, numel, view=None):
        self.key, self.numel, self.view = key, numel, view


class _OldTensor:
    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return torch._utils._rebuild_tensor, self.args  # the pre-0.4 rebuild function


def _write_old_legacy(path: Path, obj, storages: dict[str, np.ndarray]) -> None:
    """Write a pre-1.6 file by hand, the way torch 0.3 did (no _rebuild_tensor_v2)."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _OldStorage):
                return ("storage", torch.FloatStorage, o.key, "cpu", o.numel, o.view)
            return None

    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(obj)
        pickle.dump(sorted(storages), f, protocol=2)
        f.writelines(struct.pack("<q", v.size) + v.tobytes() for _, v in sorted(storages.items()))


def _write_zip(path: Path, pickled: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")


def _write_legacy(path: Path, pickled: bytes, *, in_header: bool = False) -> None:
    with open(path, "wb") as f:
        if in_header:  # the payload replaces the magic number
            f.write(pickled)
            return
        for header in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(pickled)
        pickle.dump([], f, protocol=2)


@pytest.fixture(scope="session")
def OldStorage():
    """A storage as torch 0.x pickled it (by persistent id): OldStorage(key, numel, view=None)."""
    return _OldStorage


@pytest.fixture(scope="session")
def OldTensor():
    """A tensor record with the pre-0.4 rebuild function: OldTensor(storage, offset, size, stride, ...)."""
    return _OldTensor


@pytest.fixture(scope="session")
def write_old_legacy():
    """write_old_legacy(path, obj, storages): a pre-1.6 .pth written the way torch 0.3 did."""
    return _write_old_legacy


@pytest.fixture(scope="session")
def write_zip():
    """write_zip(path, pickled): a zip-format .pth around raw pickle bytes."""
    return _write_zip


@pytest.fixture(scope="session")
def write_legacy():
    """write_legacy(path, pickled, in_header=False): a legacy-format .pth around raw pickle bytes."""
    return _write_legacy
