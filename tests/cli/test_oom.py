"""Out of memory ends the command lines in one `error:` line naming the sizes to lower: train.py
under `prlimit --as` (where XLA fails in Python or aborts in C++), and an allocation failing
inside the train step in process. tests/runtime/test_out_of_memory.py tests the parts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from resnet_jax.cli import convert, train
from resnet_jax.training.parallel import DataParallel
from tests.helpers import make_train_val_folder

REPO = Path(__file__).resolve().parents[2]
TINY = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "4",
        "--epochs", "1", "--workers", "1"]  # fmt: skip
SIZES = (
    "training resnet18 at --batch-size 4 and --image-size 32; lower either (or split batches "
    "with --accumulate-steps)"
)
# Enough address space to load JAX (runtime.out_of_memory.START_UP_BYTES), far too little to
# train even this: the 2-core machine needs about 950 MiB, more cores more.
LIMIT_MIB = 700


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("prlimit") is None,
    reason="needs Linux and util-linux's prlimit",
)
def test_train_under_an_address_space_limit_ends_in_one_line(tmp_path):
    data = make_train_val_folder(tmp_path / "images")
    output = tmp_path / "run"
    # prlimit takes bytes: util-linux 2.38 reads --as=4G as 4 bytes.
    command = ["prlimit", f"--as={LIMIT_MIB << 20}", sys.executable, "train.py", *TINY,
               "--data-dir", str(data), "--output-dir", str(output)]  # fmt: skip
    env = dict(os.environ, RESNET_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    out = subprocess.run(
        command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    expected = f"error: Out of memory under the address-space limit of {LIMIT_MIB} MiB (ulimit -v) "
    assert lines[-1].startswith(expected + SIZES + ", or raise the limit"), out.stderr
    assert sum(line.startswith("error:") for line in lines) == 1
    assert "Traceback" not in out.stderr
    half_written = list(output.rglob(".*.tmp")) if output.exists() else []
    assert half_written == []


@pytest.mark.parametrize(
    "error",
    [MemoryError(), jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 8.")],
    ids=["MemoryError", "RESOURCE_EXHAUSTED"],
)
def test_running_out_inside_the_train_step_is_the_line(error, tmp_path, monkeypatch, capsys):
    def jit_failing_step(self, options=None):
        def step(state, batch, totals):
            raise error

        return step

    monkeypatch.setenv("RESNET_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(DataParallel, "jit_train_step", jit_failing_step)
    status = train.main([*TINY, "--synthetic", "2", "--output-dir", str(tmp_path / "run")])
    assert status == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: Out of memory {SIZES}."


def test_running_out_while_converting_is_the_line(tmp_path, monkeypatch, capsys):
    def convert_failing(src, dst, arch):
        raise MemoryError

    monkeypatch.setattr("resnet_jax.weights.conversion.convert_file", convert_failing)
    src = tmp_path / "resnet18.pth"
    src.write_bytes(b"")
    status = convert.main([str(src), str(tmp_path / "resnet18.msgpack")])
    assert status == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == f"error: Out of memory converting {src}; close other programs."
