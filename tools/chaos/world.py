"""The stage of one chaos scenario: a private mosquitto from the shipped config, agents and an
aggregator as real processes on the tiny model, plant devices, and the invariant checks.

Everything lives under one short work directory (Unix socket paths for sd_notify are limited to
108 bytes) and ``World.close`` stops every process it started, whatever the scenario did.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.integration.conftest import (
    ENGINE_FP32_ONE_THREAD,
    AgentProcess,
    Peer,
    wait_until,
    write_agent_config,
)
from tests.integration.fleet import fleet_section, write_hq_config
from tests.integration.mosquitto import SHIPPED_ACL, Mosquitto
from tests.integration.plant import Device

SITE = "plant-t"

LEARNING = {
    "enabled": True,
    "min_new_samples": 150,
    "min_interval_s": 0,
    "epochs": 6,
    "learning_rate": 5e-3,
    "max_cpu_percent": 100,
    "min_free_memory_mb": 0,
    "max_inference_p99_ms": 100000,
}
SYNC = {"enabled": True, "min_examples": 50, "upload_interval_s": 0, "resend_after_s": 2}


def box_topic(device: str, suffix: str) -> str:
    return f"edge/{SITE}/{device}/{suffix}"


@dataclass
class Box:
    """One agent: its config, database and (while running) its process."""

    name: str
    config: Path
    data_dir: Path
    world: World
    proc: AgentProcess | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def db(self) -> Path:
        return self.data_dir / "edge-agent.db"

    def start(self, wait: bool = True) -> Box:
        self.proc = self.world.spawn(self.config, extra_env=self.extra_env)
        if wait:
            self.proc.wait_ready(90)
            self.world.wait_online(self.name)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.world.ended.add(id(self.proc))
        self.proc.kill()

    def stop(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.world.ended.add(id(self.proc))
        self.proc.terminate()
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.proc.poll() is None

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        conn = sqlite3.connect(self.db, timeout=10)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def topic(self, suffix: str) -> str:
        return box_topic(self.name, suffix)


# The shipped ACL (examples/mosquitto.acl: each box only its own topics, operators everything),
# plus a plant producer allowed to feed one box: what a hostile device on the line would have.
PRODUCER = ("line-gw", "gw-secret")
PRODUCER_ACL = f"""
user {PRODUCER[0]}
topic write edge/{SITE}/box-2/samples
topic write edge/{SITE}/box-2/infer/req
topic read edge/{SITE}/box-2/infer/res
"""
OPERATOR = ("operator", "op-secret")


class World:
    def __init__(
        self,
        root: Path,
        bundle: Path,
        *,
        broker_settings: dict[str, str | None] | None = None,
        secure_boxes: tuple[str, ...] = (),
    ):
        """``secure_boxes``: a broker with TLS, a password per box (and the operator) and the ACL."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.bundle = bundle
        self.passwords = {name: f"{name}-secret" for name in secure_boxes}
        if secure_boxes:
            users = {**self.passwords, OPERATOR[0]: OPERATOR[1], PRODUCER[0]: PRODUCER[1]}
            acl = SHIPPED_ACL.read_text() + PRODUCER_ACL
            self.broker = Mosquitto.secured(self.root / "broker", users, acl).start()
            self.peer = self.client(*OPERATOR)
        else:
            self.broker = Mosquitto(self.root / "broker", settings=broker_settings).start()
            self.peer = Peer(self.broker)
        self.peer.subscribe(f"edge/{SITE}/#", "fed/#")
        self.boxes: dict[str, Box] = {}
        self.procs: list[AgentProcess] = []
        self.keys: tuple[Path, Path] | None = None
        self.hq_config: Path | None = None
        self.hq: AgentProcess | None = None
        self.clock_file = self.root / "clock"
        self.ended: set[int] = set()  # processes the scenario itself killed or stopped

    def client(self, username: str, password: str | None = None) -> Peer:
        """An MQTT client logged in as ``username`` (a box's identity: what a hostile device has)."""
        known = {**self.passwords, OPERATOR[0]: OPERATOR[1], PRODUCER[0]: PRODUCER[1]}
        return Peer(self.broker, username=username, password=password or known[username])

    def broker_toml(self, name: str) -> str:
        """The [broker] lines of a box on the secured broker: its user, password file, the CA."""
        if name not in self.passwords:
            return ""
        pw = self.root / f"{name}.password"
        pw.write_text(self.passwords[name] + "\n")
        return (
            f'username = "{name}"\npassword_file = "{pw}"\n[broker.tls]\nca_file = "{self.broker.tls_ca}"\n'
        )

    # ---- processes ------------------------------------------------------------------------------
    def spawn(
        self, config: Path, command: tuple[str, ...] = ("run",), extra_env: dict[str, str] | None = None
    ) -> AgentProcess:
        p = AgentProcess(
            config,
            self.root,
            command=command,
            extra_env={"EDGE_AGENT_CLOCK_FILE": str(self.clock_file), **(extra_env or {})},
        )
        self.procs.append(p)
        return p

    def box(
        self,
        name: str,
        *,
        fleet: bool = False,
        port: int | None = None,
        data_dir: Path | None = None,
        extra: str = "",
        start: bool = True,
    ) -> Box:
        data = data_dir or self.root / name
        toml = extra + (fleet_section(self.fleet_keys()[1]) if fleet else "")
        config = write_agent_config(
            self.root / f"{name}.toml",
            self.broker,
            self.bundle,
            data,
            extra=toml,
            engine=ENGINE_FP32_ONE_THREAD,
            device=name,
            port=port,
            broker_extra=self.broker_toml(name),
        )
        b = Box(name, config, data, self)
        self.boxes[name] = b
        return b.start() if start else b

    def fleet_keys(self) -> tuple[Path, Path]:
        if self.keys is None:
            from agent.fed.signing import generate_keys

            self.keys = generate_keys(self.root / "keys")
        return self.keys

    def aggregator(self, **rounds: Any) -> AgentProcess:
        if self.hq_config is None or rounds:
            self.hq_config = write_hq_config(
                self.root / "hq.toml",
                self.broker,
                self.bundle,
                self.root / "hq",
                self.fleet_keys()[0],
                **rounds,
            )
        self.hq = self.spawn(self.hq_config, command=("aggregator", "run")).wait_ready(60)
        return self.hq

    def stop_hq(self) -> None:
        assert self.hq is not None
        self.ended.add(id(self.hq))
        self.hq.terminate()
        self.hq.wait(30)

    def crashes(self) -> list[str]:
        """Processes that ended although nothing here ended them, with the tail of their log."""
        out = []
        for p in self.procs:
            code = p.proc.poll()
            if code is not None and id(p) not in self.ended:
                out.append(f"{p.config_path.name} exited {code}: {p.log()[-1500:]}")
        return out

    def close(self) -> None:
        for p in self.procs:
            p.close()
        self.peer.close()
        self.broker.stop()

    # ---- talking to boxes -------------------------------------------------------------------------
    def wait_online(self, name: str, timeout: float = 30) -> None:
        self.peer.expect(
            box_topic(name, "status"),
            lambda m: m.get("state") == "online" and m.get("pid") == self.boxes[name].proc.proc.pid,
            timeout,
        )  # type: ignore[union-attr]

    def configure(self, box: Box, version: int, **sections: Any) -> dict:
        self.peer.publish(box.topic("config"), {"version": version, **sections}, retain=True)
        return self.peer.expect(box.topic("config/state"), lambda m: m.get("version") == version, 30).json

    def command(self, box: Box, cmd: str, timeout: float = 30, **args: Any) -> dict:
        cid = f"{cmd}-{time.monotonic_ns()}"
        self.peer.publish(box.topic("cmd"), {"id": cid, "cmd": cmd, "args": args})
        return self.peer.expect(box.topic("cmd/res"), lambda m: m.get("id") == cid, timeout).json

    def ask(self, box: Box, text: str = "breaker tripped on machine M3 line 2", timeout: float = 30) -> dict:
        rid = f"q-{time.monotonic_ns()}"
        self.peer.publish(box.topic("infer/req"), {"id": rid, "text": text})
        return self.peer.expect(box.topic("infer/res"), lambda m: m.get("id") == rid, timeout).json

    def events(self, box: Box, suffix: str, pred: Callable[[dict], bool] = lambda m: True) -> list[dict]:
        return [r.json for r in list(self.peer.received) if r.topic == box.topic(suffix) and pred(r.json)]

    def devices(self, n: int, box: Box, prefix: str = "d") -> list[Device]:
        return [Device(self.broker, f"{prefix}{k}", topic=box.topic("samples")) for k in range(n)]


