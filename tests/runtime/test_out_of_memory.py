"""resnet_jax.runtime.out_of_memory: which errors mean memory ran out, the start-up floor, and the
supervised child whose abort still ends in the one line (in fresh processes: no JAX there)."""

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import pytest

from resnet_jax.runtime import cgroup
from resnet_jax.runtime import out_of_memory as oom
from resnet_jax.runtime.errors import UserError
from resnet_jax.runtime.files import atomic_write

LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="rlimits, fork: Linux")
SIZES = "training at --batch-size 4 and --image-size 32; lower either"

# Runs `cli.run` under a finite address-space limit far above what the process needs (so that
# it supervises), with the command given as argv[1]: a Python expression to evaluate.
SCRIPT = """
import os, resource, sys, time
from resnet_jax.runtime.errors import UserError
resource.setrlimit(resource.RLIMIT_AS, (64 << 30, resource.RLIM_INFINITY))
from resnet_jax.cli import run

def fail(message):
    raise UserError(message)

sys.exit(run(lambda: eval(sys.argv[1]), "training at --batch-size 4 and --image-size 32; lower either", program=True))
"""


# Under no address-space limit: touches 1 GiB, which only the kernel's OOM killer can stop.
CGROUP_SCRIPT = f"""
import sys
from resnet_jax.cli import run
sys.exit(run(lambda: len(b"x" * (1 << 30)), "{SIZES}", program=True))
"""


def run_supervised(command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, command], check=False, capture_output=True, text=True,
        timeout=60,
        **kwargs,
    )  # fmt: skip


def test_errors_that_mean_memory_ran_out():
    exhausted = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 bytes.")
    dispatch = jax.errors.JaxRuntimeError(
        "INTERNAL: Error dispatching computation: Out of memory allocating 2 bytes"
    )
    for error in (MemoryError(), OSError(errno.ENOMEM, "Cannot allocate memory"), exhausted,
                  dispatch, RuntimeError("can't start new thread")):  # fmt: skip
        assert oom.is_out_of_memory(error), error
    damaged = UserError("x.msgpack is damaged")
    damaged.__cause__ = MemoryError()
    assert oom.is_out_of_memory(damaged)
    for error in (None, ValueError("out of memory"), OSError(errno.ENOENT, "missing"),
                  jax.errors.JaxRuntimeError("INVALID_ARGUMENT: bad shape"),
                  RuntimeError("RESOURCE_EXHAUSTED in someone else's code")):  # fmt: skip
        assert not oom.is_out_of_memory(error), error


def test_the_line_names_the_limit_only_where_there_is_one(monkeypatch):
    monkeypatch.setattr(oom, "address_space_limit", lambda: None)
    monkeypatch.setattr(cgroup, "memory_limit", lambda: None)
    assert str(oom.out_of_memory_error(SIZES)) == f"Out of memory {SIZES}."
    monkeypatch.setattr(cgroup, "memory_limit", lambda: 2 << 30)
    assert str(oom.out_of_memory_error(SIZES)) == (
        f"Out of memory under the memory limit of 2048 MiB (cgroup) {SIZES}, or raise the limit."
    )
    monkeypatch.setattr(oom, "address_space_limit", lambda: 900 << 20)
    assert str(oom.out_of_memory_error(SIZES, " (it died of SIGABRT)")) == (
        f"Out of memory under the address-space limit of 900 MiB (ulimit -v) {SIZES}, or raise "
        "the limit (it died of SIGABRT)."
    )


def test_an_allocation_failing_mid_write_leaves_the_earlier_file(tmp_path):
    path = tmp_path / "best.msgpack"
    path.write_bytes(b"epoch 1")
    with pytest.raises(MemoryError), atomic_write(path) as f:
        f.write(b"half of epoch 2")
        raise MemoryError
    assert path.read_bytes() == b"epoch 1"
    assert os.listdir(tmp_path) == ["best.msgpack"]


