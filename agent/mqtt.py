"""The MQTT transport: paho v2 behind a small interface. The only module that imports paho.

MQTT 5, QoS 1, a stable client id and a persistent session (``clean_start=False`` plus a session
expiry), a retained last will, subscriptions made in ``on_connect``, refused connections logged as
refused (``reason_code.is_failure``), reconnects with backoff.

Inbound QoS 1 messages are acked by the application (``manual_ack``): handlers call
``Transport.ack(msg)`` once the message's effect is durable. A message carries the connection
*generation* it arrived on; acks for an earlier connection are dropped, because the broker
redelivers those messages on the new connection with the same packet ids, and a late ack could
otherwise acknowledge a different, not yet committed, message that reuses the id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import BrokerConfig

log = logging.getLogger(__name__)

QOS = 1
# Outbound QoS 1 messages kept while the broker is away (responses, predictions, results).
MAX_QUEUED_OUT = 20000


@dataclass(frozen=True)
class InboundMessage:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    dup: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None
    generation: int = 0
    received_at: float = 0.0  # time.monotonic()


Payload = dict[str, Any] | list[Any] | bytes | str


def encode(payload: Payload) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode()
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


class Transport(Protocol):
    """What handlers see of MQTT."""

    @property
    def connected(self) -> bool: ...

    def publish(
        self, topic: str, payload: Payload, *, retain: bool = False, correlation_data: bytes | None = None
    ) -> None: ...

    def ack(self, msg: InboundMessage) -> None: ...


@dataclass(frozen=True)
class Will:
    topic: str
    payload: Payload
    retain: bool = True


class MqttClient:
    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        *,
        will: Will,
        subscriptions: dict[str, bool],
        on_message: Callable[[InboundMessage], None],
        on_connection_change: Callable[[bool], None] | None = None,
    ):
        self._broker = broker
        self._client_id = client_id
        # topic -> whether the broker should send its retained message when we subscribe
        self._subscriptions = dict(subscriptions)
        self._on_message_cb = on_message
        self._on_connection_change = on_connection_change
        self._lock = threading.Lock()
        self._generation = 0
        self._connected = False
        self._connected_event = threading.Event()
        self._stopping = False
        self.last_error: str | None = None

        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        paho_log = logging.getLogger("agent.mqtt.paho")
        # paho's loop logs "Client is not connected" at ERROR once after every clean disconnect.
        paho_log.addFilter(
            lambda r: not (self._stopping and str(r.msg).startswith("Client is not connected"))
        )
        client.enable_logger(paho_log)
        # paho annotates these as int; it only ever adds and compares them, so seconds as floats work.
        client.reconnect_delay_set(
            min_delay=broker.reconnect_min_delay_s,  # type: ignore[arg-type]
            max_delay=broker.reconnect_max_delay_s,  # type: ignore[arg-type]
        )
        client.max_queued_messages_set(MAX_QUEUED_OUT)
        # An exception in a callback would otherwise end paho's network thread for good.
        client.suppress_exceptions = True
        client.will_set(will.topic, encode(will.payload), qos=QOS, retain=will.retain)
        if broker.username:
            client.username_pw_set(broker.username, broker.read_password())
        if broker.tls is not None:
            tls = broker.tls
            client.tls_set(
                ca_certs=str(tls.ca_file),
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
            )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._subscribe_mid: int | None = None
        self._client = client

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background; paho's thread retries until the broker answers."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._broker.session_expiry_s
        props.ReceiveMaximum = self._broker.receive_maximum
        self._client.connect_async(
            self._broker.host,
            self._broker.port,
            keepalive=self._broker.keepalive_s,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected and subscribed."""
        return self._connected_event.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Flush what is queued, disconnect cleanly (the session stays on the broker), stop the thread."""
        self._stopping = True
        if self._connected:
            deadline = time.monotonic() + timeout
            # Outbound QoS 1 messages not yet acked by the broker: give them a moment.
            while self._unacked_out() and time.monotonic() < deadline:
                time.sleep(0.01)
            self._client.disconnect()
        self._client.loop_stop()

    @property
    def alive(self) -> bool:
        """paho's network thread is running (it reconnects by itself while it does)."""
        thread = getattr(self._client, "_thread", None)
        return thread is not None and thread.is_alive()

    def _unacked_out(self) -> int:
        # paho keeps outbound QoS 1 messages here until the broker's PUBACK; it has no public count.
        return len(getattr(self._client, "_out_messages", ()))

    # ---- Transport ---------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected

    def publish(
        self, topic: str, payload: Payload, *, retain: bool = False, correlation_data: bytes | None = None
    ) -> None:
        props = None
        if correlation_data is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation_data
        info = self._client.publish(topic, encode(payload), qos=QOS, retain=retain, properties=props)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            # NO_CONN: queued, sent after the reconnect. Anything else (queue full): dropped.
            log.warning("publish to %s dropped: %s", topic, paho.error_string(info.rc))

    def publish_and_wait(
        self, topic: str, payload: Payload, *, retain: bool = False, timeout: float = 2.0
    ) -> bool:
        if not self._connected:
            return False
        info = self._client.publish(topic, encode(payload), qos=QOS, retain=retain)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()

    def ack(self, msg: InboundMessage) -> None:
        if msg.qos == 0:
            return
        with self._lock:
            if not self._connected or msg.generation != self._generation:
                # The broker redelivers it on the new connection; see the module docstring.
                log.debug(
                    "ack of mid %d from connection %d skipped (now %d)",
                    msg.mid,
                    msg.generation,
                    self._generation,
                )
                return
            self._client.ack(msg.mid, msg.qos)

    def resubscribe(self, topic: str) -> None:
        """Subscribe again: the broker then sends the topic's retained message once more."""
        if self._connected:
            self._client.subscribe(topic, options=SubscribeOptions(qos=QOS))

    # ---- paho callbacks (paho's network thread) ----------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            log.error("mqtt %s:%s: %s", self._broker.host, self._broker.port, self.last_error)
            return
        sock = client.socket()
        if sock is not None:
            # Replies are small packets written back to back: no Nagle delay on them.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._generation += 1
            self._connected = True
        self.last_error = None
        log.info(
            "mqtt connected to %s:%s as %s (session %s)",
            self._broker.host,
            self._broker.port,
            self._client_id,
            "resumed" if flags.session_present else "new",
        )
        _, self._subscribe_mid = client.subscribe(
            [
                (
                    t,
                    SubscribeOptions(
                        qos=QOS,
                        retainHandling=SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE
                        if retained
                        else SubscribeOptions.RETAIN_DO_NOT_SEND,
                    ),
                )
                for t, retained in self._subscriptions.items()
            ]
        )
        if self._on_connection_change:
            self._on_connection_change(True)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if mid != self._subscribe_mid:
            return
        for topic, rc in zip(self._subscriptions, reason_codes, strict=False):
            if rc.is_failure:
                log.error("subscription to %s refused: %s", topic, rc)
        # Connected *and* subscribed: from here on nothing published to us is missed.
        self._connected_event.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._lock:
            self._generation += 1
            was_connected, self._connected = self._connected, False
        self._connected_event.clear()
        if was_connected and not self._stopping:
            self.last_error = f"connection lost: {reason_code}"
            log.warning("mqtt %s:%s: %s; reconnecting", self._broker.host, self._broker.port, self.last_error)
        if self._on_connection_change:
            self._on_connection_change(False)

    def _on_message(self, client, userdata, message) -> None:
        try:
            props = message.properties
            msg = InboundMessage(
                topic=message.topic,
                payload=bytes(message.payload),
                qos=message.qos,
                retain=bool(message.retain),
                mid=message.mid,
                dup=bool(message.dup),
                response_topic=getattr(props, "ResponseTopic", None) if props else None,
                correlation_data=getattr(props, "CorrelationData", None) if props else None,
                generation=self._generation,
                received_at=time.monotonic(),
            )
            self._on_message_cb(msg)
        except Exception:
            # Never let a handler bug kill paho's network thread; the message stays unacked.
            log.exception("handler failed on a message (mid %d)", message.mid)
