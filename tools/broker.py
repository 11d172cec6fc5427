"""A private mosquitto: the shipped ``examples/mosquitto.conf`` with its own port, persistence
directory and log, in a directory of its own: for `make demo`, the benchmarks and the tests
(which import it as ``tests.integration.mosquitto``).

Every broker a test, the demo or a benchmark starts runs the settings the project ships (queue
limits, persistence, packet size): only the site's lines (``listener``, ``persistence_location``,
``log_dest``, ``user``) are replaced. ``settings`` changes or removes single settings (``None``:
mosquitto's default), so a test can run the broker a user would have without the shipped file.

Never the system broker on 1883. ``restart()`` is a graceful restart (mosquitto saves its
persistence file on SIGTERM, so queued messages and sessions survive it); ``kill()`` is kill -9;
``reload()`` is SIGHUP (mosquitto rereads its password and ACL files).

``Mosquitto.secured`` is the broker of README "Securing the broker": the shipped sections 1-5 cut
from ``examples/mosquitto.conf`` as a drop-in (``layout="conf.d"``, a distribution's layout) or
the whole file as the main file with its ``include_dir`` hook on (``layout="main"``), plus
``examples/mosquitto-secure.conf`` with only its paths, port and switches replaced,
``examples/mosquitto.acl`` (or a test's ACL), a password file made with ``mosquitto_passwd`` and a
throwaway CA from ``edge-agent certs`` (``agent.ops.certs``).
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

from agent.ops import certs

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SHIPPED_CONF = EXAMPLES / "mosquitto.conf"
SECURE_CONF = EXAMPLES / "mosquitto-secure.conf"
SHIPPED_ACL = EXAMPLES / "mosquitto.acl"
# The shipped file's lines that belong to a site, not to what edge-agent relies on: replaced here.
SITE_KEYS = frozenset({"listener", "persistence_location", "log_dest", "user", "include_dir"})
# Where the shipped file's site section starts: README's `sed '/^# ---- 6\./,$d'` cuts it off there.
SITE_SECTION = "# ---- 6."


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
    """A throwaway CA and a server certificate for ``host`` (``edge-agent certs``), in ``directory``."""
    ca = certs.make_ca(directory, "edge-agent test CA", days=2, overwrite=True)
    server = certs.make_server(directory, [host], days=1, overwrite=True)
    return {"ca": ca.cert, "cert": server.cert, "key": server.key}


def shipped_sections(text: str) -> str:
    """Sections 1-5 of the shipped config: what README's ``sed '/^# ---- 6\\./,$d'`` leaves."""
    lines = text.splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if line.startswith(SITE_SECTION))
    return "".join(lines[:cut])


def configure(text: str, values: Mapping[str, str | None]) -> str:
    """``text`` (a mosquitto config) with the options of ``values`` set: an option's line replaced,
    a commented-out one (``#crlfile ...``) switched on, ``None`` removes it. Every option must be in
    ``text`` already, so the example file, not the test, decides what a secured broker has."""
    todo = dict(values)
    out = []
    for line in text.splitlines():
        word = line.split(maxsplit=1)[0] if line.strip() else ""
        key = word.removeprefix("#")
        if key in todo and (word == key or (word == "#" + key and todo[key] is not None)):
            value = todo.pop(key)
            if value is not None:
                out.append(f"{key} {value}")
            continue
        out.append(line)
    assert not todo, f"not in the config (add them to the example first): {sorted(todo)}"
    return "\n".join(out) + "\n"


def write_passwords(path: Path, users: Mapping[str, str]) -> Path:
    """A mosquitto password file, made as README says: ``mosquitto_passwd -b FILE USER PASSWORD``."""
    path.write_text("")
    for user, password in users.items():
        subprocess.run(["mosquitto_passwd", "-b", str(path), user, password], check=True, capture_output=True)
    return path


