"""``edge-agent install``: lay out a box (or headquarters) for the systemd units.

Under ``root`` ("/" unless ``--root DIR``) it writes:

- ``/etc/systemd/system/edge-agent.service`` (role ``box``) and/or ``edge-aggregator.service``
  (role ``hq``), ``ExecStart=`` pointing at the ``edge-agent`` executable that runs the install
  (or ``--exec``); on a Jetson the ``edge-agent.service.d/jetson.conf`` drop-in;
- ``/etc/sysusers.d/`` and ``/etc/tmpfiles.d/`` files for the users and the credentials directory;
- ``/etc/edge-agent/edge-agent.toml`` (from ``examples/``, with the service's data_dir and bundle)
  and ``edge-agent.env``, only when absent: an operator's edits are never overwritten;
- ``/etc/edge-agent/credentials/`` (0700) with the empty placeholders its tmpfiles.d lines name;
- ``/etc/modules-load.d/edge-agent-nvidia.conf`` on a box with the NVIDIA driver (nvidia-uvm must
  be loaded before the unit starts, see the unit's comment on ``DeviceAllow=``).

Running it again changes only what differs. On the real root (and only as root) it then runs
``systemd-sysusers`` and ``systemctl daemon-reload`` (and ``systemctl enable`` with ``--enable``);
with ``--root`` it never calls them and prints them as the steps left for the box.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Role = Literal["box", "hq", "both"]
Gpu = Literal["auto", "nvidia", "jetson", "none"]

UNIT_DIR = Path("/etc/systemd/system")
SYSUSERS_DIR = Path("/etc/sysusers.d")
TMPFILES_DIR = Path("/etc/tmpfiles.d")
MODULES_LOAD_FILE = Path("/etc/modules-load.d/edge-agent-nvidia.conf")
CONFIG_DIR = Path("/etc/edge-agent")
STATE_DIR = Path("/var/lib/edge-agent")
SERVICE_BUNDLE = STATE_DIR / "bundle"
HQ_STATE_DIR = Path("/var/lib/edge-aggregator")
HQ_BUNDLE = HQ_STATE_DIR / "bundle"
# LoadCredential= names in the unit files
SIGNING_KEY_CREDENTIAL = "fleet.key"
# The executable the unit files name; install replaces it with the real one.
UNIT_EXECUTABLE = "/opt/edge-agent/.venv/bin/edge-agent"

BOX_UNIT = "edge-agent.service"
HQ_UNIT = "edge-aggregator.service"


@dataclass
class InstallOptions:
    root: Path = Path("/")
    role: Role = "box"
    executable: Path | None = None
    source: Path | None = None
    gpu: Gpu = "auto"
    bundle: Path | None = None
    enable: bool = False


@dataclass
class InstallReport:
    # (what happened, path on the target system): created, updated, unchanged, kept, mode fixed
    files: list[tuple[str, Path]] = field(default_factory=list)
    # run (on the real root) or left for the operator (with --root)
    commands: list[list[str]] = field(default_factory=list)
    ran_commands: bool = False
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{action:<10} {path}" for action, path in self.files]
        if self.commands:
            out.append("ran:" if self.ran_commands else "to do on the box (not run with --root):")
            out.extend("  " + " ".join(c) for c in self.commands)
        out.extend(self.notes)
        return out


def source_dir() -> Path:
    """The source tree beside the installed package (an editable install or a checkout)."""
    return Path(__file__).resolve().parents[2]


def default_executable() -> Path:
    """The ``edge-agent`` script of the Python environment running this code."""
    exe = Path(sys.executable).parent / "edge-agent"
    if exe.exists():
        return exe
    found = shutil.which("edge-agent")
    if found is None:
        raise FileNotFoundError("no edge-agent executable beside this Python or on PATH; pass --exec")
    return Path(found)


def detect_gpu() -> Gpu:
    if Path("/etc/nv_tegra_release").exists():
        return "jetson"
    if Path("/proc/driver/nvidia/version").exists():
        return "nvidia"
    return "none"


def render_unit(text: str, executable: Path, source: Path) -> str:
    """The unit file with ``ExecStart=`` (only the main command) running ``executable``."""
    out, n = re.subn(
        rf"^ExecStart={re.escape(UNIT_EXECUTABLE)}(?= )", f"ExecStart={executable}", text, flags=re.M
    )
    if n != 1:
        raise ValueError(f"unit file has no ExecStart={UNIT_EXECUTABLE} line to point at {executable}")
    return out.replace(
        "Documentation=file:/opt/edge-agent/README.md", f"Documentation=file:{source}/README.md"
    )


def render_box_config(example: str) -> str:
    """examples/edge-agent.toml with the paths the service uses."""
    out = example
    for key, value in (("data_dir", STATE_DIR), ("bundle", SERVICE_BUNDLE)):
        out, n = re.subn(rf'^{key} = ".*"$', f'{key} = "{value}"', out, flags=re.M)
        if n != 1:
            raise ValueError(f"the example config has no `{key} = ...` line to set")
    return out


def render_hq_config(example: str) -> str:
    """examples/hq.toml with the aggregator service's paths and its signing key as a credential."""
    out = example
    for pattern, line in (
        (r'^data_dir = ".*"$', f'data_dir = "{HQ_STATE_DIR}"'),
        (r'^bundle = ".*"$', f'bundle = "{HQ_BUNDLE}"'),
        (r'^signing_key_file = ".*"$', f'signing_key_credential = "{SIGNING_KEY_CREDENTIAL}"'),
    ):
        out, n = re.subn(pattern, line, out, flags=re.M)
        if n != 1:
            raise ValueError(f"the example hq.toml has no line matching {pattern} to set")
    return out


