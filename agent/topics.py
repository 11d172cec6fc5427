"""The MQTT topic namespace of one box: ``edge/{site}/{device}/...``. Every topic name lives here.

| topic            | direction | retained | payload                                                    |
|------------------|-----------|----------|------------------------------------------------------------|
| ``infer/req``    | in        | no       | ``{"id", "text"}`` or ``{"id", "texts": [...]}``           |
| ``infer/res``    | out       | no       | ``{"id", "predictions": [...]}`` or ``{"id", "error"}``; a |
|                  |           |          | request's MQTT 5 response topic and correlation data win   |
| ``entities/req`` | in        | no       | as ``infer/req``; answered by a token-classification box   |
| ``entities/res`` | out       | no       | ``{"id", "entities": [[span, ...] per text]}`` or          |
|                  |           |          | ``{"id", "error"}``; MQTT 5 response topic wins likewise   |
| ``events``       | in        | no       | ``{"id"?, "text", "ts"?, "source"?}``: stream mode         |
| ``events/res``   | out       | no       | errors for ``events`` only: ``{"id", "error"}``            |
| ``predictions``  | out       | no       | one per event: ``{"id", "label", "score", "top_k", ...}``  |
| ``entities``     | out       | no       | one per event on a token box: ``{"id", "entities", ...}``  |
| ``samples``      | in        | no       | ``{"id"?, "text", "label", "ts"?}``: acked after commit; a |
|                  |           |          | token box takes ``"entities": [{"start", "end", "label"}]``|
|                  |           |          | instead of ``"label"``                                     |
| ``samples/res``  | out       | no       | errors for ``samples`` only                                |
| ``feedback``     | in        | no       | ``{"id"?, "prediction_id", "label"}``: acked after commit  |
| ``feedback/res`` | out       | no       | errors for ``feedback`` only                               |
| ``config``       | in        | yes      | desired runtime config (``RuntimeConfig`` as JSON)         |
| ``config/state`` | out       | yes      | ``{"status": "accepted"|"rejected", "version", ...}``      |
| ``cmd``          | in        | no       | ``{"id", "cmd", "args"?}``                                 |
| ``cmd/res``      | out       | no       | ``{"id", "cmd", "ok", "result"|"error"}``                  |
| ``telemetry``    | out       | no       | health every ``telemetry.interval_s``                      |
| ``status``       | out       | yes      | ``{"state": "online"|"stopping"|"offline", ...}``; the     |
|                  |           |          | last will is ``{"state": "offline", "clean": false}``      |
| ``learner``      | out       | no       | learner events: round started/finished, rollback           |
| ``sync``         | out       | no       | sync events: upload queued/acknowledged/refused, global    |
|                  |           |          | verified/refused (with the reason)                         |

A span is ``agent.entities.Span.to_json()``: ``{"label", "start", "end", "text", "score"}``, character
offsets into the text, end exclusive. What a box answers follows its bundle's task
(``agent.bundle.Task``): a token-classification box answers ``entities/req`` and publishes on
``entities``; a classifier answers ``infer/req`` and publishes on ``predictions``. Each refuses the
other's requests with ``not_available``.

``infer/req``, ``entities/req`` and ``cmd`` are subscribed at QoS 0 (``agent.daemon.app.REQUEST_KINDS``
says why), everything else inbound at QoS 1.

Errors always look like ``{"id": ..., "error": {"code": ..., "message": ...}}``; the codes are
``agent.messages.ErrorCode``. Only errors are published on ``samples/res``, ``feedback/res`` and
``events/res``: at full ingest rate a success per sample would double the broker's load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property

PREFIX = "edge"
# A topic level that is safe everywhere: no wildcards, separators, or '$'.
SEGMENT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_SEGMENT = re.compile(SEGMENT_PATTERN)


class Kind(StrEnum):
    """What an inbound topic carries; the dispatcher routes on this."""

    INFER = "infer/req"
    ENTITIES = "entities/req"
    EVENT = "events"
    SAMPLE = "samples"
    FEEDBACK = "feedback"
    CONFIG = "config"
    COMMAND = "cmd"


# Where errors about each inbound kind are published (relative to the box's prefix).
RESULT_SUFFIX = {
    Kind.INFER: "infer/res",
    Kind.ENTITIES: "entities/res",
    Kind.EVENT: "events/res",
    Kind.SAMPLE: "samples/res",
    Kind.FEEDBACK: "feedback/res",
    Kind.CONFIG: "config/state",
    Kind.COMMAND: "cmd/res",
}


@dataclass(frozen=True)
class Topics:
    site: str
    device: str

    def __post_init__(self) -> None:
        for name in ("site", "device"):
            value = getattr(self, name)
            if not _SEGMENT.match(value):
                raise ValueError(f"{name} {value!r} is not a valid topic level ({SEGMENT_PATTERN})")

    @property
    def base(self) -> str:
        return f"{PREFIX}/{self.site}/{self.device}/"

    def topic(self, suffix: str) -> str:
        return self.base + suffix

    @property
    def infer_req(self) -> str:
        return self.topic(Kind.INFER)

    @property
    def infer_res(self) -> str:
        return self.topic("infer/res")

    @property
    def entities_req(self) -> str:
        return self.topic(Kind.ENTITIES)

    @property
    def entities_res(self) -> str:
        return self.topic(RESULT_SUFFIX[Kind.ENTITIES])

    @property
    def events(self) -> str:
        return self.topic(Kind.EVENT)

    @property
    def predictions(self) -> str:
        return self.topic("predictions")

    @property
    def entities(self) -> str:
        """Spans of each event on a token-classification box (its ``predictions``)."""
        return self.topic("entities")

    @property
    def samples(self) -> str:
        return self.topic(Kind.SAMPLE)

    @property
    def feedback(self) -> str:
        return self.topic(Kind.FEEDBACK)

    @property
    def config(self) -> str:
        return self.topic(Kind.CONFIG)

    @property
    def config_state(self) -> str:
        return self.topic("config/state")

    @property
    def cmd(self) -> str:
        return self.topic(Kind.COMMAND)

    @property
    def cmd_res(self) -> str:
        return self.topic("cmd/res")

    @property
    def telemetry(self) -> str:
        return self.topic("telemetry")

    @property
    def status(self) -> str:
        return self.topic("status")

    @property
    def learner(self) -> str:
        """Learner events: round started/finished (promoted or refused, with reasons), rollback."""
        return self.topic("learner")

    @property
    def sync(self) -> str:
        """Federated sync events: uploads queued/acknowledged/refused, globals verified or refused."""
        return self.topic("sync")

    def result_topic(self, kind: Kind) -> str:
        return self.topic(RESULT_SUFFIX[kind])

    def inbound(self) -> dict[str, Kind]:
        """Every topic the agent subscribes to, with what it carries."""
        return {self.topic(k.value): k for k in Kind}

    def kind_of(self, topic: str) -> Kind | None:
        return self._inbound.get(topic)

    @cached_property
    def _inbound(self) -> dict[str, Kind]:
        return self.inbound()
