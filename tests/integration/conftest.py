"""Daemon integration fixtures: a real mosquitto per test, a real SQLite file, the real engine on
the tiny bundle (``tiny_bundle`` from tests/conftest.py) or its token-classification twin
(``token_bundle``), the daemon in-process or as a process."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.integration.mosquitto import Mosquitto

ROOT = Path(__file__).resolve().parents[2]
SITE, DEVICE = "plant-t", "box-1"
BASE = f"edge/{SITE}/{DEVICE}/"
ENTITY_LABELS = json.loads((ROOT / "models" / "entities.json").read_text())["labels"]


def wait_until(
    pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def query(db_path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(db_path, timeout=5)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="session")
def token_bundle(tmp_path_factory) -> Path:
    """A tiny token-classification bundle (work-order entities, BILOU tags), short windows."""
    from agent.build import build_bundle
    from tests.tiny import make_tiny_bert

    root = tmp_path_factory.mktemp("tiny-token")
    out = root / "bundle"
    build_bundle(
        out,
        model_path=make_tiny_bert(root / "hf-model"),
        labels=ENTITY_LABELS,
        precisions=("fp32", "int8"),
        max_length=48,  # short windows: long texts need several
        task="token-classification",
        tag_scheme="BILOU",
    )
    return out


@pytest.fixture
def broker(tmp_path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path / "broker").start()
    yield m
    m.stop()


# ---- a test-side MQTT client ---------------------------------------------------------------------


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    correlation_data: bytes | None

    @property
    def json(self) -> Any:
        return json.loads(self.payload)


class Peer:
    """A plain MQTT 5 client: publishes at QoS 1 (waits for the broker's ack) and collects what it hears."""

    def __init__(
        self, broker: Mosquitto, client_id: str | None = None, username: str | None = None, password: str = ""
    ):
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"peer-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        if broker.tls_ca is not None:
            self.client.tls_set(ca_certs=str(broker.tls_ca))
        if username:
            self.client.username_pw_set(username, password)
        self._cond = threading.Condition()
        self.received: list[Received] = []
        self.client.on_message = self._on_message
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.connect(broker.host, broker.port, clean_start=True)
        self.client.loop_start()
        assert connected.wait(10), "peer could not connect"

    def _on_message(self, client, userdata, m) -> None:
        props = m.properties
        r = Received(
            m.topic,
            bytes(m.payload),
            bool(m.retain),
            getattr(props, "CorrelationData", None) if props else None,
        )
        with self._cond:
            self.received.append(r)
            self._cond.notify_all()

    def subscribe(self, *topics: str) -> Peer:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe([(t, 1) for t in topics])
        assert done.wait(10), "no SUBACK"
        return self

    def publish(
        self,
        suffix_or_topic: str,
        payload: Any,
        *,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> None:
        topic = (
            suffix_or_topic
            if suffix_or_topic.startswith(("edge/", "$", "reply/", "fed/"))
            else BASE + suffix_or_topic
        )
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload)
        props = None
        if response_topic or correlation_data:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation_data:
                props.CorrelationData = correlation_data
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=props)
        info.wait_for_publish(10)

    def expect(
        self, suffix_or_topic: str, pred: Callable[[Any], bool] | None = None, timeout: float = 10.0
    ) -> Received:
        """The first message on the topic (matching ``pred`` on its JSON) received so far or within timeout."""
        topic = (
            suffix_or_topic
            if suffix_or_topic.startswith(("edge/", "reply/", "fed/"))
            else BASE + suffix_or_topic
        )
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for r in self.received:
                    if r.topic == topic and (pred is None or pred(r.json)):
                        return r
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [(r.topic, r.payload[:200]) for r in self.received[-10:]]
                    raise AssertionError(f"nothing on {topic} matching within {timeout}s; last seen: {seen}")
                self._cond.wait(remaining)

    def on(self, suffix: str) -> list[Received]:
        with self._cond:
            return [r for r in self.received if r.topic == BASE + suffix]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peer(broker) -> Iterator[Peer]:
    p = Peer(broker).subscribe(BASE + "#", "reply/#")
    yield p
    p.close()


# ---- agent config and runners --------------------------------------------------------------------


ENGINE_FP32_ONE_THREAD = 'precision = "fp32"\nprovider = "cpu"\nintra_op_threads = 1\n'