def secured_conf(directory: Path, users: dict[str, str], acl: str, tls: dict[str, Path]) -> str:
    """mosquitto settings for TLS on the listener, a password file and an ACL file (no anonymous
    access): a hand-made variant of examples/mosquitto-secure.conf for ``Mosquitto(extra_conf=...)``."""
    passwd = write_passwords(directory / "passwd", users)
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
        # Set by secured(): the CA directory, the password file, the secure file's option values.
        self.tls_dir: Path | None = None
        self.passwd_path: Path | None = None
        self.secure: dict[str, str | None] | None = None
        self.layout = "conf.d"

    def write_conf(self) -> None:
        if self.secure is not None:
            self._write_secured_conf()
            return
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

    def _write_secured_conf(self) -> None:
        """README's two ways: a distribution's layout (a main file with the site's paths and
        ``include_dir conf.d``, sections 1-5 and the secure file as drop-ins), or the shipped file as
        the main file, its listener and allow_anonymous lines dropped and its include_dir hook on."""
        assert self.secure is not None
        conf_d = self.workdir / "conf.d"
        conf_d.mkdir(exist_ok=True)
        secure = configure(SECURE_CONF.read_text(), {"listener": f"{self.port} {self.host}", **self.secure})
        (conf_d / "edge-agent-secure.conf").write_text(secure)
        shipped = self.base_conf.read_text()
        paths = {"persistence_location": f"{self.workdir}/", "log_dest": f"file {self.log_path}"}
        if self.layout == "conf.d":
            (conf_d / "edge-agent.conf").write_text(derive_conf(shipped_sections(shipped), "", self.settings))
            main = "".join(f"{k} {v}\n" for k, v in paths.items()) + f"include_dir {conf_d}\n"
        else:
            assert self.layout == "main", self.layout
            main = configure(
                shipped,
                {
                    **self.settings,
                    "listener": None,
                    "allow_anonymous": None,
                    **paths,
                    "include_dir": str(conf_d),
                },
            )
        # mosquitto started as root switches to this user; it must read the keys and write workdir.
        self.conf_path.write_text(f"user {getpass.getuser()}\n{main}{self.extra_conf}")

    @classmethod
    def secured(
        cls,
        workdir: Path,
        users: dict[str, str],
        acl: str | None = None,
        *,
        mutual_tls: bool = False,
        identity_as_username: bool = False,
        crl: bool = False,
        layout: str = "conf.d",
    ) -> Mosquitto:
        """The broker of examples/mosquitto-secure.conf: TLS, ``users`` (name: password) in a
        password file, ``acl`` (default: examples/mosquitto.acl); ``tls_ca`` is the CA clients must
        trust, ``client_cert(name)`` makes a client certificate from it. ``mutual_tls``: clients
        need a certificate; ``identity_as_username``: its CN is the user name; ``crl``: the CA's CRL
        (``edge-agent certs revoke``; an empty one to start with) is checked."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        tls = make_tls_files(workdir / "tls")
        broker = cls(workdir)
        broker.tls_ca, broker.tls_dir, broker.layout = tls["ca"], workdir / "tls", layout
        broker.passwd_path = write_passwords(workdir / "passwd", users)
        acl_path = workdir / "edge-agent.acl"
        acl_path.write_text(SHIPPED_ACL.read_text() if acl is None else acl)
        broker.secure = {
            "cafile": str(tls["ca"]),
            "certfile": str(tls["cert"]),
            "keyfile": str(tls["key"]),
            "password_file": str(broker.passwd_path),
            "acl_file": str(acl_path),
            "require_certificate": "true" if mutual_tls or identity_as_username else "false",
            "use_identity_as_username": "true" if identity_as_username else "false",
        }
        if crl:
            crl_path, _ = certs.revoke(broker.tls_dir, [])
            broker.secure["crlfile"] = str(crl_path)
        return broker

    def client_cert(self, name: str, ca_dir: Path | None = None) -> certs.Issued:
        """A client certificate with common name ``name`` from this broker's CA (or ``ca_dir``'s)."""
        ca = ca_dir or self.tls_dir
        assert ca is not None, "not a secured broker"
        return certs.make_client(ca, name, ca / "clients", days=1, overwrite=True)

    def set_password(self, user: str, password: str) -> None:
        """``mosquitto_passwd -b`` on the password file, then SIGHUP: a rotation without a restart."""
        assert self.passwd_path is not None, "not a secured broker"
        subprocess.run(
            ["mosquitto_passwd", "-b", str(self.passwd_path), user, password], check=True, capture_output=True
        )
        self.reload()

    def reload(self) -> None:
        """SIGHUP: mosquitto rereads its config, password and ACL files."""
        assert self.proc is not None and self.proc.poll() is None, "not running"
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)  # mosquitto handles the signal in its main loop and answers nothing

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
