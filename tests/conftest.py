"""Fixtures shared by the test modules."""

from __future__ import annotations

import jax
import pytest
from flax import traverse_util


@pytest.fixture(scope="session")
def flat():
    """tree -> {'params/layer1_0/conv1/kernel': host array, ...}."""
    return lambda tree: traverse_util.flatten_dict(jax.device_get(tree), sep="/")
