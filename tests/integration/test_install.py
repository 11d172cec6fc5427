"""``edge-agent install --root DIR``: the tree it lays out is the one the unit files expect, the
real systemd tools accept it (verify, sysusers, tmpfiles), and a second run changes nothing."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_bootstrap
from agent.ops import install as inst
from agent.ops.install import InstallOptions, install

ROOT = Path(__file__).resolve().parents[2]


def edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def settings(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def on_box(root: Path, unit_path: str) -> Path:
    """A unit's %E path inside the installed tree."""
    return root / unit_path.replace("%E", "etc").lstrip("/")


@pytest.fixture
def tree(tmp_path, tiny_bundle) -> Path:
    root = tmp_path / "root"
    run = edge_agent(
        "install", "--root", str(root), "--role", "both", "--gpu", "jetson", "--bundle", str(tiny_bundle)
    )
    assert run.returncode == 0, run.stderr
    assert "to do on the box (not run with --root):" in run.stdout
    assert "systemctl enable --now edge-agent.service edge-aggregator.service" in run.stdout
    return root


def test_tree_has_what_the_units_expect(tree):
    units = tree / "etc" / "systemd" / "system"
    box = settings(units / "edge-agent.service")
    hq = settings(units / "edge-aggregator.service")
    for s in (box, hq):
        exe = Path(s["ExecStart"][0].split()[0])
        assert exe == Path(sys.executable).parent / "edge-agent" and os.access(exe, os.X_OK)
        for cred in s["LoadCredential"]:
            name, source = cred.split(":", 1)
            path = on_box(tree, source)
            if name == "fleet.key":
                assert not path.exists()  # no placeholder for the signing key: a start must fail
                continue
            assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600, path
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert (units / "edge-agent.service.d" / "jetson.conf").exists()
    # the config the unit names, with the paths of StateDirectory=edge-agent
    config = on_box(tree, box["Environment"][0].split("=", 1)[1])
    assert config == tree / "etc" / "edge-agent" / "edge-agent.toml"
    text = config.read_text()
    assert re.search(r'^data_dir = "/var/lib/edge-agent"$', text, re.M)
    assert re.search(r'^bundle = "/var/lib/edge-agent/bundle"$', text, re.M)
    assert box["StateDirectory"] == ["edge-agent"] and box["WorkingDirectory"] == ["%S/edge-agent"]
    assert (tree / "var" / "lib" / "edge-agent" / "bundle" / "manifest.json").exists()
    # the example's EDGE_AGENT_CONFIG line stays a comment: the unit's %E path decides
    env = (tree / "etc" / "edge-agent" / "edge-agent.env").read_text()
    assert not re.search(r"^EDGE_AGENT_CONFIG=", env, re.M)


def test_installed_config_is_the_example_with_service_paths(tree, tmp_path):
    text = (tree / "etc" / "edge-agent" / "edge-agent.toml").read_text()
    example = (ROOT / "examples" / "edge-agent.toml").read_text()
    assert text == inst.render_box_config(example)
    # valid apart from the paths, which only exist on the box: point them into the tree
    local = tmp_path / "local.toml"
    local.write_text(
        text.replace('"/var/lib/edge-agent', f'"{tree}/var/lib/edge-agent').replace(
            f'data_dir = "{tree}/var/lib/edge-agent"', f'data_dir = "{tmp_path}/data"'
        )
    )
    boot = load_bootstrap(local)
    assert boot.bundle == tree / "var" / "lib" / "edge-agent" / "bundle"
    check = edge_agent("validate-config", str(local))
    assert check.returncode == 0, check.stderr


def test_installed_units_pass_systemd_analyze_verify(tree):
    units = tree / "etc" / "systemd" / "system"
    paths = [units / "edge-agent.service", units / "edge-aggregator.service"]
    run = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, paths)], capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout + run.stderr == "", run.stdout + run.stderr
    # verify reads the installed drop-ins too: a broken one shows
    (units / "edge-agent.service.d" / "jetson.conf").write_text("[Service]\nDeviceAllow=/dev/nvmap rwz\n")
    run = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(paths[0])], capture_output=True, text=True
    )
    assert "Invalid device rights" in run.stderr