# ---- invariants ---------------------------------------------------------------------------------


def stored_samples(box: Box) -> tuple[set[str], int]:
    rows = box.query("SELECT sample_id FROM samples")
    return {r[0] for r in rows}, len(rows)


def settle_rows(box: Box, expected: int, quiet_s: float = 3.0, timeout: float = 90) -> int:
    """Wait until ``expected`` samples are stored, or nothing new arrived for ``quiet_s``."""
    last = {"n": -1, "at": time.monotonic()}

    def settled() -> bool:
        n = box.query("SELECT count(*) FROM samples")[0][0]
        if n != last["n"]:
            last.update(n=n, at=time.monotonic())
        return n >= expected or time.monotonic() - last["at"] > quiet_s

    wait_until(settled, timeout=timeout, what="ingest settling")
    return int(last["n"])


def integrity_ok(db: Path) -> bool:
    conn = sqlite3.connect(db, timeout=10)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def active_adapter_verified(world: World, box: Box) -> bool:
    """The adapter the box serves is the registry's active one and its files pass every check."""
    from agent.adapters import AdapterError, read_adapter
    from agent.bundle import load_manifest

    status = world.command(box, "status")["result"]
    serving = status["adapter_version"]
    rows = box.query("SELECT value FROM learner_state WHERE key = 'active'")
    active = rows[0][0] if rows else None
    if serving != active:
        return False
    if active is None:
        return True
    try:
        read_adapter(box.data_dir / "adapters" / active, load_manifest(world.bundle))
    except (AdapterError, OSError):
        return False
    return True


def fed_uploads(world: World) -> list[tuple]:
    conn = sqlite3.connect(world.root / "hq" / "aggregator.db", timeout=10)
    try:
        return conn.execute("SELECT upload_id, device, round_id, status FROM uploads ORDER BY id").fetchall()
    finally:
        conn.close()


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
