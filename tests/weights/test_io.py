"""save_variables / load_variables round trips, atomic writes, and verified downloads."""

from __future__ import annotations

import contextlib
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.torch
import torch
import torchvision
from flax import serialization
from flax.core import freeze
from flax.training import train_state

from resnet_jax.runtime.errors import UserError
from resnet_jax.weights import io as weights
from resnet_jax.weights.io import load_variables, save_variables
from resnet_jax.weights.torch_names import torch_to_flax


def assert_trees_equal(a, b) -> None:
    assert isinstance(a, Mapping) == isinstance(b, Mapping)  # FrozenDict is a Mapping
    if isinstance(a, Mapping):
        assert sorted(a) == sorted(b)
        for k in a:
            assert_trees_equal(a[k], b[k])
    else:
        a, b = np.asarray(a), np.asarray(b)
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        assert a.tobytes() == b.tobytes()


def torchvision_resnet18() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.normal_()
        elif key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
    return state


def numpy_state(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in state.items()}


SMALL = {
    "params": {"conv1": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 2, 3, 2)}},
    "batch_stats": {"bn1": {"mean": np.ones(2, np.float32), "var": np.full(2, 2.0)}},
}


def test_msgpack_round_trip(tmp_path):
    variables = {
        "params": {"fc": {"kernel": jnp.ones((3, 2), jnp.bfloat16), "bias": jnp.zeros(2)}},
        "batch_stats": freeze({"bn1": {"mean": np.arange(4, dtype=np.float64)}}),
    }
    save_variables(tmp_path / "v.msgpack", variables)
    assert_trees_equal(load_variables(tmp_path / "v.msgpack"), variables)


def test_safetensors_loads_into_torchvision_and_back(tmp_path):
    state = torchvision_resnet18()
    variables = torch_to_flax(numpy_state(state))
    save_variables(tmp_path / "r18.safetensors", variables)

    loaded = safetensors.torch.load_file(tmp_path / "r18.safetensors")
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(loaded, strict=True)  # every key, num_batches_tracked included
    for key, tensor in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(tensor, state[key]), key

    assert_trees_equal(load_variables(tmp_path / "r18.safetensors"), variables)
    assert loaded["bn1.num_batches_tracked"].shape == torch.Size([])  # torchvision's shape


@pytest.mark.parametrize("suffix", [".pth", ".pt"])
def test_load_variables_from_torch_checkpoint(tmp_path, suffix):
    state = torchvision_resnet18()
    torch.save(state, tmp_path / f"r18{suffix}")
    assert_trees_equal(load_variables(tmp_path / f"r18{suffix}"), torch_to_flax(numpy_state(state)))


def test_unsupported_suffix_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UserError, match=r"\.msgpack or \.safetensors"):
        save_variables(tmp_path / "v.npz", SMALL)
    assert not (tmp_path / "v.npz").exists()
    (tmp_path / "v.h5").write_bytes(b"x")
    with pytest.raises(UserError, match="use a .msgpack"):
        load_variables(tmp_path / "v.h5")
    with pytest.raises(UserError, match="does not exist"):
        load_variables(tmp_path / "missing.msgpack")
    save_variables(tmp_path / "v.msgpack", SMALL)
    data = (tmp_path / "v.msgpack").read_bytes()
    (tmp_path / "cut.msgpack").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="damaged"):
        load_variables(tmp_path / "cut.msgpack")
    save_variables(tmp_path / "other.msgpack", {"opt_state": {"mu": np.zeros(2)}})
    with pytest.raises(UserError, match="no 'params'"):
        load_variables(tmp_path / "other.msgpack")


class TrainStateWithStats(train_state.TrainState):
    batch_stats: Any = None


def test_msgpack_of_a_whole_train_state_gives_its_variables(tmp_path):
    state = TrainStateWithStats.create(
        apply_fn=None,
        params=SMALL["params"],
        tx=optax.sgd(0.1, momentum=0.9),
        batch_stats=SMALL["batch_stats"],
    )
    (tmp_path / "state.msgpack").write_bytes(serialization.to_bytes(state))
    assert_trees_equal(load_variables(tmp_path / "state.msgpack"), SMALL)


@pytest.mark.parametrize(
    "tree, message",
    [
        ({"params": SMALL["params"], "batch_stats": 5}, "int at 'batch_stats'"),
        ({"params": {1: {"kernel": np.zeros(2)}}}, "non-string key 1 in 'params'"),
        ({"params": {"fc": {2: np.zeros(2)}}}, "non-string key 2 in 'params/fc'"),
        ({"params": {"fc": {"bias": "text"}}}, "str at 'params/fc/bias'"),
    ],
    ids=["number", "int_key", "nested_int_key", "string_leaf"],
)
def test_odd_msgpack_trees_are_refused_in_one_line(tmp_path, tree, message):
    (tmp_path / "odd.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    with pytest.raises(UserError, match=message):
        load_variables(tmp_path / "odd.msgpack")


def test_suffixes_are_case_insensitive(tmp_path):
    state = torchvision_resnet18()
    torch.save(state, tmp_path / "r18.PTH")
    variables = load_variables(tmp_path / "r18.PTH")
    assert_trees_equal(variables, torch_to_flax(numpy_state(state)))
    for name in ("r18.SafeTensors", "r18.MSGPACK"):
        save_variables(tmp_path / name, variables)
        assert_trees_equal(load_variables(tmp_path / name), variables)


def test_folder_and_unreadable_weights_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "weights.msgpack").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        load_variables(tmp_path / "weights.msgpack")
    save_variables(tmp_path / "v.msgpack", SMALL)

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(UserError, match="Cannot read .*Permission denied"):
        load_variables(tmp_path / "v.msgpack")


def test_torch_names_are_checked_before_tensors_are_read(tmp_path):
    state = dict(torchvision_resnet18())
    state["classifier.weight"] = torch.zeros(10, 512)
    torch.save(state, tmp_path / "w.pth")
    # Damage the storages: a reader that got past the names would report the damage.
    damaged = zipfile.ZipFile(tmp_path / "x.pth", "w")
    with zipfile.ZipFile(tmp_path / "w.pth") as src, damaged as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:4] if "/data/" in info.filename else data)
    with pytest.raises(UserError, match="'classifier.weight' is not part of a torchvision ResNet"):
        load_variables(tmp_path / "x.pth")


@pytest.mark.parametrize("suffix", [".msgpack", ".safetensors"])
def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"v{suffix}"
    save_variables(path, SMALL)
    before = path.read_bytes()

    class DiskFull:
        """Writes half of what it is given, then fails like a full disk."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

    real_atomic_write = weights.atomic_write

    @contextlib.contextmanager
    def failing_atomic_write(target, mode="wb"):
        with real_atomic_write(target, mode) as f:
            yield DiskFull(f)

    monkeypatch.setattr(weights, "atomic_write", failing_atomic_write)
    changed = {**SMALL, "params": {"conv1": {"kernel": -SMALL["params"]["conv1"]["kernel"]}}}
    with pytest.raises(UserError, match=r"Cannot write .*: the disk is full; free some space"):
        save_variables(path, changed)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left
