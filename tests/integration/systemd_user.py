"""A private systemd user manager for tests: real systemd running our real unit files.

PID 1 of this container is not systemd, and booting a system manager here would run the host's
sysinit units (tmpfiles would clean /tmp under everyone's feet). A *user* manager
(``systemd --user``) needs none of that: it runs as a child of the test, reads units from
``$XDG_CONFIG_HOME/systemd/user``, puts StateDirectory=/ConfigurationDirectory= and credentials
under the XDG directories given, and still applies Type=notify, WatchdogSec=, Restart=,
RestartPreventExitStatus=, LoadCredential= and the sandboxing (mount namespaces, seccomp,
NoNewPrivileges) because it runs as root. It lives in its own mount namespace (so the
``/run/systemd/system`` it insists on seeing exists only there) and in its own cgroup, which is
emptied and removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

SYSTEMD = Path("/lib/systemd/systemd")
CGROUP_ROOT = Path("/sys/fs/cgroup")

BOOT = """\
set -e
for h in {cgroups}; do mkdir -p "$h"; echo $$ > "$h/cgroup.procs"; done
# Our own copies of the mounts, shared among themselves only: systemd builds each service's
# namespace and credential mounts in children and expects them to propagate back to it.
mount --make-rprivate /
mount --make-rshared /
mkdir -p /run/systemd
mount -t tmpfs -o mode=755 tmpfs /run/systemd
mkdir -p /run/systemd/system /run/systemd/inaccessible
# What PID 1 creates at boot and every service namespace mounts over hidden paths.
cd /run/systemd/inaccessible
touch reg && mkdir dir && mknod chr c 0 0 && mknod blk b 0 0 && mkfifo fifo
{python} -c 'import os, stat; os.mknod("sock", stat.S_IFSOCK)'
chmod 0000 reg dir chr blk fifo sock
cd /
exec {systemd} --user --unit=edge-test.target {logargs}
"""


def usable() -> str | None:
    """Why a user manager cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (private mount namespace and cgroup)"
    if not SYSTEMD.exists() or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "needs systemd, unshare and nsenter"
    if not (CGROUP_ROOT / "systemd").is_dir() and not (CGROUP_ROOT / "cgroup.controllers").exists():
        return "no cgroup hierarchy for systemd"
    return None


class UserManager:
    """``systemd --user`` with ``config_home`` as ``$XDG_CONFIG_HOME`` and ``$XDG_STATE_HOME``: a
    unit's %E and %S (systemd 252 puts StateDirectory= of user units under $XDG_CONFIG_HOME, later
    versions under $XDG_STATE_HOME; both the same here, so %S/edge-agent is %E/edge-agent)."""

    def __init__(self, workdir: Path, config_home: Path):
        self.workdir = workdir
        self.config_home = config_home
        self.runtime = workdir / "runtime"
        self.runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.unit_dir = config_home / "systemd" / "user"
        self.unit_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "systemd.log"
        name = f"edge-test-{uuid.uuid4().hex[:8]}"
        if (CGROUP_ROOT / "cgroup.controllers").exists():  # unified
            self.cgroups = [CGROUP_ROOT / name]
        else:  # hybrid: systemd tracks units in name=systemd and the unified hierarchy
            self.cgroups = [CGROUP_ROOT / "systemd" / name]
            if (CGROUP_ROOT / "unified").is_dir():
                self.cgroups.append(CGROUP_ROOT / "unified" / name)
        self.env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(workdir / "home"),
            "XDG_RUNTIME_DIR": str(self.runtime),
            "XDG_CONFIG_HOME": str(config_home),
            "XDG_STATE_HOME": str(config_home),
            "XDG_DATA_HOME": str(workdir / "home" / "share"),
            "XDG_CACHE_HOME": str(workdir / "home" / "cache"),
            "LANG": "C.UTF-8",
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None

    def start(self, timeout: float = 20.0) -> UserManager:
        (self.workdir / "home").mkdir(exist_ok=True)
        (self.unit_dir / "edge-test.target").write_text("[Unit]\nDescription=tests\nDefaultDependencies=no\n")
        # Nothing of the user's own housekeeping: only the units under test.
        for unit in ("systemd-tmpfiles-setup.service", "systemd-tmpfiles-clean.timer"):
            link = self.unit_dir / unit
            if not link.is_symlink():
                link.symlink_to("/dev/null")
        script = BOOT.format(
            cgroups=" ".join(f'"{c}"' for c in self.cgroups),
            systemd=SYSTEMD,
            python=sys.executable,
            logargs=os.environ.get("EDGE_TEST_SYSTEMD_LOG", "--log-target=console --log-level=info"),
        )
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not (self.runtime / "systemd" / "private").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"systemd --user did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        assert self.proc is not None
        run = subprocess.run(
            ["nsenter", "-t", str(self.proc.pid), "-m", "systemctl", "--user", "--no-pager", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and run.returncode != 0:
            raise AssertionError(f"systemctl {' '.join(args)}: {run.returncode}\n{run.stdout}{run.stderr}")
        return run

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, unit: str, timeout: float, **expected: str) -> dict[str, str]:
        """Poll ``systemctl show`` until every property has the expected value."""
        deadline = time.monotonic() + timeout
        while True:
            props = self.show(
                unit, *expected, "ActiveState", "SubState", "Result", "ExecMainStatus", "NRestarts"
            )
            if all(props.get(k) == v for k, v in expected.items()):
                return props
            if time.monotonic() > deadline:
                raise AssertionError(f"{unit}: wanted {expected}, have {props}\n{self.status(unit)}")
            time.sleep(0.2)

    def status(self, unit: str) -> str:
        return self.systemctl("status", unit, "--lines=0", check=False).stdout

    def _pids(self) -> list[int]:
        pids: set[int] = set()
        for cg in self.cgroups:
            for procs in cg.rglob("cgroup.procs") if cg.exists() else []:
                try:
                    pids.update(int(p) for p in procs.read_text().split())
                except OSError:
                    continue
        return sorted(pids)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.systemctl("exit", check=False, timeout=60)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # Whatever a unit left behind lives in our cgroup and nowhere else.
        for _ in range(50):
            pids = self._pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for cg in self.cgroups:
            if cg.exists():
                for d in sorted(
                    (p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
                ):
                    d.rmdir()
                cg.rmdir()
        if self._log is not None:
            self._log.close()
