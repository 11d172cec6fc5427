"""What the broker acknowledged to a device reaches SQLite exactly once while the agent is down.

A real mosquitto started from the shipped ``examples/mosquitto.conf``, the agent as a process on
the tiny bundle, and plant devices publishing 30,000 samples at QoS 1. Loss is counted from the
device side: the sample ids whose PUBACK (with a success reason code) the device received,
against the rows in SQLite. The agent is killed -9 shortly after the stream starts and started
again once every sample is acked, so nearly all of them wait in the broker's queue; the outage is
the seconds that publishing takes, not the issue's 60 s: what fills the queue is the message
count, which stays at 30,000. The converse runs the same stream against mosquitto's default queue
(no shipped limits) and sees the loss, and the agent reports it from the broker's $SYS counter.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from pathlib import Path

import pytest

from agent.config import BrokerConfig
from agent.mqtt import InboundMessage, MqttClient, Will
from tests.integration.conftest import BASE, Peer, db_path, query, wait_until, write_agent_config
from tests.integration.mosquitto import Mosquitto
from tests.integration.plant import DEVICE_IN_FLIGHT, Device

SAMPLES = 30_000
DEVICES = 3
# The agent's receive_maximum (BrokerConfig default): at most this many were in flight, unacked,
# when it was killed, and come again.
IN_FLIGHT = 1000
DEFAULT_QUEUE = {"max_queued_messages": None, "max_queued_bytes": None}


def rows(db: Path) -> int:
    return query(db, "SELECT coalesce(max(id), 0) FROM samples")[0][0]


def online(broker: Mosquitto) -> bool:
    p = Peer(broker).subscribe(BASE + "status")
    try:
        return p.expect("status").json["state"] == "online"
    finally:
        p.close()


def queued_counts(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"the broker had queued (\d+) messages", log)]


def dropped_readings(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"broker dropped (\d+) messages", log)]


def outage(broker: Mosquitto, spawn_agent, config: Path, *, restart_broker: bool = False) -> dict:
    """Samples stream in, the agent is killed -9 early and comes back once every one is acked."""
    db = db_path(config)
    agent = spawn_agent(config).wait_ready()
    wait_until(lambda: online(broker), what="agent online")
    devices = [Device(broker, f"d{k}") for k in range(DEVICES)]
    try:
        threads = [threading.Thread(target=d.publish, args=(SAMPLES // DEVICES,)) for d in devices]
        for t in threads:
            t.start()
        wait_until(lambda: rows(db) >= 300, timeout=30, what="the agent committing")
        agent.kill()
        committed_by_first = rows(db)
        if restart_broker:
            # Mid-outage: queued samples and the agent's session must come back from the disk.
            wait_until(lambda: sum(d.answered() for d in devices) >= SAMPLES // 2, timeout=60, what="half")
            broker.restart()
        for t in threads:
            t.join(60)
        wait_until(lambda: sum(d.answered() for d in devices) == SAMPLES, timeout=60, what="every PUBACK")
        acked = set().union(*(d.acked() for d in devices))
    finally:
        for d in devices:
            d.close()

    second = spawn_agent(config).wait_ready()
    # Settled: every acked sample stored, or nothing new for 3 s (what is lost does not come).
    last = {"rows": -1, "at": time.monotonic()}

    def settled() -> bool:
        n = rows(db)
        if n != last["rows"]:
            last.update(rows=n, at=time.monotonic())
        return n >= len(acked) or time.monotonic() - last["at"] > 3.0

    wait_until(settled, timeout=60, what="ingest after the restart")
    stored = query(db, "SELECT sample_id FROM samples")
    stored_ids = {r[0] for r in stored}
    return {
        "acked": acked,
        "stored_rows": len(stored),
        "stored_ids": stored_ids,
        "lost": acked - stored_ids,
        "committed_by_first": committed_by_first,
        "agent": second,
    }


@pytest.fixture
def config(tmp_path, broker, tiny_bundle) -> Path:
    return write_agent_config(tmp_path / "agent.toml", broker, tiny_bundle, tmp_path / "data")


def assert_exactly_once(r: dict) -> None:
    assert len(r["acked"]) == SAMPLES, "the shipped queue took every sample"
    assert r["lost"] == set(), f"{len(r['lost'])} samples acked to devices never reached SQLite"
    assert r["stored_rows"] == len(r["stored_ids"]) == SAMPLES, "each sample stored once"
    # Almost all of them waited in the broker's queue, and the agent counted them on its resume:
    # everything the first run had not committed, plus redeliveries of what it had committed
    # but not acked yet (at most its receive_maximum), plus, across a broker restart, the
    # devices' resends of samples whose PUBACK the restart cut off.
    expected = SAMPLES - r["committed_by_first"]
    counts = wait_until(lambda: queued_counts(r["agent"].log()), what="the resume count in the log")
    assert expected <= counts[-1] <= expected + IN_FLIGHT + DEVICES * DEVICE_IN_FLIGHT, (counts, expected)
    assert dropped_readings(r["agent"].log()) == [], "the broker dropped nothing"


def test_agent_outage_loses_nothing_the_broker_acked(broker, spawn_agent, config):
    assert_exactly_once(outage(broker, spawn_agent, config))


def test_broker_restart_during_the_outage_loses_nothing(broker, spawn_agent, config):
    r = outage(broker, spawn_agent, config, restart_broker=True)
    assert_exactly_once(r)
    assert "Saving in-memory database" in broker.log_tail(200)


def test_default_broker_queue_loses_what_it_acked(tmp_path, spawn_agent, tiny_bundle):
    """The converse: mosquitto's own defaults (1000 queued per client) drop most of the outage."""
    broker = Mosquitto(tmp_path / "default-broker", settings={**DEFAULT_QUEUE, "sys_interval": "1"}).start()
    try:
        config = write_agent_config(tmp_path / "agent.toml", broker, tiny_bundle, tmp_path / "data")
        r = outage(broker, spawn_agent, config)
        assert len(r["acked"]) == SAMPLES, "the broker acked every sample, as it does"
        assert len(r["lost"]) > 0, "the device-side counter sees the loss"
        assert r["stored_ids"] <= r["acked"] and r["stored_rows"] == len(r["stored_ids"])
        # The agent found out: it logs mosquitto's dropped counter, read from $SYS. The counter
        # covers the loss; it can exceed it by samples the killed agent had committed but not yet
        # acked (mosquitto drops from the same queue what it was about to redeliver).
        lost = len(r["lost"])

        def reading() -> int:
            return (dropped_readings(r["agent"].log()) or [0])[-1]

        wait_until(lambda: reading() >= lost, timeout=15, what=f"the agent logging >= {lost} dropped")
        assert reading() <= lost + IN_FLIGHT
        assert "Outgoing messages are being dropped" in broker.log_tail(400)
    finally:
        broker.stop()