@dataclass(frozen=True)
class TmpfilesLine:
    kind: str  # d (directory) or f (empty file, never truncated)
    path: Path
    mode: int


def parse_tmpfiles(text: str) -> list[TmpfilesLine]:
    """The ``d`` and ``f`` lines of a tmpfiles.d file (the only types our files use)."""
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        kind, path, mode, *_ = line.split()
        if kind not in ("d", "f"):
            raise ValueError(f"tmpfiles.d line {raw!r}: only d and f are supported here")
        lines.append(TmpfilesLine(kind, Path(path), int(mode, 8)))
    return lines


class _Tree:
    """Writes under ``root`` and records what changed, by path on the target system."""

    def __init__(self, root: Path, report: InstallReport):
        self.root = root
        self.report = report
        self.as_root = os.geteuid() == 0

    def at(self, target: Path) -> Path:
        return self.root / target.relative_to("/")

    def managed(self, target: Path, text: str, mode: int = 0o644) -> None:
        """A file install owns: rewritten when it differs."""
        path = self.at(target)
        if path.exists() and path.read_text() == text:
            action = "unchanged"
        else:
            action = "updated" if path.exists() else "created"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            tmp.chmod(mode)
            os.replace(tmp, path)
        self.report.files.append((action, target))

    def once(self, target: Path, text: str, mode: int = 0o644) -> None:
        """A file the operator owns once it exists: written only when absent."""
        path = self.at(target)
        if path.exists():
            self.report.files.append(("kept", target))
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.report.files.append(("created", target))

    def tmpfiles(self, lines: Sequence[TmpfilesLine]) -> None:
        """What ``systemd-tmpfiles --create`` does with these lines, under ``root``."""
        for line in lines:
            path = self.at(line.path)
            if line.kind == "d":
                if not path.is_dir():
                    path.mkdir(parents=True)
                    path.chmod(line.mode)
                    self.report.files.append(("created", line.path))
                elif path.stat().st_mode & 0o7777 != line.mode:
                    path.chmod(line.mode)
                    self.report.files.append(("mode fixed", line.path))
                else:
                    self.report.files.append(("unchanged", line.path))
            else:
                self.once(line.path, "", line.mode)
            if self.as_root:
                os.chown(path, 0, 0)

    def copytree_once(self, target: Path, source: Path) -> None:
        path = self.at(target)
        if path.exists():
            self.report.files.append(("kept", target))
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, path)
        self.report.files.append(("created", target))


