"""edge-agent.service run by real systemd: the tree `edge-agent install --root` lays out, the unit
file as installed, a private ``systemd --user`` manager (tests/integration/systemd_user.py; PID 1
here is not systemd). systemd waits for READY=1, watches the watchdog pings, kills a hung daemon
and restarts it, and leaves a config error alone; the daemon runs inside the unit's sandbox.

What differs from a box, in a drop-in and nowhere else: no User= (the user manager runs as root
and the host has no edge-agent user), a 2 s watchdog and 2 s restart delay so the test is quick,
the log to a file (no journald), and binds where this machine keeps the Python interpreter or
the checkout under /root, /home or /tmp (``ProtectHome=tmpfs`` then). DeviceAllow= and the
memory/CPU limits need the system manager's cgroup controllers: a user manager here has none.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agent import exit_codes
from agent.ops.install import InstallOptions, install
from tests.integration import systemd_user
from tests.integration.conftest import Peer, wait_until
from tests.integration.systemd_user import UserManager

ROOT = Path(__file__).resolve().parents[2]
UNIT = "edge-agent.service"
HQ_UNIT = "edge-aggregator.service"
BASE = "edge/plant-a/line3-box1/"

why_not = systemd_user.usable()
pytestmark = pytest.mark.skipif(why_not is not None, reason=f"systemd user manager: {why_not}")


HOME_DIRS = (Path("/root"), Path("/home"))  # ProtectHome= hides them
TMP_DIRS = (Path("/tmp"), Path("/var/tmp"))  # PrivateTmp= replaces them


def write_test_drop_in(etc: Path, unit: str, log: Path, work: Path) -> None:
    """What this machine needs on top of the installed unit (see the module docstring): the
    interpreter and the checkout bound back in where the sandbox would hide them (a CI clone may
    live under /root or /tmp), and the tree the test writes, writable."""

    def hidden(p: Path) -> bool:
        return any(p.is_relative_to(d) for d in (*HOME_DIRS, *TMP_DIRS))

    read_only = sorted({str(p) for p in (Path(sys.base_prefix).resolve(), ROOT) if hidden(p)})
    lines = ["[Service]", "User=", "Group=", "WatchdogSec=2", "RestartSec=2", "LimitCORE=0"]
    if any(Path(p).is_relative_to(d) for p in [*read_only, str(work)] for d in HOME_DIRS):
        lines.append("ProtectHome=tmpfs")  # an empty /root and /home the binds can go into
    if read_only:
        lines.append(f"BindReadOnlyPaths={' '.join(read_only)}")
    if hidden(work):
        lines.append(f"BindPaths={work}")
    lines += [f"StandardOutput=append:{log}", "StandardError=inherit"]
    drop_in = etc / "systemd" / "system" / f"{unit}.d"
    drop_in.mkdir(parents=True, exist_ok=True)
    (drop_in / "test.conf").write_text("\n".join(lines) + "\n")


class Box:
    """An installed tree (role box, or hq for the aggregator) run by a user manager."""

    def __init__(self, work: Path, broker, bundle: Path, role: str = "box"):
        self.work = work
        self.unit = UNIT if role == "box" else HQ_UNIT
        self.root = root = work / "root"
        install(InstallOptions(root=root, role=role, gpu="none", bundle=bundle))  # type: ignore[arg-type]
        self.etc = root / "etc"
        (self.etc / "systemd" / "user").symlink_to("system")
        self.secret = f"s3cret-{uuid.uuid4().hex[:6]}"
        self.log = work / "agent.log"
        if role == "box":
            self._box_config(broker)
        write_test_drop_in(self.etc, self.unit, self.log, work)
        self.m = UserManager(work, self.etc).start()
        self.m.systemctl("daemon-reload")

    def _box_config(self, broker) -> None:
        self.state = self.etc / "edge-agent"  # %S/edge-agent == %E/edge-agent (see UserManager)
        self.config = self.etc / "edge-agent" / "edge-agent.toml"
        (self.etc / "edge-agent" / "credentials" / "mqtt-password").write_text(self.secret + "\n")
        text = self.config.read_text()
        for old, new in (
            ('data_dir = "/var/lib/edge-agent"', f'data_dir = "{self.state}"'),
            ('bundle = "/var/lib/edge-agent/bundle"', f'bundle = "{self.root}/var/lib/edge-agent/bundle"'),
            ("port = 1884", f"port = {broker.port}"),
            ('# username = "line3-box1"', 'username = "line3-box1"'),
            ('# password_credential = "mqtt-password"', 'password_credential = "mqtt-password"'),
        ):
            assert old in text, old
            text = text.replace(old, new)
        self.good_config = text
        self.config.write_text(self.good_config)

    def props(self, *names: str) -> dict[str, str]:
        return self.m.show(self.unit, *names)

    def agent_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def make_box(broker, tiny_bundle):
    made: list[tuple[Box | None, Path]] = []

    def make(role: str = "box") -> Box:
        # In the checkout, not the session's /tmp dir: the unit's PrivateTmp= would hide that.
        work = ROOT / "build" / "systemd-tests" / uuid.uuid4().hex[:8]
        work.mkdir(parents=True)
        made.append((None, work))
        b = Box(work, broker, tiny_bundle, role)
        made[-1] = (b, work)
        return b

    try:
        yield make
    finally:
        for b, work in made:
            if b is not None:
                b.m.stop()
            shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def box(make_box) -> Box:
    return make_box("box")


def proc_status(pid: int) -> dict[str, str]:
    return dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line
    )


def mounts(pid: int) -> dict[str, str]:
    """mount point -> mount options, as the process sees them."""
    out = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        out[fields[4]] = fields[5]
    return out


def test_reaches_ready_feeds_the_watchdog_in_its_sandbox_and_stops_cleanly(box, broker):
    started = time.monotonic()
    box.m.systemctl("start", UNIT)  # Type=notify: returns once the daemon sent READY=1
    p = box.props("ActiveState", "SubState", "MainPID", "WatchdogUSec", "WatchdogTimestampMonotonic")
    assert (p["ActiveState"], p["SubState"]) == ("active", "running"), box.agent_log()
    assert p["WatchdogUSec"] == "2s"
    pid = int(p["MainPID"])
    assert "engine ready" in box.agent_log()  # READY came after the engine, not before
    # pings keep coming: the watchdog timestamp moves on, again and again
    seen = {int(p["WatchdogTimestampMonotonic"])}
    wait_until(
        lambda: (
            seen.add(int(box.props("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]))
            or len(seen) >= 4
        ),
        timeout=10,
        what="3 more watchdog pings",
    )
    wait_until(
        lambda: box.props("StatusText")["StatusText"].startswith("connected to"), what="STATUS=connected"
    )

    # the unit's sandbox is real for this process
    st = proc_status(pid)
    assert st["NoNewPrivs"].strip() == "1" and st["Seccomp"].strip() == "2"
    assert int(st["CapEff"], 16) == 0  # CapabilityBoundingSet= empties even root's set
    mine, its = mounts(os.getpid()), mounts(pid)
    assert "ro" in its["/"].split(",")  # ProtectSystem=strict
    assert "rw" in its[str(box.state)].split(",")  # StateDirectory= stays writable
    assert "/tmp" in its and "/tmp" not in mine  # PrivateTmp=
    # LoadCredential=: systemd copied the password for this service only; the daemon logged in with it
    env = dict(
        x.split("=", 1) for x in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in x
    )
    creds = Path(f"/proc/{pid}/root") / env["CREDENTIALS_DIRECTORY"].lstrip("/")
    assert (creds / "mqtt-password").read_text().strip() == box.secret
    assert (creds / "fleet.pub").exists()
    # and it serves requests from in there
    peer = Peer(broker).subscribe(BASE + "#")
    try:
        peer.publish(BASE + "infer/req", {"id": "sd-1", "text": "motor M4 overheating"})
        res = peer.expect(BASE + "infer/res", lambda m: m.get("id") == "sd-1", timeout=20).json
        assert res["predictions"][0]["label"]
    finally:
        peer.close()

    box.m.systemctl("stop", UNIT)
    p = box.props("ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert (p["ActiveState"], p["Result"], p["ExecMainStatus"], p["NRestarts"]) == (
        "inactive",
        "success",
        "0",
        "0",
    )
    assert "stopped cleanly" in box.agent_log()
    assert time.monotonic() - started < 60


def test_watchdog_kills_a_hung_daemon_and_systemd_restarts_it(box):
    box.m.systemctl("start", UNIT)
    first = int(box.props("MainPID")["MainPID"])
    os.kill(first, signal.SIGSTOP)  # hung: no more pings
    results: set[str] = set()

    def restarted() -> bool:
        p = box.props("Result", "NRestarts", "ActiveState", "SubState", "MainPID")
        results.add(p["Result"])
        return p["NRestarts"] == "1" and p["SubState"] == "running" and int(p["MainPID"]) not in (0, first)

    wait_until(restarted, timeout=60, interval=0.1, what="restart after the watchdog fired")
    assert "watchdog" in results, results  # systemd's verdict on the hung run
    assert not Path(f"/proc/{first}").exists()
    assert box.agent_log().count("engine ready") == 2


def test_config_error_is_not_restarted(box):
    box.config.write_text(box.good_config.replace('host = "127.0.0.1"', 'host = ""'))
    run = box.m.systemctl("start", UNIT, check=False)
    assert run.returncode != 0
    p = box.props("ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert (p["ActiveState"], p["ExecMainStatus"]) == ("failed", str(exit_codes.CONFIG_ERROR)), (
        box.agent_log()
    )
    time.sleep(4)  # two RestartSec= periods: RestartPreventExitStatus= keeps it down
    p = box.props("ActiveState", "NRestarts")
    assert (p["ActiveState"], p["NRestarts"]) == ("failed", "0")
    assert "broker.host" in box.agent_log()
    # fixed, it starts
    box.config.write_text(box.good_config)
    box.m.systemctl("reset-failed", UNIT)
    box.m.systemctl("start", UNIT)
    assert box.props("ActiveState")["ActiveState"] == "active"


def test_aggregator_reaches_ready_with_its_signing_key_credential(make_box, broker):
    hq = make_box("hq")
    creds = hq.etc / "edge-agent" / "credentials"
    keys = hq.work / "keys"
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "keys", "--out", str(keys)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    # without the signing key the unit must not start: no placeholder, LoadCredential= fails
    assert hq.m.systemctl("start", HQ_UNIT, check=False).returncode != 0
    assert hq.props("ExecMainStatus")["ExecMainStatus"] == "243"  # EXIT_CREDENTIALS
    shutil.copy(keys / "fleet.key", creds / "fleet.key")
    (creds / "aggregator-mqtt-password").write_text(hq.secret + "\n")
    state = hq.etc / "edge-aggregator"  # %S/edge-aggregator (see UserManager)
    config = hq.etc / "edge-agent" / "hq.toml"  # examples/hq.toml as install wrote it
    text = config.read_text()
    for old, new in (
        ('data_dir = "/var/lib/edge-aggregator"', f'data_dir = "{state}"'),
        (
            'bundle = "/var/lib/edge-aggregator/bundle"',
            f'bundle = "{hq.root}/var/lib/edge-aggregator/bundle"',
        ),
        ("port = 1884", f"port = {broker.port}"),
        ('# username = "aggregator"', 'username = "aggregator"'),
        ('# password_credential = "mqtt-password"', 'password_credential = "mqtt-password"'),
    ):
        assert old in text, old
        text = text.replace(old, new)
    assert 'signing_key_credential = "fleet.key"' in text
    config.write_text(text)
    hq.m.systemctl("reset-failed", HQ_UNIT)
    hq.m.systemctl("start", HQ_UNIT)  # returns once READY=1 arrived
    p = hq.props(
        "ActiveState", "SubState", "MainPID", "WatchdogUSec", "WatchdogTimestampMonotonic", "StatusText"
    )
    assert (p["ActiveState"], p["SubState"]) == ("active", "running"), hq.agent_log()
    assert p["StatusText"].startswith("aggregator ") and p["WatchdogUSec"] == "2s"
    seen = {int(p["WatchdogTimestampMonotonic"])}
    wait_until(
        lambda: (
            seen.add(int(hq.props("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]))
            or len(seen) >= 3
        ),
        timeout=10,
        what="2 more watchdog pings",
    )
    pid = int(p["MainPID"])
    st = proc_status(pid)
    assert st["NoNewPrivs"].strip() == "1" and st["Seccomp"].strip() == "2" and int(st["CapEff"], 16) == 0
    assert "/dev" in mounts(pid)  # PrivateDevices=
    hq.m.systemctl("stop", HQ_UNIT)
    p = hq.props("ActiveState", "Result", "ExecMainStatus")
    assert (p["ActiveState"], p["Result"], p["ExecMainStatus"]) == ("inactive", "success", "0"), (
        hq.agent_log()
    )
