"""``edge-agent run`` as a process: kill -9, SIGTERM, last will, systemd notification, exit codes,
and the example config served to mosquitto_pub/mosquitto_sub."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys

import pytest

from agent import exit_codes
from agent.health import check_status_file
from tests.integration.conftest import BASE, ROOT, Peer, db_path, query, wait_until, write_agent_config


@pytest.fixture
def process_config(tmp_path, broker, tiny_bundle):
    # A short busy timeout, so a locked database shows up at once.
    return write_agent_config(
        tmp_path / "agent.toml",
        broker,
        tiny_bundle,
        tmp_path / "data",
        extra="[store]\nbusy_timeout_ms = 50\n",
    )


def late_status(broker) -> dict:
    p = Peer(broker).subscribe(BASE + "status")
    try:
        return p.expect("status").json
    finally:
        p.close()


def test_kill9_between_receive_and_commit_loses_nothing(broker, peer, spawn_agent, process_config):
    agent = spawn_agent(process_config).wait_ready()
    db = db_path(process_config)
    wait_until(lambda: late_status(broker)["state"] == "online", what="online")
    blocker = sqlite3.connect(db)
    blocker.execute("BEGIN IMMEDIATE")  # the agent receives but cannot commit
    try:
        for i in range(20):
            peer.publish("samples", {"id": f"k{i}", "text": f"kill test {i}", "label": "thermal"})
        peer.expect("samples/res", lambda m: m["error"]["code"] == "storage_error")
        agent.kill()  # between receive and commit
    finally:
        blocker.rollback()
        blocker.close()
    assert query(db, "SELECT count(*) FROM samples")[0][0] == 0
    # the broker noticed the abrupt loss: the last will replaced the retained status
    wait_until(
        lambda: late_status(broker) == {"state": "offline", "clean": False, "device": "box-1"},
        what="last will",
    )

    spawn_agent(process_config).wait_ready()  # same client id: the broker redelivers the unacked samples
    wait_until(lambda: query(db, "SELECT count(*) FROM samples")[0][0] == 20, timeout=20, what="20 samples")
    assert query(db, "SELECT count(DISTINCT sample_id), min(sample_id), max(sample_id) FROM samples") == [
        (20, "k0", "k9")
    ]


def test_sigterm_finishes_work_acks_it_and_exits_0(broker, peer, spawn_agent, process_config):
    agent = spawn_agent(process_config).wait_ready()
    agent.notify.wait_for("WATCHDOG=1", timeout=10)
    assert any(m.startswith("STATUS=connected to") for m in agent.notify.poll())
    # The status file a container's HEALTHCHECK reads (edge-agent healthcheck).
    status_file = db_path(process_config).parent / "status.json"
    wait_until(lambda: status_file.exists(), what="status file")
    assert check_status_file(status_file).ok, status_file.read_text()
    for i in range(30):
        peer.publish("samples", {"id": f"t{i}", "text": f"term test {i}", "label": "normal"})
        peer.publish("infer/req", {"id": f"q{i}", "texts": [f"request {i} text {j}" for j in range(8)]})
    agent.terminate()
    assert agent.wait(30) == exit_codes.OK, agent.log()
    assert "STOPPING=1" in agent.notify.poll()
    assert "stopped cleanly" in agent.log()
    assert not check_status_file(status_file).ok  # stopping: unhealthy from now on
    status = late_status(broker)
    assert status["state"] == "offline" and status["clean"] is True

    # Whatever arrived after SIGTERM stayed unacked on the broker: the next run serves it.
    spawn_agent(process_config).wait_ready()
    db = db_path(process_config)
    wait_until(lambda: query(db, "SELECT count(*) FROM samples")[0][0] == 30, timeout=20, what="30 samples")
    wait_until(
        lambda: len({m.json["id"] for m in peer.on("infer/res")}) == 30, timeout=20, what="30 responses"
    )
    # every request answered exactly once: what the first run took on, it finished and acked
    ids = [m.json["id"] for m in peer.on("infer/res")]
    assert sorted(ids) == sorted(f"q{i}" for i in range(30))


def test_bad_bootstrap_config_exits_with_config_error(tmp_path, broker, tiny_bundle):
    bad = tmp_path / "bad.toml"
    bad.write_text('site = "s"\ndevice = "d/x"\ndata_dir = "x"\nbundle = "y"\n[broker]\nport = "1883"\n')
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == exit_codes.CONFIG_ERROR
    assert "device:" in run.stderr and "broker.host: Field required" in run.stderr

    check = subprocess.run(
        [sys.executable, "-m", "agent.cli", "validate-config", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == exit_codes.CONFIG_ERROR
    lines = [x for x in check.stderr.splitlines() if x.startswith(f"{bad}: ") and "error(s)" not in x]
    assert sorted(re.match(rf"{re.escape(str(bad))}: ([\w.]+):", x).group(1) for x in lines) == [
        "broker.host",
        "broker.port",
        "device",
    ]

    nobundle = write_agent_config(tmp_path / "nobundle.toml", broker, tmp_path / "missing", tmp_path / "data")
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(nobundle)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == exit_codes.BUNDLE_ERROR, run.stderr


def test_config_schema_command():
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "config-schema"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0
    schema = json.loads(out.stdout)
    assert schema["title"] == "RuntimeConfig" and "inference" in schema["properties"]


@pytest.mark.skipif(not shutil.which("mosquitto_pub"), reason="mosquitto-clients not installed")
def test_example_config_serves_mosquitto_clients(tmp_path, broker, tiny_bundle, spawn_agent):
    text = (ROOT / "examples" / "edge-agent.toml").read_text()
    text = text.replace("port = 1884", f"port = {broker.port}")
    text = text.replace('bundle = "../build/bundle-minilm"', f'bundle = "{tiny_bundle}"')
    text = text.replace('data_dir = "../build/edge-agent-data"', f'data_dir = "{tmp_path / "data"}"')
    config = tmp_path / "edge-agent.toml"
    config.write_text(text)
    assert (
        subprocess.run(
            [sys.executable, "-m", "agent.cli", "validate-config", str(config)],
            cwd=ROOT,
            capture_output=True,
            timeout=60,
        ).returncode
        == 0
    )
    spawn_agent(config).wait_ready()
    base = "edge/plant-a/line3-box1/"

    def client(tool: str, *args: str) -> list[str]:
        # The mosquitto command-line clients, as the README session uses them.
        return [tool, "-V", "mqttv5", "-h", broker.host, "-p", str(broker.port), *args]

    sub = subprocess.Popen(
        client("mosquitto_sub", "-t", base + "infer/res", "-C", "1", "-W", "30"),
        stdout=subprocess.PIPE,
        text=True,
    )
    request = {"id": "cli-1", "text": "motor M4 overheating, thermal relay tripped"}
    # mosquitto_sub subscribes in its own time: publish until it prints the answer
    out = None
    for _ in range(20):
        subprocess.run(
            client("mosquitto_pub", "-q", "1", "-t", base + "infer/req", "-m", json.dumps(request)),
            check=True,
            timeout=10,
        )
        try:
            out = sub.communicate(timeout=1.0)[0]
            break
        except subprocess.TimeoutExpired:
            continue
    assert out, "mosquitto_sub got no response"
    res = json.loads(out.splitlines()[0])
    assert res["id"] == "cli-1" and res["predictions"][0]["label"]
