"""Plant devices for tests and the chaos suite: MQTT 5 clients that publish at QoS 1 and know
which of their messages the broker acknowledged, so loss is counted from the device's side."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.integration.conftest import BASE
from tests.integration.mosquitto import Mosquitto
from tests.tiny import TINY_LABELS

DEVICE_IN_FLIGHT = 50  # a device's window; a broker restart may see those twice (QoS 1 resend)


def sample_body(sid: str, i: int) -> dict[str, Any]:
    return {"id": sid, "text": f"line 3 press {i % 97} vibration {i}", "label": TINY_LABELS[i % 4]}


class Device:
    """A plant device: MQTT 5, persistent session, QoS 1; it knows which of its samples the broker acked."""

    def __init__(self, broker: Mosquitto, name: str, topic: str = BASE + "samples", port: int | None = None):
        self.name = name
        self.topic = topic
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"device-{name}-{uuid.uuid4().hex[:6]}",
            protocol=paho.MQTTv5,
        )
        self.client.max_inflight_messages_set(DEVICE_IN_FLIGHT)
        self.client.reconnect_delay_set(0.05, 0.5)
        self._lock = threading.Lock()
        self._reason: dict[int, bool] = {}  # mid -> PUBACK said success (mids are unique below 65535)
        self.sent: list[tuple[str, paho.MQTTMessageInfo]] = []
        self.client.on_publish = self._on_publish
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600  # in-flight samples survive a broker restart
        self.client.connect(broker.host, port or broker.port, clean_start=False, properties=props)
        self.client.loop_start()
        assert connected.wait(10), "device could not connect"

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            self._reason[mid] = not reason_code.is_failure

    def publish(
        self, n: int, body: Callable[[str, int], dict[str, Any]] = sample_body, start: int = 0
    ) -> None:
        """``n`` samples with ids ``{name}-{i}``; mids stay unique while a device sends < 65535."""
        assert len(self.sent) + n < 65535, "one mid per sample"
        for i in range(start, start + n):
            sid = f"{self.name}-{i}"
            self.sent.append((sid, self.client.publish(self.topic, json.dumps(body(sid, i)), qos=1)))

    def answered(self) -> int:
        return sum(info.is_published() for _, info in self.sent)

    def acked(self) -> set[str]:
        """The samples whose PUBACK carried a success code: what the plant considers delivered."""
        with self._lock:
            return {sid for sid, info in self.sent if info.is_published() and self._reason.get(info.mid)}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
