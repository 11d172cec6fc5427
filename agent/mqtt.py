"""The MQTT transport: paho v2 behind a small interface. The only module that imports paho.

MQTT 5, QoS 1, a stable client id and a persistent session (``clean_start=False`` plus a session
expiry), a retained last will, subscriptions made in ``on_connect``, reconnects with backoff.

A connection that fails says why, in ``last_error`` (status, telemetry's ``mqtt``, the daemon's
systemd STATUS line) and in the log: a refused CONNACK with the broker's reason code and what to
check (user name and password, client certificate), a TLS failure with OpenSSL's verdict (untrusted
CA, a certificate that does not name the host, a client certificate the broker refused), a
connection the broker closed before it answered (plain TCP to a TLS listener). paho by itself only
retries; the log repeats an unchanged error at most every ``REPEAT_ERROR_LOG_S``.

Inbound QoS 1 messages are acked by the application (``manual_ack``): handlers call
``Transport.ack(msg)`` once the message's effect is durable. A message carries the connection
*generation* it arrived on; acks for an earlier connection are dropped, because the broker
redelivers those messages on the new connection with the same packet ids, and a late ack could
otherwise acknowledge a different, not yet committed, message that reuses the id.

What the broker kept while the agent was away is counted (``MqttClient.stats()``): on a resumed
session the client publishes a *resume marker* (QoS 1, a nonce) to a topic it subscribes to
itself. The broker appends it to the session's queue behind everything it queued while the agent
was offline, so the messages received before the marker comes back are that queue (plus whatever
live messages the broker routed in the milliseconds between CONNACK and the marker, and the
redeliveries of those the previous connection had not acked). With ``read_sys_dropped`` it also
reads mosquitto's ``$SYS/broker/publish/messages/dropped``: messages the broker dropped because a
client's queue was full (all clients, since the broker started), the one trace a loss leaves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import BrokerConfig
from agent.health import LogThrottle

log = logging.getLogger(__name__)

QOS = 1
# Outbound QoS 1 messages kept while the broker is away (responses, predictions, results).
MAX_QUEUED_OUT = 20000
# mosquitto's count of messages dropped from full queues: retained, republished when it changes
# (checked every sys_interval), delivered at the QoS of the subscription.
SYS_DROPPED_TOPIC = "$SYS/broker/publish/messages/dropped"
# Under the box's own namespace (next to the will's topic), which a box's ACL grants it.
RESUME_MARKER_SUFFIX = "mqtt/resume"
# An unchanged connection error is logged again (at ERROR) after this long; DEBUG in between.
REPEAT_ERROR_LOG_S = 300.0


@dataclass(frozen=True)
class BrokerQueue:
    """A broker's per-client offline queue (mosquitto ``max_queued_*``) and the traffic it was sized for."""

    max_queued_messages: int
    max_queued_bytes: int
    msgs_per_s: float
    mean_payload_bytes: int

    def covered_outage_s(
        self, msgs_per_s: float | None = None, mean_payload_bytes: float | None = None
    ) -> float:
        """How long the agent can be away before the broker drops: the first limit reached."""
        rate = msgs_per_s or self.msgs_per_s
        mean = mean_payload_bytes or self.mean_payload_bytes
        return min(self.max_queued_messages / rate, self.max_queued_bytes / (rate * mean))

    def describe(self) -> dict[str, Any]:
        return {
            "max_queued_messages": self.max_queued_messages,
            "max_queued_bytes": self.max_queued_bytes,
            "sized_for_msgs_per_s": self.msgs_per_s,
            "sized_for_mean_payload_bytes": self.mean_payload_bytes,
            "covered_outage_s": round(self.covered_outage_s()),
        }