def write_agent_config(
    path: Path,
    broker: Mosquitto,
    bundle: Path,
    data_dir: Path,
    extra: str = "",
    engine: str = ENGINE_FP32_ONE_THREAD,
    *,
    site: str = SITE,
    device: str = DEVICE,
    port: int | None = None,
    broker_extra: str = "",
) -> Path:
    """A bootstrap file for a box on ``broker`` (or on ``port`` of the same host: a relay)."""
    path.write_text(
        f"""\
site = "{site}"
device = "{device}"
data_dir = "{data_dir}"
bundle = "{bundle}"
log_level = "INFO"

[broker]
host = "{broker.host}"
port = {port or broker.port}
keepalive_s = 5
reconnect_min_delay_s = 0.2
reconnect_max_delay_s = 1.0
{broker_extra}
[engine]
{engine}
{extra}
"""
    )
    return path


@pytest.fixture
def agent_config(tmp_path, broker, tiny_bundle) -> Path:
    return write_agent_config(tmp_path / "agent.toml", broker, tiny_bundle, tmp_path / "data")


def db_path(config_path: Path) -> Path:
    from agent.config import load_bootstrap

    return load_bootstrap(config_path).db_path


class InProcessAgent:
    """The daemon's app object in this process: what a test needs to look inside."""

    def __init__(self, config_path: Path):
        from agent import exit_codes
        from agent.config import load_bootstrap
        from agent.daemon import EdgeAgent, init_app

        self.app = EdgeAgent(load_bootstrap(config_path), config_path=config_path)
        code = init_app(self.app)
        assert code == exit_codes.OK, f"init failed with exit code {code}"
        self.app.start()

    def wait_connected(self, timeout: float = 10.0) -> InProcessAgent:
        assert self.app.transport.wait_connected(timeout), "agent did not connect"
        return self

    def stop(self) -> None:
        self.app.stop()


@pytest.fixture
def start_agent(agent_config) -> Iterator[Callable[..., InProcessAgent]]:
    running: list[InProcessAgent] = []

    def start(config_path: Path | None = None, connect: bool = True) -> InProcessAgent:
        a = InProcessAgent(config_path or agent_config)
        running.append(a)
        return a.wait_connected() if connect else a

    yield start
    for a in running:
        if not a.app.stop_event.is_set():
            a.stop()


class NotifyListener:
    """The systemd side of sd_notify: a datagram socket collecting what the daemon sends."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def poll(self) -> list[str]:
        while True:
            try:
                self.messages.extend(self.sock.recv(4096).decode().splitlines())
            except (TimeoutError, BlockingIOError):
                return self.messages

    def wait_for(self, line: str, timeout: float = 30.0) -> None:
        wait_until(lambda: line in self.poll(), timeout, what=f"sd_notify {line}")

    def close(self) -> None:
        self.sock.close()


class AgentProcess:
    """``edge-agent run`` as a child process, for what only a process can show: signals, kill -9."""

    def __init__(
        self,
        config_path: Path,
        workdir: Path,
        watchdog_usec: int | None = 2_000_000,
        command: tuple[str, ...] = ("run",),
        extra_env: dict[str, str] | None = None,
    ):
        """``edge-agent {command} --config PATH``: the daemon, or e.g. ``("aggregator", "run")``."""
        self.config_path = config_path
        self.workdir = workdir
        self.log_path = workdir / f"agent-{uuid.uuid4().hex[:6]}.log"
        self.notify = NotifyListener(workdir / f"notify-{uuid.uuid4().hex[:6]}.sock")
        env = {**os.environ, "NOTIFY_SOCKET": self.notify.path, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", *command, "--config", str(config_path)],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60.0) -> AgentProcess:
        try:
            self.notify.wait_for("READY=1", timeout)
        except AssertionError:
            raise AssertionError(f"agent not ready; exit {self.proc.poll()}; log:\n{self.log()}") from None
        return self

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
        self.notify.close()


@pytest.fixture
def spawn_agent(tmp_path) -> Iterator[Callable[..., AgentProcess]]:
    procs: list[AgentProcess] = []

    def spawn(config_path: Path, **kw) -> AgentProcess:
        p = AgentProcess(config_path, tmp_path, **kw)
        procs.append(p)
        return p

    yield spawn
    for p in procs:
        p.close()