def install(
    opts: InstallOptions, run: Callable[[list[str]], object] = lambda c: subprocess.run(c, check=True)
) -> InstallReport:
    """Lay out the tree; see the module docstring. Raises PermissionError, FileNotFoundError,
    ValueError with a sentence for the operator."""
    root = Path(opts.root).resolve()
    real_root = root == Path("/")
    if real_root and os.geteuid() != 0:
        raise PermissionError("installing into / needs root; `--root DIR` lays the tree out under DIR")
    source = Path(opts.source) if opts.source else source_dir()
    if not (source / "systemd" / BOX_UNIT).exists():
        raise FileNotFoundError(
            f"no systemd/{BOX_UNIT} under {source}: run install from a source checkout or pass --source"
        )
    executable = Path(opts.executable) if opts.executable else default_executable()
    gpu = detect_gpu() if opts.gpu == "auto" else opts.gpu
    report = InstallReport()
    tree = _Tree(root, report)
    sd = source / "systemd"
    units: list[str] = []
    sysusers: list[Path] = []

    def role_files(unit: str, name: str) -> None:
        units.append(unit)
        tree.managed(UNIT_DIR / unit, render_unit((sd / unit).read_text(), executable, source))
        tree.managed(SYSUSERS_DIR / f"{name}.conf", (sd / "sysusers.d" / f"{name}.conf").read_text())
        sysusers.append(SYSUSERS_DIR / f"{name}.conf")
        tmpfiles = (sd / "tmpfiles.d" / f"{name}.conf").read_text()
        tree.managed(TMPFILES_DIR / f"{name}.conf", tmpfiles)
        tree.tmpfiles(parse_tmpfiles(tmpfiles))

    if opts.role in ("box", "both"):
        role_files(BOX_UNIT, "edge-agent")
        if gpu == "jetson":
            tree.managed(
                UNIT_DIR / f"{BOX_UNIT}.d" / "jetson.conf", (sd / f"{BOX_UNIT}.d" / "jetson.conf").read_text()
            )
        if gpu == "nvidia":
            tree.managed(
                MODULES_LOAD_FILE, "# edge-agent.service's DeviceAllow= needs it loaded at boot\nnvidia-uvm\n"
            )
        tree.once(
            CONFIG_DIR / "edge-agent.toml",
            render_box_config((source / "examples" / "edge-agent.toml").read_text()),
        )
        tree.once(CONFIG_DIR / "edge-agent.env", (sd / "edge-agent.env.example").read_text())
        if opts.bundle is not None:
            tree.copytree_once(SERVICE_BUNDLE, Path(opts.bundle))
        elif not tree.at(SERVICE_BUNDLE).exists():
            report.notes.append(
                f"no bundle yet: edge-agent model build --out {SERVICE_BUNDLE} (or --bundle DIR)"
            )
    if opts.role in ("hq", "both"):
        role_files(HQ_UNIT, "edge-aggregator")
        hq_example = source / "examples" / "hq.toml"
        if hq_example.exists():
            tree.once(CONFIG_DIR / "hq.toml", render_hq_config(hq_example.read_text()))
        else:
            report.notes.append(f"write {CONFIG_DIR / 'hq.toml'} (the aggregator's config)")
        if opts.bundle is not None:
            tree.copytree_once(HQ_BUNDLE, Path(opts.bundle))
        elif not tree.at(HQ_BUNDLE).exists():
            report.notes.append(f"no bundle for the aggregator yet: copy the fleet's bundle to {HQ_BUNDLE}")
        if not tree.at(CONFIG_DIR / "credentials" / "fleet.key").exists():
            report.notes.append(
                f"no signing key: edge-agent keys --out DIR, then DIR/fleet.key to {CONFIG_DIR}/credentials/ (0600)"
            )

    report.commands = [["systemd-sysusers", *map(str, sysusers)], ["systemctl", "daemon-reload"]]
    if not real_root:
        # Left for the box, in order; the tree under --root is what they expect to find.
        report.commands.append(["systemctl", "enable", "--now", *units])
        return report
    if opts.enable:
        report.commands.append(["systemctl", "enable", *units])
    for command in report.commands:
        run(command)
    report.ran_commands = True
    if gpu == "nvidia" and not Path("/sys/module/nvidia_uvm").exists():
        report.notes.append(
            "nvidia-uvm is not loaded yet: modprobe nvidia-uvm (or reboot) before the first start"
        )
    report.notes.append(
        f"next: edit {CONFIG_DIR}/*.toml and the credentials, `edge-agent validate-config`, then "
        f"systemctl {'start' if opts.enable else 'enable --now'} {' '.join(units)}"
    )
    return report
