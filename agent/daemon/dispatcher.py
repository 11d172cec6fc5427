"""One place that maps inbound topics to their handlers (like frigate's ``comms/dispatcher``).

paho's network thread calls ``Dispatcher.on_message`` for every message. The box's own topics
(``edge/{site}/{device}/...``) are parsed here against their schema (``agent.messages.parse``) and
handed, as validated models, to the handler registered for their ``Kind``; a payload that fails
its schema is answered on the topic's result topic by the handler's ``reject``. Other topics (the
fleet's ``fed/{fleet}/...``) go to whoever registered a route for them, with the raw message.
Nothing slow happens on this thread: handlers queue work or hand it to the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from agent.daemon.replies import Replier
from agent.health import Counters
from agent.messages import MessageError, parse
from agent.mqtt import InboundMessage
from agent.topics import Kind, Topics

log = logging.getLogger(__name__)


class TopicHandler(Protocol):
    """Handles the box topics of ``kinds``; ``model`` is what ``agent.messages.parse`` returned."""

    @property
    def kinds(self) -> tuple[Kind, ...]: ...

    def handle(self, kind: Kind, model: Any, msg: InboundMessage) -> None: ...


class Dispatcher:
    def __init__(self, topics: Topics, replier: Replier, counters: Counters, draining: Callable[[], bool]):
        self.topics = topics
        self.replier = replier
        self.transport = replier.transport
        self.counters = counters
        self.draining = draining
        self._handlers: dict[Kind, TopicHandler] = {}
        self._routes: list[tuple[Callable[[str], bool], Callable[[InboundMessage], None]]] = []

    def register(self, handler: TopicHandler) -> None:
        for kind in handler.kinds:
            if kind in self._handlers:
                raise ValueError(f"{kind} already has a handler")
            self._handlers[kind] = handler

    def route(self, matches: Callable[[str], bool], fn: Callable[[InboundMessage], None]) -> None:
        """Topics outside the box's namespace: ``fn`` gets the raw message and must ack it."""
        self._routes.append((matches, fn))

    def on_message(self, msg: InboundMessage) -> None:
        if self.draining():
            return  # not acked: the broker keeps it for the next run
        kind = self.topics.kind_of(msg.topic)
        if kind is None:
            for matches, fn in self._routes:
                if matches(msg.topic):
                    fn(msg)
                    return
            log.warning("message on unexpected topic %s ignored", msg.topic)
            self.transport.ack(msg)
            return
        self.counters.inc("received", str(kind))
        handler = self._handlers.get(kind)
        if handler is None:
            log.error("no handler for %s; message on %s left unacked", kind, msg.topic)
            return
        on_empty = getattr(handler, "on_empty", None)
        if not msg.payload and on_empty is not None:
            on_empty(msg)
            return
        try:
            model = parse(kind, msg.payload)
        except MessageError as e:
            reject = getattr(handler, "reject_message", None)
            if reject is not None:
                reject(kind, msg, e)
            else:
                self.replier.reject(kind, msg, e)
            return
        handler.handle(kind, model, msg)
