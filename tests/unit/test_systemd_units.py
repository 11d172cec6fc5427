"""The unit files, checked by systemd itself (``systemd-analyze verify`` and ``security``) and
against what the code expects of them (exit codes, credential names, paths)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent import exit_codes
from agent.ops.install import UNIT_EXECUTABLE, default_executable, render_unit

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = ROOT / "systemd"
UNITS = ("edge-agent.service", "edge-aggregator.service")
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
# systemd-analyze security scores the units 1.9 / 1.4 today ("OK"; 10 is no sandbox at all).
MAX_EXPOSURE = {"edge-agent.service": 2.5, "edge-aggregator.service": 2.0}


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def rendered(tmp_path: Path, name: str, text: str | None = None) -> Path:
    """The unit as `edge-agent install` writes it: ExecStart= runs this venv's edge-agent (verify
    refuses a unit whose executable does not exist)."""
    text = (SYSTEMD_DIR / name).read_text() if text is None else text
    path = tmp_path / name
    path.write_text(render_unit(text, default_executable(), ROOT))
    return path


def verify(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ANALYZE, "verify", "--man=no", *map(str, paths)], capture_output=True, text=True, timeout=60
    )


def verify_clean(*paths: Path) -> str:
    """Problems systemd reports; empty when clean. verify exits 0 on an unknown key or a value it
    cannot parse ("ignoring"), so anything it prints counts too."""
    run = verify(*paths)
    return "" if run.returncode == 0 and not (run.stdout + run.stderr).strip() else run.stdout + run.stderr


@pytest.mark.parametrize("name", UNITS)
def test_units_pass_systemd_analyze_verify(tmp_path, name):
    assert verify_clean(rendered(tmp_path, name)) == ""


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (("ProtectSystem=strict", "ProtectSystem=stricter"), "Failed to parse protect system value"),
        (("WatchdogSec=30", "WatchdogSecs=30"), "Unknown key"),
        (("DevicePolicy=closed", "DevicePolicy=shut"), "Failed to parse device policy"),
        (("Type=notify", "Type=notify-ish"), "Failed to parse service type"),
    ],
)
def test_verify_catches_a_broken_unit(tmp_path, change, complaint):
    text = (SYSTEMD_DIR / "edge-agent.service").read_text()
    assert change[0] in text
    problems = verify_clean(rendered(tmp_path, "edge-agent.service", text.replace(change[0], change[1])))
    assert complaint in problems


def test_verify_catches_a_missing_executable(tmp_path):
    path = tmp_path / "edge-agent.service"
    path.write_text((SYSTEMD_DIR / "edge-agent.service").read_text())  # /opt/edge-agent/... is not here
    assert not Path(UNIT_EXECUTABLE).exists()
    run = verify(path)
    assert run.returncode != 0 and "is not executable" in run.stderr


def test_jetson_drop_in_passes_verify_beside_the_unit(tmp_path):
    unit = rendered(tmp_path, "edge-agent.service")
    drop_in = tmp_path / "edge-agent.service.d"
    drop_in.mkdir()
    shutil.copy(SYSTEMD_DIR / "edge-agent.service.d" / "jetson.conf", drop_in / "jetson.conf")
    assert verify_clean(unit) == ""
    (drop_in / "zz-broken.conf").write_text("[Service]\nDeviceAllow=/dev/nvmap rwx\n")
    # verify reads the drop-ins beside the unit
    assert "zz-broken.conf:2: Invalid device rights" in verify_clean(unit)


def security(path: Path, threshold: float) -> subprocess.CompletedProcess[str]:
    """systemd's own exposure check: non-zero exit above ``threshold`` (given in tenths)."""
    return subprocess.run(
        [ANALYZE, "security", "--offline=yes", f"--threshold={round(threshold * 10)}", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("name", UNITS)
def test_security_exposure_stays_low(tmp_path, name):
    run = security(rendered(tmp_path, name), MAX_EXPOSURE[name])
    assert run.returncode == 0, run.stdout[-3000:]


def test_security_check_fails_a_unit_without_its_sandbox(tmp_path):
    text = (SYSTEMD_DIR / "edge-agent.service").read_text()
    stripped = text[: text.index("# ---- Hardening")] + "\n[Install]\nWantedBy=multi-user.target\n"
    run = security(rendered(tmp_path, "edge-agent.service", stripped), MAX_EXPOSURE["edge-agent.service"])
    assert run.returncode != 0
    score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", run.stdout).group(1))
    assert score > 5.0


@pytest.mark.parametrize("name", UNITS)
def test_notify_watchdog_restart_policy(name):
    s = unit_settings((SYSTEMD_DIR / name).read_text())
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert int(s["WatchdogSec"][0]) >= 10
    assert s["Restart"] == ["on-failure"]
    listed = {int(v) for v in s["RestartPreventExitStatus"][0].split()}
    assert set(exit_codes.NO_RESTART) <= listed
    assert s["NoNewPrivileges"] == ["yes"] and s["ProtectSystem"] == ["strict"] and s["PrivateTmp"] == ["yes"]
    assert s["CapabilityBoundingSet"] == [""] and s["DevicePolicy"] == ["closed"]
    assert s["User"][0] != "root" and s["StateDirectory"] and s["ConfigurationDirectory"] == ["edge-agent"]
    assert s["ExecStart"][0].startswith(UNIT_EXECUTABLE + " ")


def credentials(name: str) -> dict[str, str]:
    s = unit_settings((SYSTEMD_DIR / name).read_text())
    return dict(v.split(":", 1) for v in s["LoadCredential"])


def test_credentials_the_code_reads():
    box = credentials("edge-agent.service")
    # the example config's password_credential and agent.fed.signing's file names
    example = (ROOT / "examples" / "edge-agent.toml").read_text()
    assert re.search(r'password_credential = "mqtt-password"', example)
    assert set(box) == {"mqtt-password", "fleet.pub"}
    hq = credentials("edge-aggregator.service")
    assert set(hq) == {"fleet.key", "mqtt-password"}
    # the private key never goes to a box, and every source sits in the 0700 credentials directory
    assert "fleet.key" not in box
    for source in [*box.values(), *hq.values()]:
        assert source.startswith("%E/edge-agent/credentials/")


def test_tmpfiles_create_every_box_credential_but_not_the_signing_key():
    from agent.ops.install import parse_tmpfiles

    def files(name: str) -> set[str]:
        lines = parse_tmpfiles((SYSTEMD_DIR / "tmpfiles.d" / name).read_text())
        return {str(x.path) for x in lines if x.kind == "f"}

    box = files("edge-agent.conf")
    assert {src.replace("%E", "/etc") for src in credentials("edge-agent.service").values()} == box
    hq = files("edge-aggregator.conf")
    assert "/etc/edge-agent/credentials/fleet.key" not in hq
    assert "/etc/edge-agent/credentials/aggregator-mqtt-password" in hq


def test_users_match_sysusers():
    for unit, conf in (
        ("edge-agent.service", "edge-agent.conf"),
        ("edge-aggregator.service", "edge-aggregator.conf"),
    ):
        user = unit_settings((SYSTEMD_DIR / unit).read_text())["User"][0]
        lines = (SYSTEMD_DIR / "sysusers.d" / conf).read_text().splitlines()
        assert any(line.split()[:2] == ["u", user] for line in lines if line and not line.startswith("#"))
    box, hq = (unit_settings((SYSTEMD_DIR / u).read_text())["User"][0] for u in UNITS)
    assert box != hq  # the box daemon must not read the signing key
