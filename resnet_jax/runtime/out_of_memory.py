"""Running out of memory as a user error: one line saying what ran out and what to lower.

Python sees most of it: MemoryError (numpy, and C++'s std::bad_alloc where a binding converts
it), ENOMEM from the operating system, and XLA's RESOURCE_EXHAUSTED on CPU or GPU. What it
cannot see is XLA failing inside C++ under an address-space limit (`ulimit -v`, `prlimit
--as`): std::bad_alloc on a worker thread aborts the process, a failed thread creation is a
fatal CHECK, an unchecked failed mapping a segmentation fault, libgomp and OpenBLAS exit. Nor
the kernel's OOM killer under a cgroup memory limit (a container, a batch job): SIGKILL. Under
either limit `supervise` therefore runs the command in a forked child and reports in the one
line a child that ended without Python ending it, or that the OOM killer ended.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import sys
import warnings

from resnet_jax.runtime import cgroup
from resnet_jax.runtime.errors import UserError

try:
    import resource
except ImportError:  # Windows: no rlimits
    resource = None

__all__ = [
    "START_UP_BYTES",
    "address_space_limit",
    "check_address_space",
    "finished",
    "is_out_of_memory",
    "out_of_memory_error",
    "supervise",
]

# Below this address-space limit the imports of JAX, orbax or the extension fail (ImportError,
# SystemError: measured with `prlimit --as`); the smallest runs of the commands need more.
START_UP_BYTES = 512 << 20

# Signals that stop a command on purpose (a user, a scheduler), not a failed allocation.
_STOPS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL}
_CHILD_ENV = "RESNET_JAX_SUPERVISED"  # set in the child, which must not fork again
_finished_fd: int | None = None  # in a supervised child: the pipe `finished` writes to
_PR_SET_PDEATHSIG = 1  # prctl(2)


def address_space_limit() -> int | None:
    """The soft address-space limit in bytes (`ulimit -v`), or None when there is none."""
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else soft


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.0f} MiB"


def _limit_clause() -> str:
    limit = address_space_limit()
    if limit is not None:
        return f" under the address-space limit of {_mib(limit)} (ulimit -v)"
    limit = cgroup.memory_limit()
    return "" if limit is None else f" under the memory limit of {_mib(limit)} (cgroup)"


def out_of_memory_error(what: str, detail: str = "") -> UserError:
    """The one-line UserError for running out of memory; `what` names the run's sizes and what
    to lower, e.g. "training at --batch-size 4 and --image-size 32; lower either"."""
    limit = _limit_clause()
    raise_it = ", or raise the limit" if limit else ""
    return UserError(f"Out of memory{limit} {what}{raise_it}{detail}.")


def is_out_of_memory(error: BaseException | None) -> bool:
    """Whether `error` (or an error it was raised from) means an allocation failed."""
    while error is not None:
        if isinstance(error, MemoryError):
            return True
        if isinstance(error, OSError) and error.errno == errno.ENOMEM:
            return True
        if isinstance(error, RuntimeError) and str(error) == "can't start new thread":
            return True  # threading: pthread_create found no room for the thread's stack
        if type(error).__module__.startswith(("jax", "jaxlib")) and _says_out_of_memory(error):
            return True  # jax.errors.JaxRuntimeError, formerly jaxlib's XlaRuntimeError
        error = error.__cause__
    return False


def _says_out_of_memory(error: BaseException) -> bool:
    """XLA's words for a failed allocation: the status code, or (when a failure inside a
    computation surfaces as INTERNAL) its message."""
    message = str(error)
    return "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()


def check_address_space() -> None:
    """UserError when the address-space limit is too small for JAX to start at all."""
    limit = address_space_limit()
    if limit is not None and limit < START_UP_BYTES:
        raise UserError(
            f"The address-space limit (ulimit -v) is {_mib(limit)}, less than the "
            f"{_mib(START_UP_BYTES)} JAX needs to start; raise it (ulimit -v unlimited)."
        )


def supervise(what: str) -> int | None:
    """Under an address-space or cgroup memory limit, fork: the child gets None and runs the
    command, then calls `finished`; the parent waits and returns the child's exit status, or 1
    with `out_of_memory_error(what)`'s line when the child ended before `finished` (a C++ abort,
    a native library's exit) or the OOM killer ended it. Without a limit: None, no fork."""
    global _finished_fd
    if os.environ.get(_CHILD_ENV) or not hasattr(os, "fork"):
        return None
    if address_space_limit() is None and cgroup.memory_limit() is None:
        return None
    oom_kills = cgroup.oom_kills()
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()  # not inherited by the child's own subprocesses
    with warnings.catch_warnings():
        # numpy's idle OpenBLAS threads are the others; OpenBLAS shuts them down around fork.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    # Limits: the dying child's own output (a fatal CHECK, a C++ stack) stays above our line,
    # and under a limit any crash of the child is taken for a failed allocation.
    if pid == 0:
        os.close(read_end)
        _finished_fd = write_end
        os.environ[_CHILD_ENV] = "1"
        with contextlib.suppress(OSError, AttributeError):  # die with the parent (kill -9)
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        return None
    os.close(write_end)
    try:
        return _wait_for(pid, read_end, what, oom_kills)
    finally:
        os.close(read_end)


def finished() -> None:
    """In a supervised child: the command ended as Python ends it (a status, its own error
    line, a traceback), so the parent adds no line. Elsewhere nothing."""
    global _finished_fd
    if _finished_fd is not None:
        os.write(_finished_fd, b".")
        os.close(_finished_fd)
        _finished_fd = None


def _wait_for(pid: int, finished_fd: int, what: str, oom_kills: int | None) -> int:
    """The exit status of child `pid`, passing SIGTERM and SIGHUP on to it; `oom_kills`: the
    cgroup's count of OOM kills before the child started."""

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    # Ctrl-C reaches the child from the terminal itself; the child reports it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)  # -N: killed by signal N
    os.set_blocking(finished_fd, False)
    try:
        ended_in_python = os.read(finished_fd, 1) == b"."
    except BlockingIOError:  # a grandchild holds the other end
        ended_in_python = False
    killed_for_memory = (
        code == -signal.SIGKILL and oom_kills is not None and (cgroup.oom_kills() or 0) > oom_kills
    )
    if killed_for_memory:
        ended = out_of_memory_error(what, " (the kernel's OOM killer ended it)")
        print(f"error: {ended}", file=sys.stderr)
        return 1
    if ended_in_python or code == 0 or -code in _STOPS:
        return code if code >= 0 else 128 - code  # as a shell reports a killed command
    how = f"died of {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    print(f"error: {out_of_memory_error(what, f' (it {how} in native code)')}", file=sys.stderr)
    return 1
