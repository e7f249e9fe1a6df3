"""resnet_jax.weights.conversion: one weights file or a folder of them into another format."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from resnet_jax.runtime.errors import UserError
from resnet_jax.weights.conversion import convert_file, convert_folder
from resnet_jax.weights.io import load_variables, save_variables
from resnet_jax.weights.torch_names import torch_to_flax
from tests.helpers import flat, numpy_state_dict, randomised_torch_model


@pytest.mark.parametrize("dtype", [np.complex64, np.int32, jnp.float8_e4m3fn], ids=str)
def test_convert_refuses_weights_that_are_not_floating_point(tmp_path, dtype):
    variables = torch_to_flax(numpy_state_dict(randomised_torch_model("resnet18")))
    variables["params"]["conv1"]["kernel"] = variables["params"]["conv1"]["kernel"].astype(dtype)
    save_variables(tmp_path / "odd.msgpack", variables)
    with pytest.raises(UserError, match=r"not floating point \(conv1\.weight is "):
        convert_file(tmp_path / "odd.msgpack", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_folder_converts_each_file_and_reports_the_bad_ones(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    model = torchvision.models.resnet18(num_classes=3)
    torch.save(model.state_dict(), src / "a.pth")
    save_variables(src / "b.msgpack", load_variables(src / "a.pth"))
    save_variables(src / "a.safetensors", load_variables(src / "a.pth"))  # a.msgpack again
    (src / "broken.pth").write_bytes(b"not a checkpoint")
    (src / "notes.txt").write_text("not weights")
    results = list(convert_folder(src, tmp_path / "out", ".msgpack"))
    assert [(s.name, d.name) for s, d, _ in results] == [
        ("a.pth", "a.msgpack"),
        ("a.safetensors", "a.msgpack"),
        ("b.msgpack", "b.msgpack"),
        ("broken.pth", "broken.msgpack"),
    ]
    outcome = {s.name: r for s, _, r in results}
    assert outcome["a.pth"] == ("resnet18", 11_178_051) == outcome["b.msgpack"]
    assert "would overwrite" in str(outcome["a.safetensors"])
    assert isinstance(outcome["broken.pth"], UserError)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.msgpack", "b.msgpack"]
    want = flat(load_variables(src / "a.pth"))
    got = flat(load_variables(tmp_path / "out" / "a.msgpack"))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_convert_folder_without_weights_is_one_sentence(tmp_path):
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(UserError, match="holds no weights file"):
        list(convert_folder(tmp_path, tmp_path / "out", ".msgpack"))
    (tmp_path / "a.pth").write_bytes(b"x")
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(UserError, match="is a file; give a folder"):
        list(convert_folder(tmp_path, tmp_path / "taken", ".msgpack"))
