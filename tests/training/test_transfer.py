"""resnet_jax.training.transfer: the head swap of transfer learning, and weights that do not fit."""

from __future__ import annotations

import numpy as np
import pytest

from resnet_jax.models.factory import create_model
from resnet_jax.runtime.errors import UserError
from resnet_jax.training.transfer import initial_variables
from resnet_jax.weights.io import save_variables
from tests.helpers import flat


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """resnet18 variables with a 1000-class head, saved as a .msgpack file."""
    variables, _ = initial_variables(create_model("resnet18"), "resnet18", "none", seed=7)
    path = tmp_path_factory.mktemp("weights") / "imagenet.msgpack"
    save_variables(path, variables)
    return variables, path


def test_head_swap_keeps_backbone_and_makes_new_head(imagenet_like, tmp_path):
    pretrained, path = imagenet_like
    model = create_model("resnet18", num_classes=3)
    loaded, message = initial_variables(model, "resnet18", str(path), seed=0)
    assert "1000-class head replaced by a new 3-class head" in message
    got, want = flat(loaded), flat(pretrained)
    assert got["params/fc/kernel"].shape == (512, 3)
    assert not np.array_equal(got["params/fc/kernel"], want["params/fc/kernel"][:, :3])
    for key, value in want.items():
        if not key.startswith("params/fc/"):
            np.testing.assert_array_equal(got[key], value)

    # A file whose head already has 3 outputs keeps it (fine-tuning our own checkpoint).
    save_variables(tmp_path / "mine.msgpack", loaded)
    again, message = initial_variables(model, "resnet18", str(tmp_path / "mine.msgpack"), 1)
    assert "replaced" not in message
    np.testing.assert_array_equal(again["params"]["fc"]["kernel"], got["params/fc/kernel"])


def test_weights_of_another_arch_are_a_user_error(imagenet_like):
    model = create_model("resnet34", num_classes=3)
    with pytest.raises(UserError, match="do not fit resnet34"):
        initial_variables(model, "resnet34", str(imagenet_like[1]), 0)


def test_append_keeps_the_whole_pretrained_network_and_adds_a_head(imagenet_like, tmp_path):
    pretrained, path = imagenet_like
    model = create_model("resnet18", num_classes=3, head="append")
    loaded, message = initial_variables(model, "resnet18", str(path), seed=0)
    assert (
        message == "Loaded imagenet.msgpack; its 1000-class fc kept, a new 3-class head appended."
    )
    got, want = flat(loaded), flat(pretrained)
    assert got.keys() - want.keys() == {"params/head/kernel", "params/head/bias"}
    assert got["params/head/kernel"].shape == (1000, 3)
    for key, value in want.items():  # fc included
        np.testing.assert_array_equal(got[key], value)

    # An appended model of other classes keeps its fc and gets a new head; --head replace
    # drops both for a new fc.
    save_variables(tmp_path / "appended.msgpack", loaded)
    five = create_model("resnet18", num_classes=5, head="append")
    again, message = initial_variables(five, "resnet18", str(tmp_path / "appended.msgpack"), 1)
    assert "its 1000-class fc kept, its 3-class head replaced by a new 5-class head" in message
    np.testing.assert_array_equal(again["params"]["fc"]["kernel"], got["params/fc/kernel"])
    replaced, message = initial_variables(
        create_model("resnet18", num_classes=5), "resnet18", str(tmp_path / "appended.msgpack"), 1
    )
    assert "its 1000-class fc and 3-class head replaced by a new 5-class head" in message
    assert set(replaced["params"]) == set(pretrained["params"])


def test_append_needs_an_imagenet_fc(imagenet_like, tmp_path):
    model = create_model("resnet18", num_classes=3)
    three, _ = initial_variables(model, "resnet18", str(imagenet_like[1]), seed=0)
    save_variables(tmp_path / "three.msgpack", three)
    appended = create_model("resnet18", num_classes=3, head="append")
    with pytest.raises(UserError, match="keeps a pretrained 1000-class fc, but .* a 3-class fc"):
        initial_variables(appended, "resnet18", str(tmp_path / "three.msgpack"), 0)
