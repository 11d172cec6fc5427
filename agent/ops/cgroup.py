"""The learner's own cgroup inside the service's delegated subtree (cgroup v2).

systemd limits a service as a whole: the learner is a child of the daemon, in the same cgroup, so
``MemoryMax=`` and ``CPUWeight=`` in edge-agent.service bound daemon and learner together. With
``Delegate=`` the service owns its cgroup subtree, and the daemon can split it::

    edge-agent.service/     cgroup.subtree_control: +cpu +memory +pids
        main/               the daemon (cgroup v2 allows no processes in a node that distributes)
        learner/            memory.max, memory.high, cpu.weight, pids.max; every learner process

Then the kernel's OOM killer takes the learner, not the daemon, when a round outgrows its memory,
and the learner's CPU weight is relative to the daemon's. Where there is nothing to split (cgroup
v1 or hybrid hosts, no ``Delegate=``, not under systemd) :meth:`LearnerCgroup.for_this_process`
returns None and says why: the service-wide limits still hold.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC = Path("/proc")
MAIN, LEARNER = "main", "learner"
# systemd (>= 251) marks a delegated cgroup with this extended attribute.
DELEGATE_XATTRS = ("user.delegate", "trusted.delegate")


@dataclass(frozen=True)
class LearnerLimits:
    """Written into learner/; None leaves the kernel default (no limit, weight 100)."""

    memory_max: int | None = 1400 * 2**20  # a round peaks near 1.1 GB (README)
    memory_high: int | None = None
    cpu_weight: int | None = 20  # against main/'s 100: inference wins a contended core
    pids_max: int | None = 256


def unified_path(pid: int | str = "self", proc: Path = PROC) -> str | None:
    """The process's cgroup in the unified (v2) hierarchy, e.g. ``/system.slice/edge-agent.service``."""
    try:
        text = (proc / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def _is_delegated(directory: Path) -> bool:
    """systemd's delegation mark, or (for a service with its own User=) the files it chowns to that
    user on delegation: cgroup v2 lets a process write only what it owns."""
    for name in DELEGATE_XATTRS:
        try:
            if os.getxattr(directory, name) == b"1":
                return True
        except OSError:
            continue
    uid = os.geteuid()
    try:
        return uid != 0 and all(
            (directory / f).stat().st_uid == uid for f in ("cgroup.procs", "cgroup.subtree_control")
        )
    except OSError:
        return False


class LearnerCgroup:
    """``main/`` and ``learner/`` under the service's delegated cgroup ``service_dir``."""

    def __init__(self, service_dir: Path):
        self.service_dir = Path(service_dir)
        self.main_dir = self.service_dir / MAIN
        self.learner_dir = self.service_dir / LEARNER

    @classmethod
    def for_this_process(cls, cgroup_root: Path = CGROUP_ROOT, proc: Path = PROC) -> LearnerCgroup | None:
        """The cgroup of the running daemon when systemd delegated it; None (and why, logged) if not."""
        path = unified_path(proc=proc)
        if path is None:
            log.info("learner cgroup: no cgroup v2 hierarchy for this process; service-wide limits only")
            return None
        if not (cgroup_root / "cgroup.controllers").exists():
            log.info("learner cgroup: cgroup v1 or hybrid host; service-wide limits only")
            return None
        here = cgroup_root / path.lstrip("/")
        # Called again after setup(): the daemon already sits in main/.
        service_dir = here.parent if here.name == MAIN and _is_delegated(here.parent) else here
        if not _is_delegated(service_dir):
            log.info(
                "learner cgroup: %s is not delegated (Delegate= in the unit); service-wide limits only", here
            )
            return None
        return cls(service_dir)

    def controllers(self) -> set[str]:
        return set((self.service_dir / "cgroup.controllers").read_text().split())

    def setup(self, limits: LearnerLimits | None = None, pid: int | None = None) -> set[str]:
        """Move the daemon (``pid``, default this process) into main/, hand the controllers down and
        write the learner's limits. Idempotent. Returns the controllers in effect for learner/."""
        limits = limits or LearnerLimits()
        self.main_dir.mkdir(exist_ok=True)
        self.learner_dir.mkdir(exist_ok=True)
        (self.main_dir / "cgroup.procs").write_text(f"{pid or os.getpid()}\n")
        wanted = {"cpu", "memory", "pids"} & self.controllers()
        if wanted:
            try:
                (self.service_dir / "cgroup.subtree_control").write_text(
                    " ".join(f"+{c}" for c in sorted(wanted)) + "\n"
                )
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                # Another process (an ExecStartPre= leftover, a learner from before) is still here.
                log.warning(
                    "learner cgroup: %s still holds processes; learner limits not applied", self.service_dir
                )
                return set()
        values = {
            "memory.max": ("memory", limits.memory_max),
            "memory.high": ("memory", limits.memory_high),
            "cpu.weight": ("cpu", limits.cpu_weight),
            "pids.max": ("pids", limits.pids_max),
        }
        for name, (controller, value) in values.items():
            if controller in wanted:
                (self.learner_dir / name).write_text(f"{'max' if value is None else value}\n")
        log.info(
            "learner cgroup %s: controllers %s, memory.max %s, cpu.weight %s",
            self.learner_dir,
            ",".join(sorted(wanted)) or "none",
            limits.memory_max,
            limits.cpu_weight,
        )
        return wanted

    def add(self, pid: int) -> None:
        """Move a learner process into learner/ (right after ``Process.start()``)."""
        (self.learner_dir / "cgroup.procs").write_text(f"{pid}\n")

    def learner_memory(self) -> dict[str, int]:
        """What learner/ used: ``current``, ``peak`` (kernel >= 5.19) and ``oom_kill`` events."""
        out: dict[str, int] = {}
        for key, name in (("current", "memory.current"), ("peak", "memory.peak")):
            try:
                out[key] = int((self.learner_dir / name).read_text())
            except (OSError, ValueError):
                continue
        try:
            for line in (self.learner_dir / "memory.events").read_text().splitlines():
                k, v = line.split()
                if k == "oom_kill":
                    out["oom_kill"] = int(v)
        except (OSError, ValueError):
            pass
        return out


def prefer_oom_kill(adj: int = 500, pid: int | str = "self", proc: Path = PROC) -> bool:
    """Raise a process's ``oom_score_adj`` so the kernel kills it before the daemon; a process may
    raise its own without privileges. The learner calls it on itself first thing. False if refused."""
    try:
        (proc / str(pid) / "oom_score_adj").write_text(f"{adj}\n")
    except OSError as e:
        log.warning("oom_score_adj %s for %s refused: %s", adj, pid, e)
        return False
    return True
