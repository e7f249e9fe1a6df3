"""XLA:CPU option defaults: added once, never over the user's own values, and effective."""

import os
import subprocess
import sys

import pytest

from resnet_jax import xla_flags
from resnet_jax.xla_flags import CPU_FLAGS, configure_xla, jaxlib_tested


@pytest.fixture
def tested(monkeypatch):
    monkeypatch.setattr(xla_flags, "jaxlib_tested", lambda: True)


def test_flags_are_added_once(tested):
    env = {}
    assert configure_xla(env) == list(CPU_FLAGS)
    assert env["XLA_FLAGS"].split() == list(CPU_FLAGS)
    assert configure_xla(env) == []
    assert env["XLA_FLAGS"].split() == list(CPU_FLAGS)


def test_user_values_win_and_other_flags_are_kept(tested):
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT"}
    added = configure_xla(env)
    assert added == ["--xla_cpu_experimental_ynn_fusion_type="]
    flags = env["XLA_FLAGS"].split()
    assert flags[:2] == [
        "--xla_dump_to=/tmp/x",
        "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT",
    ]
    assert sum(f.startswith("--xla_cpu_scheduler_type") for f in flags) == 1


def test_untested_jaxlib_gets_nothing(monkeypatch):
    monkeypatch.setattr(xla_flags, "jaxlib_tested", lambda: False)
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert configure_xla(env) == []
    assert env == {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("0.10.2", True),
        ("0.10.0.dev20260101", True),
        ("0.11.0", False),
        ("1.0", False),
        ("x", False),
    ],
)
def test_jaxlib_versions(version, expected):
    assert jaxlib_tested(version) is expected


CHECK = """
import jax, jax.numpy as jnp
from resnet_jax.xla_flags import configure_xla
if {configure}:
    configure_xla()
x, k = jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 32))
dims = ("NHWC", "HWIO", "NHWC")
conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dims)
print("__ynn_fusion" in jax.jit(conv).lower(x, k).compile().as_text())
"""


@pytest.mark.skipif(not jaxlib_tested(), reason="the flags are only set on tested jaxlibs")
def test_convolutions_leave_ynnpack_once_configured():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"

    def uses_ynnpack(configure: bool) -> str:
        code = CHECK.format(configure=configure)
        run = subprocess.run(
            [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    assert uses_ynnpack(configure=False) == "True"  # the default this module changes
    assert uses_ynnpack(configure=True) == "False"
