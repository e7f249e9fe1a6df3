"""resnet_jax.runtime.cgroup: the memory limit and OOM-kill count of cgroup v2 and v1 layouts,
read from folders the tests make."""

from pathlib import Path

import pytest

from resnet_jax.runtime import cgroup

GIB = 1 << 30


def fake(monkeypatch, tmp_path: Path, proc: str, files: dict[str, str]) -> None:
    """Points the module at `tmp_path` as /sys/fs/cgroup, with `proc` as /proc/self/cgroup."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "proc").write_text(proc)
    monkeypatch.setattr(cgroup, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(cgroup, "PROC_CGROUP", tmp_path / "proc")


def test_v2_the_smallest_limit_of_the_cgroup_and_its_ancestors(monkeypatch, tmp_path):
    fake(monkeypatch, tmp_path, "0::/job/step\n", {
        "job/memory.max": f"{2 * GIB}\n",
        "job/step/memory.max": "max\n",
        "job/step/memory.events": "low 0\nhigh 0\nmax 4\noom 1\noom_kill 3\noom_group_kill 0\n",
    })  # fmt: skip
    assert cgroup.memory_limit() == 2 * GIB
    assert cgroup.oom_kills() == 3


def test_v1_memory_controller_on_a_hybrid_system(monkeypatch, tmp_path):
    fake(monkeypatch, tmp_path, "4:memory:/box\n1:cpu:/\n0::/\n", {
        "memory/memory.limit_in_bytes": "9223372036854771712\n",  # v1's "no limit"
        "memory/box/memory.limit_in_bytes": f"{GIB}\n",
        "memory/box/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
    })  # fmt: skip
    assert cgroup.memory_limit() == GIB
    assert cgroup.oom_kills() == 0


@pytest.mark.parametrize("limit", ["max\n", "9223372036854771712\n"])
def test_no_limit_below_the_machines_memory_is_none(monkeypatch, tmp_path, limit):
    fake(monkeypatch, tmp_path, "0::/job\n", {"job/memory.max": limit, "job/memory.events": ""})
    assert cgroup.memory_limit() is None
    assert cgroup.oom_kills() is None  # no oom_kill line: an old kernel


def test_a_namespace_showing_only_its_own_root(monkeypatch, tmp_path):
    fake(monkeypatch, tmp_path, "0::/outside/path\n", {
        "memory.max": f"{GIB}\n", "memory.events": "oom_kill 2\n",
    })  # fmt: skip
    assert cgroup.memory_limit() == GIB
    assert cgroup.oom_kills() == 2


def test_no_cgroups_at_all(monkeypatch, tmp_path):
    monkeypatch.setattr(cgroup, "PROC_CGROUP", tmp_path / "missing")
    assert cgroup.memory_limit() is None and cgroup.oom_kills() is None
