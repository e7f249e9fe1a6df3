"""resnet_jax.models.variables: the report of what keeps variables from fitting a model."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from resnet_jax.models.factory import create_model
from resnet_jax.models.variables import check_fits, expected_variables
from resnet_jax.runtime.errors import UserError

WANT = {
    ("params", "fc", "kernel"): jax.ShapeDtypeStruct((4, 2), np.float32),
    **{("params", f"w{i}"): jax.ShapeDtypeStruct((1,), np.float32) for i in range(7)},
}


def test_what_fits_passes_and_each_kind_is_named():
    fits = {"params": {"fc": {"kernel": np.zeros((4, 2))}, **{f"w{i}": [0.0] for i in range(7)}}}
    check_fits(fits, WANT, "no report")
    odd = {"params": {"fc": {"kernel": np.zeros((3, 2))}, "extra": np.zeros(1)}}
    with pytest.raises(UserError) as error:
        check_fits(odd, WANT, "These do not fit x", advice="try y")
    assert str(error.value) == (
        "These do not fit x: 7 missing: params/w0, params/w1, params/w2, params/w3, params/w4 "
        "and 2 more; 1 unexpected: params/extra; 1 wrong shape: params/fc/kernel (3, 2) "
        "(expected (4, 2)); try y."
    )


def test_names_and_shapes_as_the_user_knows_them():
    def upper(path, shape):
        return ".".join(path).upper(), shape[::-1]

    with pytest.raises(
        UserError, match=r"wrong shape: PARAMS.FC.KERNEL \(2, 3\) \(expected \(2, 4\)\)"
    ):
        check_fits({"params": {"fc": {"kernel": np.zeros((3, 2))}}}, WANT, "x", name=upper)


def test_expected_variables_of_a_model():
    want = expected_variables(create_model("resnet18", num_classes=3))
    assert want[("params", "fc", "kernel")].shape == (512, 3)
    assert want[("batch_stats", "bn1", "var")].shape == (64,)
