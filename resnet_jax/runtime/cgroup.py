"""The memory limit of this process's control group, and the kernel's count of its OOM kills.

Under a cgroup memory limit (a container, a Slurm job, `systemd-run -p MemoryMax=`) allocations
do not fail: the kernel's OOM killer ends the process with SIGKILL, which no Python code sees.
A supervising parent can still tell that death from a `kill -9` by the cgroup's `oom_kill`
counter. Both cgroup v2 (`memory.max`, `memory.events`) and v1's memory controller
(`memory.limit_in_bytes`, `memory.oom_control`) are read; elsewhere both functions give None.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CGROUP_ROOT", "PROC_CGROUP", "memory_limit", "oom_kills"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")  # "ID:controllers:/path" per hierarchy
# (hierarchy's folder under CGROUP_ROOT, limit file, file holding the "oom_kill N" line)
_V2 = ("", "memory.max", "memory.events")
_V1 = ("memory", "memory.limit_in_bytes", "memory.oom_control")


def _hierarchy() -> tuple[list[Path], tuple[str, str, str]] | None:
    """This process's memory cgroup folder followed by its ancestors', and which layout."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return None
    found = {}
    for line in lines:  # v2's line is "0::/path"
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            found[_V2] = path
        elif "memory" in controllers.split(","):
            found[_V1] = path
    for layout in (_V1, _V2):  # a hybrid system has both lines; v1 holds the memory controller
        if layout not in found:
            continue
        base = CGROUP_ROOT / layout[0]
        leaf = base / found[layout].lstrip("/")
        if not (leaf / layout[1]).exists():  # a namespace that shows its own root only
            leaf = base
        if (leaf / layout[1]).exists():
            return [leaf, *[p for p in leaf.parents if p.is_relative_to(base)]], layout
    return None


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def memory_limit() -> int | None:
    """The smallest memory limit in bytes over this process's cgroup and its ancestors, or None
    when there is none below the machine's memory."""
    found = _hierarchy()
    if found is None:
        return None
    folders, (_, limit_file, _) = found
    limits = [n for n in (_read_limit(f / limit_file) for f in folders) if n is not None]
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    smallest = min(limits, default=None)
    return smallest if smallest is not None and smallest < physical else None


def oom_kills() -> int | None:
    """How many processes of this process's cgroup the OOM killer has ended so far, or None
    where the kernel does not count them."""
    found = _hierarchy()
    if found is None:
        return None
    folders, (_, _, events_file) = found
    try:
        lines = (folders[0] / events_file).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return None
