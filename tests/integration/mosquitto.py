"""A real mosquitto for tests: the shipped ``examples/mosquitto.conf`` with its own port,
persistence directory and log, in a temp directory.

Every broker a test, the demo or a benchmark starts runs the settings the project ships (queue
limits, persistence, packet size): only the site's lines (``listener``, ``persistence_location``,
``log_dest``, ``user``) are replaced. ``settings`` changes or removes single settings (``None``:
mosquitto's default), so a test can run the broker a user would have without the shipped file.

Never the system broker on 1883. ``restart()`` is a graceful restart (mosquitto saves its
persistence file on SIGTERM, so queued messages and sessions survive it); ``kill()`` is kill -9.
``Mosquitto.secured`` adds TLS (a throwaway CA made with the openssl CLI: the venv has no
``cryptography``), a password file and an ACL file.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
SHIPPED_CONF = Path(__file__).resolve().parents[2] / "examples" / "mosquitto.conf"
# The shipped file's lines that belong to a site, not to what edge-agent relies on: replaced here.
SITE_KEYS = frozenset({"listener", "persistence_location", "log_dest", "user"})


def conf_keys(text: str) -> set[str]:
    """The option names set in a mosquitto config text (comments and blank lines skipped)."""
    return {
        line.split()[0] for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    }


def derive_conf(
    shipped: str, site: str, settings: Mapping[str, str | None] | None = None, extra_conf: str = ""
) -> str:
    """``shipped`` with its site lines, the keys of ``settings`` and those ``extra_conf`` sets taken out;
    then the other settings (a value replaces, ``None`` leaves mosquitto's default), ``site`` (which
    ends with the listener) and ``extra_conf`` (listener options such as TLS files apply to it)."""
    settings = dict(settings or {})
    unknown = {key for key, value in settings.items() if value is None} - conf_keys(shipped)
    assert not unknown, f"not in the shipped config, nothing to remove: {sorted(unknown)}"
    drop = SITE_KEYS | conf_keys(site) | set(settings) | conf_keys(extra_conf)
    kept = [
        line
        for line in shipped.splitlines()
        if not (line.strip() and not line.lstrip().startswith("#") and line.split()[0] in drop)
    ]
    changed = [f"{key} {value}" for key, value in settings.items() if value is not None]
    return "\n".join(
        [
            *kept,
            "# ---- test broker: changed settings",
            *changed,
            "# ---- test broker: site",
            site,
            extra_conf,
            "",
        ]
    )


def make_tls_files(directory: Path, host: str = "127.0.0.1") -> dict[str, Path]:
    """A throwaway CA and a server certificate for ``host`` (openssl CLI), valid for a day."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text(f"subjectAltName = IP:{host}\nbasicConstraints = CA:FALSE\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=edge-agent test CA",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca_crt),
    )
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={host}", "-keyout", str(key), "-out", str(csr)
    )
    openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca_crt),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        str(ext),
        "-out",
        str(crt),
    )
    return {"ca": ca_crt, "cert": crt, "key": key}


def secured_conf(directory: Path, users: dict[str, str], acl: str, tls: dict[str, Path]) -> str:
    """mosquitto settings for TLS on the listener, a password file and an ACL file (no anonymous access)."""
    passwd = directory / "passwd"
    passwd.write_text("")
    for user, password in users.items():
        subprocess.run(
            ["mosquitto_passwd", "-b", str(passwd), user, password], check=True, capture_output=True
        )
    acl_path = directory / "acl"
    acl_path.write_text(acl)
    return (
        f"cafile {tls['ca']}\ncertfile {tls['cert']}\nkeyfile {tls['key']}\n"
        f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl_path}\n"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        extra_conf: str = "",
        *,
        settings: Mapping[str, str | None] | None = None,
        conf: Path = SHIPPED_CONF,
    ):
        """``settings``: options of ``conf`` to change (a value) or remove (``None``: mosquitto's default)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.extra_conf = extra_conf
        self.settings = dict(settings or {})
        self.base_conf = conf
        self.proc: subprocess.Popen | None = None
        self.tls_ca: Path | None = None

    def write_conf(self) -> None:
        site = (
            f"persistence_location {self.workdir}/\n"
            f"log_dest file {self.log_path}\n"
            # mosquitto started as root switches to this user; it must write the temp directory.
            f"user {getpass.getuser()}\n"
            f"listener {self.port} {self.host}"
        )
        self.conf_path.write_text(
            derive_conf(self.base_conf.read_text(), site, self.settings, self.extra_conf)
        )

    @classmethod
    def secured(cls, workdir: Path, users: dict[str, str], acl: str) -> Mosquitto:
        """The variant with TLS, passwords and an ACL; ``tls_ca`` is the CA clients must trust."""
        workdir = Path(workdir)
        tls = make_tls_files(workdir / "tls")
        broker = cls(workdir, extra_conf=secured_conf(workdir, users, acl, tls))
        broker.tls_ca = tls["ca"]
        return broker

    def start(self, timeout: float = 10.0) -> Mosquitto:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.write_conf()
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port}; log:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: mosquitto writes its persistence file and exits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """kill -9: what a power cut does to the broker (state since the last autosave is gone)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
