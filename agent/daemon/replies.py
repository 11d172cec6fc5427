"""What every handler shares: replying on the right topic, rejecting bad input, counting work in flight."""

from __future__ import annotations

import logging
import threading
from typing import Any

from agent.health import Counters, LogThrottle
from agent.messages import MessageError
from agent.mqtt import InboundMessage, Transport
from agent.topics import Kind, Topics

log = logging.getLogger(__name__)


class Replier:
    """Publishes replies: to a request's MQTT 5 response topic when it has one, else the result topic."""

    def __init__(self, transport: Transport, topics: Topics, counters: Counters):
        self.transport = transport
        self.topics = topics
        self.counters = counters
        self._throttle = LogThrottle()

    def reply(self, kind: Kind, msg: InboundMessage | None, payload: dict[str, Any], qos: int = 1) -> None:
        topic = self.topics.result_topic(kind)
        correlation = None
        if msg is not None:
            correlation = msg.correlation_data
            if kind is not Kind.CONFIG and msg.response_topic and _publishable(msg.response_topic):
                topic = msg.response_topic
        self.transport.publish(
            topic, payload, retain=kind is Kind.CONFIG, correlation_data=correlation, qos=qos
        )

    def reject(self, kind: Kind, msg: InboundMessage, err: MessageError, **extra: Any) -> None:
        """A bad message: error reply, counter, log line, ack. Nothing else changes."""
        self.counters.inc("rejected", str(err.code))
        self.counters.inc("rejected_by_topic", str(kind))
        self._throttle.log(
            log,
            logging.WARNING,
            f"{kind}:{err.code}",
            "rejected %s message (mid %d, id %s): %s: %s",
            kind,
            msg.mid,
            err.request_id,
            err.code,
            err.message,
        )
        # QoS 0: an error reply may be lost, but a flood of bad messages must not fill the outbound
        # queue and crowd out the answers to good ones (the counter keeps every rejection).
        self.reply(kind, msg, err.payload(**extra), qos=0)
        self.transport.ack(msg)


def _publishable(topic: str) -> bool:
    return 0 < len(topic) <= 1024 and "+" not in topic and "#" not in topic and "\x00" not in topic


class Inflight:
    """Counts work handed to the engine and not yet answered, so SIGTERM can wait for it."""

    def __init__(self) -> None:
        self._n = 0
        self._cond = threading.Condition()

    def add(self) -> None:
        with self._cond:
            self._n += 1

    def done(self) -> None:
        with self._cond:
            self._n -= 1
            if self._n == 0:
                self._cond.notify_all()

    @property
    def count(self) -> int:
        return self._n

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._n == 0, timeout)