# What examples/mosquitto.conf is sized for (its section 2: 1 h at 100 messages/s of <= 1 KiB);
# tests/unit/test_broker_conf.py checks the file says the same.
SHIPPED_BROKER_QUEUE = BrokerQueue(
    max_queued_messages=360_000, max_queued_bytes=368_640_000, msgs_per_s=100.0, mean_payload_bytes=1024
)


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
        self,
        topic: str,
        payload: Payload,
        *,
        retain: bool = False,
        correlation_data: bytes | None = None,
        qos: int = 1,
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
        resume_marker_topic: str | None = None,
        qos0_topics: frozenset[str] = frozenset(),
    ):
        self._broker = broker
        self._client_id = client_id
        # topic -> whether the broker should send its retained message when we subscribe
        self._subscriptions = dict(subscriptions)
        # Subscribed at QoS 0 (see ``agent.daemon.app.REQUEST_KINDS``); the rest at QoS 1.
        self._qos0_topics = qos0_topics
        self._on_message_cb = on_message
        self._on_connection_change = on_connection_change
        self._lock = threading.Lock()
        self._generation = 0
        self._connected = False
        self._connected_event = threading.Event()
        self._stopping = False
        # Why the last connection attempt failed (None once connected); see _fail().
        self.last_error: str | None = None
        self._failures = 0  # attempts failed since the last successful connection
        self._error_logged_at = 0.0
        self._socket_error: str | None = None  # paho's last socket error in this attempt
        self._attempt_failed = False  # this attempt's failure is recorded already
        parent = will.topic.rpartition("/")[0]
        self._marker_topic = resume_marker_topic or (
            f"{parent}/{RESUME_MARKER_SUFFIX}" if parent else f"{RESUME_MARKER_SUFFIX}/{client_id}"
        )
        # Resume accounting; written on paho's thread, read by stats() under the lock.
        self._sessions_new = 0
        self._handler_errors = 0  # messages a handler raised on (acked and dropped)
        self._publish_dropped = 0  # outbound messages paho refused (its queue full)
        self._throttle = LogThrottle()
        self._sessions_resumed = 0
        self._resume_nonce: str | None = None  # set while counting what the broker had queued
        self._queued_last: int | None = None
        self._queued_last_state: str | None = None  # receiving, complete or interrupted
        self._queued_total = 0
        self._broker_dropped: int | None = None
        self._subscribed: list[str] = []

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
        client.on_connect_fail = self._on_connect_fail
        client.on_pre_connect = self._on_pre_connect
        client.on_log = self._on_log
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

    def stats(self) -> dict[str, Any]:
        """Sessions and what the broker had queued for this client, for telemetry and status.

        ``queued_received_last_resume``: messages received on the last resumed session before its
        resume marker came back (see the module docstring); ``queued_last_resume_state`` is
        ``receiving`` until then, ``complete`` after, ``interrupted`` if the connection went first.
        ``broker_dropped``: mosquitto's dropped counter (all clients, since the broker started);
        ``None`` when not read or not readable ($SYS off, or the broker's ACL hides it).
        """
        with self._lock:
            return {
                "sessions_new": self._sessions_new,
                "handler_errors": self._handler_errors,
                "publish_dropped": self._publish_dropped,
                "sessions_resumed": self._sessions_resumed,
                "queued_received_last_resume": self._queued_last,
                "queued_last_resume_state": self._queued_last_state,
                "queued_received_total": self._queued_total,
                "broker_dropped": self._broker_dropped,
                "shipped_broker_queue": SHIPPED_BROKER_QUEUE.describe(),
                "last_error": self.last_error,
                "connect_failures": self._failures,
            }

    def _unacked_out(self) -> int:
        # paho keeps outbound QoS 1 messages here until the broker's PUBACK; it has no public count.
        return len(getattr(self._client, "_out_messages", ()))

    # ---- Transport ---------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected

    def publish(
        self,
        topic: str,
        payload: Payload,
        *,
        retain: bool = False,
        correlation_data: bytes | None = None,
        qos: int = QOS,
    ) -> None:
        """QoS 1 by default. QoS 0 for what may be lost and must never queue up: error replies to
        bad input, which a flooding device would otherwise turn into a full outbound queue that
        drops the good replies too."""
        props = None
        if correlation_data is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation_data
        info = self._client.publish(topic, encode(payload), qos=qos, retain=retain, properties=props)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            # NO_CONN: queued, sent after the reconnect. Anything else (queue full): dropped.
            with self._lock:
                self._publish_dropped += 1
            self._throttle.log(
                log,
                logging.WARNING,
                "publish dropped",
                "publish to %s dropped: %s",
                topic,
                paho.error_string(info.rc),
            )

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

    # ---- connection errors ---------------------------------------------------------------------
    def _fail(self, error: str, hint: str = "") -> None:
        """Record why a connection attempt failed; log it when it is new, or now and then."""
        if hint:
            error = f"{error}; {hint}"
        now = time.monotonic()
        self._failures += 1
        self._attempt_failed = True
        repeated = error == self.last_error
        self.last_error = error
        where = f"mqtt {self._broker.host}:{self._broker.port}"
        if not repeated or now - self._error_logged_at >= REPEAT_ERROR_LOG_S:
            self._error_logged_at = now
            attempts = f", {self._failures} attempts so far" if repeated else ""
            log.error("%s: %s (retrying%s)", where, error, attempts)
        else:
            log.debug("%s: %s (attempt %d)", where, error, self._failures)

    def _refusal_hint(self, reason_code) -> str:
        """What on this box to look at when the broker refused the CONNECT."""
        value = getattr(reason_code, "value", None)
        broker = self._broker
        if value in (134, 135):  # Bad user name or password, Not authorized
            if broker.username:
                if broker.password_credential:
                    source = f"password_credential {broker.password_credential!r}"
                elif broker.password_file:
                    source = f"password_file {broker.password_file}"
                else:
                    source = "no password set"
                return (
                    f"user {broker.username!r} with {source}: does the broker's password file have "
                    "this user with this password?"
                )
            if broker.tls is not None and broker.tls.cert_file is not None:
                return "no broker.username: does the broker take the client certificate's CN as the user?"
            return "no broker.username set: the broker wants a user name and password"
        if value == 133:  # Client identifier not valid
            return f"client id {self._client_id!r}"
        return ""

    def _tls_hint(self, error: str) -> str:
        upper = error.upper()
        tls = self._broker.tls
        if "HOSTNAME MISMATCH" in upper or "IP ADDRESS MISMATCH" in upper:
            return (
                f"it does not name {self._broker.host!r} (broker.host): connect to a name it lists, "
                "or reissue it for this one (edge-agent certs server --host)"
            )
        if "CERTIFICATE_VERIFY_FAILED" in upper:
            ca = tls.ca_file if tls is not None else "the system's CAs"
            return f"is broker.tls.ca_file ({ca}) the CA that signed it, and is it still valid?"
        if "CERTIFICATE_REQUIRED" in upper or ("HANDSHAKE_FAILURE" in upper and tls and not tls.cert_file):
            return "the broker wants a client certificate: set cert_file and key_file in [broker.tls]"
        if any(a in upper for a in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_REVOKED", "EXPIRED")):
            cert = tls.cert_file if tls is not None else None
            return (
                f"the broker refused this box's client certificate ({cert}): signed by another CA, "
                "revoked or expired"
            )
        if "WRONG_VERSION_NUMBER" in upper or "RECORD_LAYER_FAILURE" in upper:
            return "the port does not speak TLS: is broker.port the broker's TLS listener?"
        return ""

    def _on_pre_connect(self, client, userdata) -> None:
        self._socket_error, self._attempt_failed = None, False

    def _on_log(self, client, userdata, level, buf) -> None:
        # paho logs a socket error, then tells on_disconnect only "Unspecified error".
        if level == paho.MQTT_LOG_ERR and buf.startswith("failed to receive on socket: "):
            self._socket_error = buf.removeprefix("failed to receive on socket: ")

    def _on_connect_fail(self, client, userdata) -> None:
        # paho calls this in its ``except OSError`` around the connect: the error is the one in flight.
        exc = sys.exc_info()[1]
        if self._stopping:
            return
        if isinstance(exc, ssl.SSLCertVerificationError):
            detail = (exc.verify_message or str(exc)).rstrip(".")
            self._fail(
                f"TLS: the broker's certificate failed verification: {detail}", self._tls_hint(str(exc))
            )
        elif isinstance(exc, ssl.SSLError):
            self._fail(f"TLS handshake failed: {exc.reason or exc}", self._tls_hint(str(exc)))
        elif isinstance(exc, ConnectionRefusedError):
            self._fail("connection refused", "is the broker running and listening on this port?")
        elif isinstance(exc, socket.gaierror):
            self._fail(f"cannot resolve {self._broker.host!r}: {exc.strerror or exc}")
        else:
            self._fail(f"cannot connect: {exc}" if exc is not None else "cannot connect")

    # ---- paho callbacks (paho's network thread) ----------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._fail(f"broker refused the connection: {reason_code}", self._refusal_hint(reason_code))
            return
        sock = client.socket()
        if sock is not None:
            # Replies are small packets written back to back: no Nagle delay on them.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._generation += 1
            self._connected = True
            if flags.session_present:
                self._sessions_resumed += 1
                self._resume_nonce = f"{self._generation}-{uuid.uuid4().hex}"
                self._queued_last, self._queued_last_state = 0, "receiving"
            else:
                self._sessions_new += 1
                self._resume_nonce = None
        failures, self._failures, self.last_error = self._failures, 0, None
        log.info(
            "mqtt connected to %s:%s as %s (session %s)%s",
            self._broker.host,
            self._broker.port,
            self._client_id,
            "resumed" if flags.session_present else "new",
            f" after {failures} failed attempts" if failures else "",
        )
        # topic -> (QoS, send the retained message)
        subscriptions = {
            t: (0 if t in self._qos0_topics else QOS, retained) for t, retained in self._subscriptions.items()
        }
        subscriptions[self._marker_topic] = (QOS, False)
        if self._broker.read_sys_dropped:
            # QoS 0: mosquitto sends $SYS at the subscription's QoS, and at QoS 1 it would queue
            # stale readings in our session while we are away, taking slots meant for samples.
            # Retained: the current value at once.
            subscriptions[SYS_DROPPED_TOPIC] = (0, True)
        self._subscribed = list(subscriptions)
        _, self._subscribe_mid = client.subscribe(
            [
                (
                    t,
                    SubscribeOptions(
                        qos=qos,
                        retainHandling=SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE
                        if retained
                        else SubscribeOptions.RETAIN_DO_NOT_SEND,
                    ),
                )
                for t, (qos, retained) in subscriptions.items()
            ]
        )
        if self._resume_nonce is not None:
            # After the SUBSCRIBE on the same connection: the broker routes it to us once subscribed.
            client.publish(self._marker_topic, self._resume_nonce.encode(), qos=QOS)
        if self._on_connection_change:
            self._on_connection_change(True)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if mid != self._subscribe_mid:
            return
        for topic, rc in zip(self._subscribed, reason_codes, strict=False):
            if rc.is_failure and topic == SYS_DROPPED_TOPIC:
                log.warning("subscription to %s refused: %s (broker.read_sys_dropped)", topic, rc)
            elif rc.is_failure:
                log.error("subscription to %s refused: %s", topic, rc)
        # Connected *and* subscribed: from here on nothing published to us is missed.
        self._connected_event.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._lock:
            self._generation += 1
            was_connected, self._connected = self._connected, False
            interrupted = self._resume_nonce is not None
            if interrupted:
                self._resume_nonce, self._queued_last_state = None, "interrupted"
        if interrupted:
            log.info(
                "connection lost while receiving the broker's queue: %d queued messages received so far",
                self._queued_last,
            )
        self._connected_event.clear()
        if was_connected and not self._stopping:
            self.last_error = f"connection lost: {self._socket_error or reason_code}"
            log.warning("mqtt %s:%s: %s; reconnecting", self._broker.host, self._broker.port, self.last_error)
        elif not was_connected and not self._stopping and not self._attempt_failed:
            # Closed before the CONNACK: a TLS alert (client certificate refused), or plain TCP
            # to a TLS listener (the broker resets the connection at the first bytes).
            cause = self._socket_error or "end of stream"
            hint = self._tls_hint(cause)
            if not hint and self._broker.tls is None:
                hint = "is it a TLS listener? [broker.tls] is not set, so this box speaks plain TCP"
            self._fail(f"the broker closed the connection before answering: {cause}", hint)
        if self._on_connection_change:
            self._on_connection_change(False)

    def _on_message(self, client, userdata, message) -> None:
        if message.topic == self._marker_topic:
            self._on_resume_marker(message)
            return
        if message.topic.startswith("$SYS/"):
            self._on_sys(message)
            return
        if self._resume_nonce is not None:
            with self._lock:
                self._queued_last = (self._queued_last or 0) + 1
                self._queued_total += 1
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
            # Never let a handler bug kill paho's network thread. The message is acked: a poison
            # message left unacked holds one of receive_maximum in-flight slots for good (and
            # fails again on every redelivery), and enough of them silence the box.
            log.exception(
                "handler failed on a message on %s (mid %d); acked and dropped", message.topic, message.mid
            )
            with self._lock:
                self._handler_errors += 1
            if message.qos:
                with contextlib.suppress(Exception):
                    self._client.ack(message.mid, message.qos)

    def _on_resume_marker(self, message) -> None:
        if message.qos:
            # Ours (or a stale one from a connection that ended first): it is acked either way.
            self._client.ack(message.mid, message.qos)
        with self._lock:
            if self._resume_nonce is None or bytes(message.payload) != self._resume_nonce.encode():
                return
            self._resume_nonce, self._queued_last_state = None, "complete"
            count = self._queued_last
        log.info(
            "resumed session: the broker had queued %d messages for %s while it was away",
            count,
            self._client_id,
        )

    def _on_sys(self, message) -> None:
        if message.qos:
            self._client.ack(message.mid, message.qos)  # a session subscribed at QoS 1 before
        if message.topic != SYS_DROPPED_TOPIC:
            return
        try:
            dropped = int(bytes(message.payload).decode().strip())
        except ValueError:
            return
        with self._lock:
            before, self._broker_dropped = self._broker_dropped, dropped
        if dropped > (before or 0):
            # Broker-wide: a slow or offline client anywhere counts, this box among them.
            log.warning(
                "broker dropped %d messages from full queues since it started (%s): if this box was "
                "away, some were for it; see max_queued_messages in examples/mosquitto.conf",
                dropped,
                "first reading" if before is None else f"{dropped - before} new",
            )