def test_sysusers_creates_the_users_the_units_run_as(tree):
    etc = tree / "etc"
    for name in ("passwd", "group", "shadow", "gshadow"):
        (etc / name).touch()
    (etc / "group").write_text("video:x:44:\n")
    # the installed files on stdin (systemd 252's --root does not prefix a path given to it)
    confs = "".join(p.read_text() for p in sorted((etc / "sysusers.d").iterdir()))
    run = subprocess.run(
        ["systemd-sysusers", f"--root={tree}", "-"], input=confs, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    users = {line.split(":")[0]: line.split(":") for line in (etc / "passwd").read_text().splitlines()}
    units = etc / "systemd" / "system"
    for unit in ("edge-agent.service", "edge-aggregator.service"):
        user = settings(units / unit)["User"][0]
        assert users[user][6] == "/usr/sbin/nologin" and int(users[user][2]) < 1000  # a system user
    video = next(line for line in (etc / "group").read_text().splitlines() if line.startswith("video:"))
    assert video.split(":")[3].split(",") == ["edge-agent"]


def test_python_layout_matches_systemd_tmpfiles(tree, tmp_path):
    """What install does for tmpfiles.d lines equals what systemd-tmpfiles --create does."""
    ref = tmp_path / "ref"
    ref.mkdir()
    for conf in sorted((tree / "etc" / "tmpfiles.d").iterdir()):
        run = subprocess.run(
            ["systemd-tmpfiles", f"--root={ref}", "--create", "-"],
            input=conf.read_text(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr

    def layout(base: Path) -> dict[str, tuple[str, int]]:
        out = {}
        for p in sorted((base / "etc" / "edge-agent").rglob("*")):
            if p.name.endswith((".toml", ".env")):
                continue
            out[str(p.relative_to(base))] = ("d" if p.is_dir() else "f", stat.S_IMODE(p.stat().st_mode))
        return out

    assert layout(tree) == layout(ref)
    assert layout(ref)["etc/edge-agent/credentials"] == ("d", 0o700)


def test_second_run_changes_nothing_and_keeps_operator_edits(tree, tiny_bundle):
    config = tree / "etc" / "edge-agent" / "edge-agent.toml"
    password = tree / "etc" / "edge-agent" / "credentials" / "mqtt-password"
    config.write_text(config.read_text() + "\n# edited by the operator\n")
    password.write_text("s3cret\n")
    (tree / "etc" / "edge-agent" / "credentials").chmod(0o755)  # someone loosened it
    report = install(InstallOptions(root=tree, role="both", gpu="jetson", bundle=tiny_bundle))
    actions = dict((str(p), a) for a, p in report.files)
    assert actions["/etc/edge-agent/edge-agent.toml"] == "kept"
    assert actions["/etc/edge-agent/credentials/mqtt-password"] == "kept"
    assert ("mode fixed", Path("/etc/edge-agent/credentials")) in report.files
    assert actions["/etc/systemd/system/edge-agent.service"] == "unchanged"
    assert {a for a, _ in report.files} <= {"kept", "unchanged", "mode fixed"}
    assert config.read_text().endswith("# edited by the operator\n") and password.read_text() == "s3cret\n"
    assert not report.ran_commands
    again = install(InstallOptions(root=tree, role="both", gpu="jetson", bundle=tiny_bundle))
    assert {a for a, _ in again.files} <= {"kept", "unchanged"}


def test_gpu_choice_decides_the_extras(tmp_path):
    nvidia = install(InstallOptions(root=tmp_path / "n", gpu="nvidia"))
    assert (tmp_path / "n" / "etc" / "modules-load.d" / "edge-agent-nvidia.conf").read_text().splitlines()[
        -1
    ] == "nvidia-uvm"
    assert not (tmp_path / "n" / "etc" / "systemd" / "system" / "edge-agent.service.d").exists()
    assert not (
        tmp_path / "n" / "etc" / "systemd" / "system" / "edge-aggregator.service"
    ).exists()  # role box
    assert any("model build" in n for n in nvidia.notes)  # no bundle given
    install(InstallOptions(root=tmp_path / "c", gpu="none"))
    assert not (tmp_path / "c" / "etc" / "modules-load.d").exists()


def test_real_root_needs_root_and_runs_systemd_tools_only_there(tmp_path, monkeypatch):
    monkeypatch.setattr(inst.os, "geteuid", lambda: 1000)
    with pytest.raises(PermissionError, match="needs root"):
        install(InstallOptions(root=Path("/")))
    ran: list[list[str]] = []
    install(InstallOptions(root=tmp_path / "r", role="hq"), run=ran.append)
    assert ran == []  # --root: nothing run, whoever we are
    run = edge_agent("install", "--root", str(tmp_path / "r2"), "--source", str(tmp_path / "nowhere"))
    assert run.returncode == 2 and "from a source checkout or pass --source" in run.stderr
    assert shutil.which("systemctl")  # the tools exist here; install just did not call them


def test_installed_hq_config_is_the_example_with_service_paths_and_the_key_credential(tree):
    from agent.fed.hq_config import load_hq_config

    installed = tree / "etc" / "edge-agent" / "hq.toml"
    text = installed.read_text()
    assert text == inst.render_hq_config((ROOT / "examples" / "hq.toml").read_text())
    config = load_hq_config(installed)
    assert config.data_dir == Path("/var/lib/edge-aggregator")  # StateDirectory=edge-aggregator
    assert config.bundle == Path("/var/lib/edge-aggregator/bundle")
    # the name edge-aggregator.service's LoadCredential= gives the signing key
    hq = settings(tree / "etc" / "systemd" / "system" / "edge-aggregator.service")
    names = {c.split(":", 1)[0] for c in hq["LoadCredential"]}
    assert config.signing_key_credential in names and config.signing_key_file is None
    assert (tree / "var" / "lib" / "edge-aggregator" / "bundle" / "manifest.json").exists()
