"""resnet_jax.runtime.memory: freed memory is reused, not mapped afresh (in a fresh process each)."""

import subprocess
import sys

import pytest

from resnet_jax.runtime import memory

# A worker thread (as XLA's are) mallocs a block as large as a step's temporaries, writes it and
# frees it, three times; the minor page faults of each write are printed.
SCRIPT = """
import ctypes, resource, threading
from resnet_jax.runtime.memory import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 256 << 20
faults = []
def work():
    for _ in range(3):
        block = libc.malloc(SIZE)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ctypes.memset(block, 1, SIZE)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        libc.free(block)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(applied, *faults)
"""
PAGES = (256 << 20) // 4096


def run_script(env_value: str, monkeypatch, script: str = SCRIPT) -> list[str]:
    monkeypatch.setenv(memory.KEEP_MEMORY_ENV, env_value)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_a_freed_block_is_reused_without_page_faults(monkeypatch):
    applied, *faults = run_script("1", monkeypatch)
    assert applied == "True"
    assert int(faults[0]) > PAGES // 2  # the first write maps the block in
    assert all(int(f) < PAGES // 100 for f in faults[1:]), faults
    # Without the settings, glibc unmaps the block on free and every write faults it in again.
    applied, *faults = run_script("0", monkeypatch)
    assert applied == "False"
    assert all(int(f) > PAGES // 2 for f in faults), faults


# Steps dispatched one after another without waiting, as the trainer does: each has 128 MB of
# temporaries. Printed: the temporaries' size and the peak RSS after the first and the ninth.
QUEUED_STEPS_SCRIPT = """
from pathlib import Path
from resnet_jax.runtime.memory import keep_freed_memory
keep_freed_memory()
import jax, jax.numpy as jnp
def peak_mb():
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) >> 10 for line in status if line.startswith("VmHWM:"))
@jax.jit
def step(s, x):
    y = jnp.sort(x * s)  # each sort's result is a temporary of its own
    z = jnp.sort(y[::-1] + s)
    return s + 1e-6 * (z[:8] - y[:8]).sum()
x = jnp.ones(16 << 20)
temp = step.lower(1.0, x).compile().memory_analysis().temp_size_in_bytes >> 20
s = step(jnp.float32(1.0), x).block_until_ready()
first = peak_mb()
for _ in range(8):
    s = step(s, x)
s.block_until_ready()
print(temp, first, peak_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_queued_steps_reuse_one_steps_memory(monkeypatch):
    # With JAX's asynchronous CPU dispatch the next step allocated before the last had freed,
    # and the kept heap grew by a step's temporaries again and again (+640 MB here).
    temp, first, last = map(int, run_script("1", monkeypatch, QUEUED_STEPS_SCRIPT))
    assert temp >= 100
    assert last - first < temp // 2, (temp, first, last)


# A data worker's image buffers: blocks of 8 and 12 MB from the main thread, freed after use.
BLOCKS_SCRIPT = """
import ctypes, resource
from resnet_jax.runtime.memory import reuse_freed_blocks
applied = reuse_freed_blocks()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for size in (8 << 20, 12 << 20, 12 << 20):
    block = libc.malloc(size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(block, 1, size)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(block)
print(applied, *faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_image_sized_blocks_are_reused(monkeypatch):
    pages = (12 << 20) // 4096
    applied, *faults = run_script("1", monkeypatch, BLOCKS_SCRIPT)
    assert applied == "True"
    assert int(faults[2]) < pages // 100, faults  # the 12 MB block again: no new pages
    # Without the settings glibc maps blocks this large afresh and unmaps them on free.
    applied, *faults = run_script("0", monkeypatch, BLOCKS_SCRIPT)
    assert applied == "False"
    assert int(faults[2]) > pages // 2, faults


def test_left_alone_when_switched_off_or_jax_runs_on_an_accelerator(monkeypatch):
    monkeypatch.setenv(memory.KEEP_MEMORY_ENV, "0")
    assert not memory.keep_freed_memory()
    assert not memory.reuse_freed_blocks()
    monkeypatch.delenv(memory.KEEP_MEMORY_ENV)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert not memory.keep_freed_memory()