@LINUX
@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux's prlimit")
def test_too_small_a_limit_to_load_jax_is_refused_at_once():
    limit = oom.START_UP_BYTES - (100 << 20)  # prlimit takes bytes: 2.38 reads "4G" as 4
    out = subprocess.run(
        ["prlimit", f"--as={limit}", sys.executable, "-c", "import resnet_jax.cli"],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stderr == (
        f"error: The address-space limit (ulimit -v) is {limit >> 20} MiB, less than the "
        f"{oom.START_UP_BYTES >> 20} MiB JAX needs to start; raise it (ulimit -v unlimited).\n"
    )


@LINUX
def test_a_supervised_child_ended_outside_python_ends_in_the_one_line():
    out = run_supervised("os.abort()")
    assert out.returncode == 1
    assert out.stderr == (
        "error: Out of memory under the address-space limit of 65536 MiB (ulimit -v) "
        f"{SIZES}, or raise the limit (it died of SIGABRT in native code).\n"
    )
    gone = run_supervised("os._exit(1)")  # as libgomp and OpenBLAS exit when they cannot go on
    assert gone.returncode == 1
    assert gone.stderr.endswith("raise the limit (it exited with status 1 in native code).\n")


@LINUX
def test_a_supervised_child_keeps_its_exit_status_and_its_own_errors():
    assert run_supervised("print('done') or 2").returncode == 2
    interrupted = run_supervised("exec('raise KeyboardInterrupt')")
    assert interrupted.returncode == 130 and "error:" not in interrupted.stderr
    done = run_supervised("print(os.environ.get('RESNET_JAX_SUPERVISED')) or 0")
    assert done.returncode == 0 and done.stdout == "1\n"  # it ran in the child
    failed = run_supervised("fail('Cannot read x.jpg.')")
    assert failed.returncode == 1 and failed.stderr == "error: Cannot read x.jpg.\n"
    nomem = run_supervised("bytearray(1 << 40)")  # over the limit: Python's MemoryError
    assert nomem.returncode == 1
    assert nomem.stderr == (
        "error: Out of memory under the address-space limit of 65536 MiB (ulimit -v) "
        f"{SIZES}, or raise the limit.\n"
    )


@LINUX
def test_the_supervisor_passes_sigterm_on_and_takes_its_child_along_when_killed():
    for sent, status in ((signal.SIGTERM, -signal.SIGTERM), (signal.SIGKILL, -signal.SIGKILL)):
        process = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, "print(os.getpid(), flush=True) or time.sleep(60)"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        child = int(process.stdout.readline())
        process.send_signal(sent)
        assert process.wait(timeout=30) in (status, 128 + sent)
        for _ in range(100):  # the child dies with the parent
            if not os.path.exists(f"/proc/{child}") or _zombie(child):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"child {child} outlived its supervisor ({sent.name})")


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A new cgroup v1 memory cgroup under this process's, limited to `limit` bytes: its
    cgroup.procs file. Skips where none can be made (not root, cgroup v2's internal process
    rule, no memory controller)."""
    found = cgroup._hierarchy()
    if found is None or found[1][0] != "memory":
        pytest.skip("no cgroup v1 memory controller to make a limited cgroup in")
    folder = found[0][0] / f"resnet_jax_test_{os.getpid()}"
    try:
        folder.mkdir()
        (folder / "memory.limit_in_bytes").write_text(str(limit))
    except OSError as e:
        pytest.skip(f"cannot make a memory cgroup: {e}")
    with contextlib.suppress(OSError):  # no swap to escape into where there is swap
        (folder / "memory.memsw.limit_in_bytes").write_text(str(limit))
    try:
        yield folder / "cgroup.procs"
    finally:
        for _ in range(100):  # its processes are gone once the OOM kill is reaped
            with contextlib.suppress(OSError):
                folder.rmdir()
                break
            time.sleep(0.05)


@LINUX
def test_the_oom_killer_under_a_cgroup_limit_ends_in_the_one_line():
    with memory_cgroup(300 << 20) as procs:
        command = f"echo $$ > {procs} && exec {sys.executable} -c '{CGROUP_SCRIPT}'"
        out = subprocess.run(
            ["sh", "-c", command], check=False, capture_output=True, text=True, timeout=60
        )
    assert out.returncode == 1
    assert out.stderr == (
        f"error: Out of memory under the memory limit of 300 MiB (cgroup) {SIZES}, or raise "
        "the limit (the kernel's OOM killer ended it).\n"
    )


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
