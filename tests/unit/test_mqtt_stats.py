"""MqttClient's resume accounting and $SYS reading, driven through its paho callbacks (no broker)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from agent.config import BrokerConfig
from agent.mqtt import SHIPPED_BROKER_QUEUE, SYS_DROPPED_TOPIC, BrokerQueue, InboundMessage, MqttClient, Will

BASE = "edge/plant-u/box-u/"
MARKER = BASE + "mqtt/resume"


class FakePaho:
    """What the callbacks call on paho's client: subscribe, publish, ack."""

    def __init__(self) -> None:
        self.subscribed: list[tuple[str, int]] = []
        self.published: list[tuple[str, bytes, int]] = []
        self.acked: list[int] = []

    def socket(self) -> None:
        return None

    def subscribe(self, topics):
        self.subscribed = [(t, opts.QoS) for t, opts in topics]
        return 0, 7

    def publish(self, topic, payload, qos=0):
        self.published.append((topic, payload, qos))

    def ack(self, mid, qos):
        self.acked.append(mid)


def make(read_sys_dropped: bool = True) -> tuple[MqttClient, FakePaho, list[InboundMessage]]:
    got: list[InboundMessage] = []
    client = MqttClient(
        BrokerConfig(host="127.0.0.1", read_sys_dropped=read_sys_dropped),
        "box-u",
        will=Will(BASE + "status", {"state": "offline"}),
        subscriptions={BASE + "samples": False, BASE + "config": True},
        on_message=got.append,
    )
    fake = FakePaho()
    client._client = fake  # type: ignore[assignment]  # acks go through the client's own paho
    return client, fake, got


def connect(client: MqttClient, fake: FakePaho, resumed: bool) -> None:
    client._on_connect(
        fake, None, SimpleNamespace(session_present=resumed), SimpleNamespace(is_failure=False), None
    )


def message(topic: str, payload: bytes, mid: int, qos: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        topic=topic, payload=payload, qos=qos, retain=False, mid=mid, dup=False, properties=None
    )


def test_new_session_counts_nothing_and_sends_no_marker():
    client, fake, got = make()
    connect(client, fake, resumed=False)
    client._on_message(fake, None, message(BASE + "samples", b"{}", 1))
    stats = client.stats()
    assert (stats["sessions_new"], stats["sessions_resumed"]) == (1, 0)
    assert stats["queued_received_last_resume"] is None and stats["queued_received_total"] == 0
    assert fake.published == [] and len(got) == 1
    assert (MARKER, 1) in fake.subscribed and (SYS_DROPPED_TOPIC, 0) in fake.subscribed


def test_resumed_session_counts_until_its_own_marker_comes_back():
    client, fake, got = make()
    connect(client, fake, resumed=True)
    [(topic, nonce, qos)] = fake.published
    assert topic == MARKER and qos == 1
    for mid in range(1, 4):
        client._on_message(fake, None, message(BASE + "samples", b"{}", mid))
    assert client.stats()["queued_last_resume_state"] == "receiving"
    client._on_message(fake, None, message(MARKER, b"stale-nonce", 4))  # an older connection's
    assert client.stats()["queued_last_resume_state"] == "receiving"
    client._on_message(fake, None, message(MARKER, nonce, 5))
    client._on_message(fake, None, message(BASE + "samples", b"{}", 6))  # live, after the marker
    stats = client.stats()
    assert stats["queued_last_resume_state"] == "complete"
    assert stats["queued_received_last_resume"] == stats["queued_received_total"] == 3
    assert [m.mid for m in got] == [1, 2, 3, 6], "markers never reach the handlers"
    assert fake.acked == [4, 5], "both markers acked by the transport itself"


def test_connection_lost_before_the_marker_is_an_interrupted_count():
    client, fake, _ = make()
    connect(client, fake, resumed=True)
    client._on_message(fake, None, message(BASE + "samples", b"{}", 1))
    client._on_disconnect(fake, None, None, "gone", None)
    connect(client, fake, resumed=True)
    client._on_message(fake, None, message(BASE + "samples", b"{}", 2))
    client._on_message(fake, None, message(BASE + "samples", b"{}", 3))
    stats = client.stats()
    assert stats["sessions_resumed"] == 2 and stats["queued_received_total"] == 3
    assert stats["queued_received_last_resume"] == 2 and stats["queued_last_resume_state"] == "receiving"
    client._on_disconnect(fake, None, None, "gone", None)
    assert client.stats()["queued_last_resume_state"] == "interrupted"


def test_sys_dropped_counter_is_read_and_a_rise_is_logged(caplog):
    client, fake, got = make()
    connect(client, fake, resumed=False)
    assert client.stats()["broker_dropped"] is None
    with caplog.at_level(logging.WARNING, logger="agent.mqtt"):
        client._on_message(fake, None, message(SYS_DROPPED_TOPIC, b"0", 0, qos=0))
        assert client.stats()["broker_dropped"] == 0 and not caplog.records
        client._on_message(fake, None, message(SYS_DROPPED_TOPIC, b"791", 0, qos=0))
        client._on_message(fake, None, message(SYS_DROPPED_TOPIC, b"not a number", 0, qos=0))
        client._on_message(fake, None, message("$SYS/broker/uptime", b"5 seconds", 0, qos=0))
    assert client.stats()["broker_dropped"] == 791
    assert [r.getMessage().split(" messages")[0] for r in caplog.records] == ["broker dropped 791"]
    client._on_message(fake, None, message(SYS_DROPPED_TOPIC, b"791", 9, qos=1))  # an old QoS 1 subscription
    assert fake.acked == [9] and got == [], "$SYS never reaches the handlers"


def test_sys_topics_not_subscribed_when_turned_off():
    client, fake, _ = make(read_sys_dropped=False)
    connect(client, fake, resumed=False)
    assert SYS_DROPPED_TOPIC not in [t for t, _ in fake.subscribed]
    assert client.stats()["broker_dropped"] is None


def test_covered_outage_is_the_first_limit_reached():
    assert SHIPPED_BROKER_QUEUE.covered_outage_s() == 3600
    assert SHIPPED_BROKER_QUEUE.covered_outage_s(msgs_per_s=10) == 36000
    assert SHIPPED_BROKER_QUEUE.covered_outage_s(mean_payload_bytes=2048) == 1800  # bytes bind first
    q = BrokerQueue(max_queued_messages=1000, max_queued_bytes=10**9, msgs_per_s=1000, mean_payload_bytes=200)
    assert q.covered_outage_s() == pytest.approx(1.0)
    assert SHIPPED_BROKER_QUEUE.describe()["covered_outage_s"] == 3600


def test_a_message_its_handler_raises_on_is_acked_not_left_to_clog_the_window():
    # Found by the chaos suite's fuzzing: a payload that made a handler raise stayed unacked, and
    # receive_maximum such messages would have silenced the box for good.
    def boom(msg: InboundMessage) -> None:
        raise RuntimeError("handler bug")

    client = MqttClient(
        BrokerConfig(host="127.0.0.1"),
        "box-u",
        will=Will(BASE + "status", {"state": "offline"}),
        subscriptions={BASE + "samples": False},
        on_message=boom,
    )
    fake = FakePaho()
    client._client = fake  # type: ignore[assignment]
    connect(client, fake, resumed=False)
    client._on_message(fake, None, message(BASE + "samples", b"{}", mid=41))
    assert fake.acked == [41]
    assert client.stats()["handler_errors"] == 1
