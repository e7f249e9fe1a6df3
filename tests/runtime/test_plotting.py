"""resnet_jax.runtime.plotting: matplotlib present, and missing (skipped, or one sentence)."""

from __future__ import annotations

import sys

import pytest

from resnet_jax.runtime.errors import UserError
from resnet_jax.runtime.plotting import matplotlib_figure
from resnet_jax.training.confusion import confusion_png
from resnet_jax.training.reporting import write_curves


def test_present():
    from matplotlib.figure import Figure

    assert matplotlib_figure() is Figure and matplotlib_figure("--cam") is Figure


def test_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert matplotlib_figure() is None
    with pytest.raises(UserError, match=r"^--cam needs matplotlib; install it with `pip install"):
        matplotlib_figure("--cam")
    # What training draws is skipped.
    assert confusion_png([[1]], ["a"], "title") is None
    history = [{"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": None}]
    write_curves(tmp_path / "curve.png", history)
    assert list(tmp_path.iterdir()) == []