# ---- MqttClient.stats() against a real broker (no daemon) ---------------------------------------


class Box:
    """The agent's transport alone: acks each message at once and keeps the sample ids."""

    def __init__(self, broker: Mosquitto, client_id: str):
        self.ids: list[str] = []
        self.client = MqttClient(
            BrokerConfig(host=broker.host, port=broker.port, reconnect_min_delay_s=0.1),
            client_id,
            will=Will(BASE + "status", {"state": "offline"}),
            subscriptions={BASE + "samples": False},
            on_message=self._on_message,
        )
        self.client.start()
        assert self.client.wait_connected(10)

    def _on_message(self, msg: InboundMessage) -> None:
        self.ids.append(json.loads(msg.payload)["id"])
        self.client.ack(msg)

    def stop(self) -> None:
        self.client.stop()


def publish(broker: Mosquitto, prefix: str, n: int) -> None:
    p = Peer(broker)
    try:
        for i in range(n):
            p.client.publish(BASE + "samples", json.dumps({"id": f"{prefix}{i}"}), qos=1)
        p.publish("samples", {"id": f"{prefix}last"})  # waits for its PUBACK: every one before it too
    finally:
        p.close()


def test_stats_count_what_the_broker_queued_and_dropped(tmp_path):
    box_id = f"box-{uuid.uuid4().hex[:6]}"
    broker = Mosquitto(tmp_path / "b", settings={"max_queued_messages": "100", "sys_interval": "1"}).start()
    try:
        box = Box(broker, box_id)
        first = box.client.stats()
        assert first["sessions_new"] == 1 and first["sessions_resumed"] == 0
        assert first["queued_received_last_resume"] is None
        wait_until(lambda: box.client.stats()["broker_dropped"] == 0, what="$SYS read")
        box.stop()  # clean disconnect: the session and its queue stay on the broker

        publish(broker, "q", 299)  # 300 while away; the queue holds 100
        box = Box(broker, box_id)
        wait_until(lambda: box.client.stats()["queued_last_resume_state"] == "complete", what="marker")
        stats = box.client.stats()
        assert stats["sessions_resumed"] == 1
        assert stats["queued_received_last_resume"] == stats["queued_received_total"] == 100
        assert box.ids == [f"q{i}" for i in range(100)], "the first 100, in order"
        wait_until(lambda: box.client.stats()["broker_dropped"] == 200, what="200 dropped")

        publish(broker, "live", 9)  # after the marker: live traffic, not the queue
        wait_until(lambda: len(box.ids) == 110, what="live samples")
        assert box.client.stats()["queued_received_total"] == 100
        assert box.client.stats()["shipped_broker_queue"]["covered_outage_s"] == 3600
        box.stop()
    finally:
        broker.stop()
