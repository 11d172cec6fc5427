"""agent.ops.cgroup against a cgroup v2 tree laid out as files (this container's hierarchy is
hybrid, with no v2 controllers to delegate): what it writes where, and in which order."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from agent.ops import cgroup
from agent.ops.cgroup import LearnerCgroup, LearnerLimits, prefer_oom_kill, unified_path

SERVICE = "system.slice/edge-agent.service"


class FakeTree:
    """/sys/fs/cgroup and /proc as plain files; records writes to cgroup.subtree_control."""

    def __init__(self, tmp: Path, controllers: str = "cpuset cpu io memory pids", delegated: bool = True):
        self.root = tmp / "cgroup"
        self.proc = tmp / "proc"
        (self.root).mkdir()
        (self.root / "cgroup.controllers").write_text(controllers + "\n")
        self.service = self.root / SERVICE
        self.service.mkdir(parents=True)
        for name in ("cgroup.procs", "cgroup.subtree_control"):
            (self.service / name).write_text("")
        (self.service / "cgroup.controllers").write_text(controllers + "\n")
        if delegated:
            os.setxattr(self.service, "user.delegate", b"1")
        self.in_cgroup(f"/{SERVICE}")

    def in_cgroup(self, path: str, pid: str = "self") -> None:
        d = self.proc / pid
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup").write_text(f"1:name=systemd:{path}\n0::{path}\n")


def test_unified_path_reads_the_v2_line(tmp_path):
    t = FakeTree(tmp_path)
    assert unified_path(proc=t.proc) == f"/{SERVICE}"
    (t.proc / "self" / "cgroup").write_text("4:memory:/x\n1:name=systemd:/y\n")  # v1 only
    assert unified_path(proc=t.proc) is None


def test_setup_moves_the_daemon_then_hands_controllers_down_then_limits(tmp_path, monkeypatch):
    t = FakeTree(tmp_path)
    cg = LearnerCgroup.for_this_process(cgroup_root=t.root, proc=t.proc)
    assert cg is not None and cg.service_dir == t.service
    order: list[str] = []
    real_write = Path.write_text

    def spy(self: Path, data: str, *a, **kw):
        order.append(f"{self.relative_to(t.service)}={data.strip()}")
        return real_write(self, data, *a, **kw)

    pytest.MonkeyPatch().setattr(Path, "write_text", spy)
    try:
        got = cg.setup(
            LearnerLimits(memory_max=1024 * 2**20, memory_high=900 * 2**20, cpu_weight=10, pids_max=64),
            pid=4242,
        )
    finally:
        pytest.MonkeyPatch().undo()
        Path.write_text = real_write  # type: ignore[method-assign]
    assert got == {"cpu", "memory", "pids"}
    # v2's no-internal-processes rule: the daemon leaves the service cgroup before it distributes
    assert order[0] == "main/cgroup.procs=4242"
    assert order[1] == "cgroup.subtree_control=+cpu +memory +pids"
    assert sorted(order[2:]) == [
        "learner/cpu.weight=10",
        "learner/memory.high=943718400",
        "learner/memory.max=1073741824",
        "learner/pids.max=64",
    ]
    cg.add(4343)
    assert (t.service / "learner" / "cgroup.procs").read_text() == "4343\n"


def test_no_limit_is_written_as_max_and_missing_controllers_are_skipped(tmp_path):
    t = FakeTree(tmp_path, controllers="memory")
    cg = LearnerCgroup.for_this_process(cgroup_root=t.root, proc=t.proc)
    assert cg.setup(LearnerLimits(memory_max=None, cpu_weight=5)) == {"memory"}
    assert (t.service / "learner" / "memory.max").read_text() == "max\n"
    assert not (t.service / "learner" / "cpu.weight").exists()
    assert (t.service / "main" / "cgroup.procs").read_text() == f"{os.getpid()}\n"


def test_found_again_from_main(tmp_path):
    t = FakeTree(tmp_path)
    LearnerCgroup.for_this_process(cgroup_root=t.root, proc=t.proc).setup()
    t.in_cgroup(f"/{SERVICE}/main")  # where the daemon now is
    again = LearnerCgroup.for_this_process(cgroup_root=t.root, proc=t.proc)
    assert again is not None and again.service_dir == t.service
    again.setup()  # idempotent


def test_not_delegated_or_not_v2_means_none(tmp_path, caplog, monkeypatch):
    t = FakeTree(tmp_path, delegated=False)
    # As root: a non-root daemon that owns the files counts as delegated (the next test).
    monkeypatch.setattr(cgroup.os, "geteuid", lambda: 0)
    caplog.set_level("INFO", logger=cgroup.__name__)
    assert LearnerCgroup.for_this_process(cgroup_root=t.root, proc=t.proc) is None
    assert "not delegated" in caplog.text
    (t.root / "cgroup.controllers").unlink()  # v1 / hybrid: no v2 controllers at the root
    assert LearnerCgroup.for_this_process(cgroup_root=t.root, proc=t.proc) is None
    assert "hybrid" in caplog.text


def test_files_owned_by_the_service_user_count_as_delegated(tmp_path, monkeypatch):
    t = FakeTree(tmp_path, delegated=False)
    # systemd chowns the delegated cgroup's files to the unit's User=
    uid = os.geteuid() if os.geteuid() != 0 else 4321
    for name in ("cgroup.procs", "cgroup.subtree_control"):
        os.chown(t.service / name, uid, -1)
    monkeypatch.setattr(cgroup.os, "geteuid", lambda: uid)
    found = LearnerCgroup.for_this_process(cgroup_root=t.root, proc=t.proc)
    assert found is not None and found.service_dir == t.service
    monkeypatch.setattr(cgroup.os, "geteuid", lambda: uid + 1)
    assert LearnerCgroup.for_this_process(cgroup_root=t.root, proc=t.proc) is None


def test_busy_service_cgroup_leaves_limits_unapplied(tmp_path, monkeypatch, caplog):
    t = FakeTree(tmp_path)
    cg = LearnerCgroup.for_this_process(cgroup_root=t.root, proc=t.proc)
    real_write = Path.write_text

    def busy(self: Path, data: str, *a, **kw):
        if self.name == "cgroup.subtree_control":
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real_write(self, data, *a, **kw)

    monkeypatch.setattr(Path, "write_text", busy)
    assert cg.setup() == set()
    assert not (t.service / "learner" / "memory.max").exists()
    assert "still holds processes" in caplog.text


def test_learner_memory_reads_peak_and_oom_kills(tmp_path):
    t = FakeTree(tmp_path)
    cg = LearnerCgroup(t.service)
    cg.learner_dir.mkdir()
    (cg.learner_dir / "memory.current").write_text("1000\n")
    (cg.learner_dir / "memory.peak").write_text("2000\n")
    (cg.learner_dir / "memory.events").write_text("low 0\nhigh 3\nmax 1\noom 1\noom_kill 1\n")
    assert cg.learner_memory() == {"current": 1000, "peak": 2000, "oom_kill": 1}


def test_prefer_oom_kill_on_a_real_process():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert prefer_oom_kill(700, pid=child.pid)
        assert Path(f"/proc/{child.pid}/oom_score_adj").read_text().strip() == "700"
    finally:
        child.kill()
        child.wait()
    assert not prefer_oom_kill(700, pid=child.pid)  # gone: refused, not raised
