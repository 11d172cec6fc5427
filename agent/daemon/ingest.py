"""``samples`` and ``feedback``: labeled rows, validated, committed to SQLite in groups, then acked.

``LabeledHandler`` checks each row's label against the serving model's label set (a span sample's
entities against the bundle's entity labels, ``agent.entities.validate_spans``) and hands it to
the ``IngestWriter``, the one thread that writes inbound rows: it commits whatever has arrived in
one transaction (group commit), then acks each message, never before. A locked or full database
keeps the messages unacked and retries, so the broker keeps them. Event predictions (stream mode)
are written by the same thread, from ``agent.daemon.inference``.

What a box takes follows its bundle's task, and ``task_of`` is the one question every handler asks
about it; ``task_mismatch`` says what each task refuses.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.bundle import Task
from agent.config import RuntimeConfig
from agent.daemon.replies import Replier
from agent.daemon.settings import EngineLike, retention_limits
from agent.entities import SpanError, validate_spans
from agent.health import Counters
from agent.messages import ErrorCode, Feedback, MessageError, Sample, canonical_spans, error_payload
from agent.mqtt import InboundMessage
from agent.store import ENTITY_SAMPLE_LABEL, NewFeedback, NewRow, NewSample, Outcome, StorageError, Store
from agent.topics import Kind

log = logging.getLogger(__name__)

RETENTION_EVERY_S = 10.0
RETENTION_EVERY_ROWS = 5000
STORAGE_RETRY_MAX_S = 5.0
TOKEN_CLASSIFICATION: Task = "token-classification"


def task_of(engine: Any) -> Task:
    """The serving bundle's task: what every handler asks, and only this, to tell a box that
    extracts entities from one that classifies. Asked per message, so it follows a bundle switch."""
    return getattr(getattr(engine, "manifest", None), "task", "sequence-classification")


def entity_labels(engine: Any) -> tuple[str, ...]:
    """The serving token-classification bundle's entity labels, in its order (none for a classifier)."""
    spec = getattr(getattr(engine, "manifest", None), "entities", None)
    return tuple(spec.labels) if spec is not None else ()


def task_mismatch(task: Task, kind: Kind, model: Any) -> MessageError | None:
    """Why a box of ``task`` cannot take this message, as a ``not_available`` refusal, or None.

    The message itself is well-formed, and a box serving the other task would take it: what is
    missing is on this side, so every case, samples too, gets the code of a request the box cannot
    serve, not ``invalid_payload`` (which tells the sender its producer is wrong).
    """
    rid = getattr(model, "id", None)
    if task == TOKEN_CLASSIFICATION:
        if kind is Kind.INFER:
            why = "this box extracts entities (a token-classification bundle): ask on entities/req"
        elif kind is Kind.FEEDBACK:
            why = "this box extracts entities: send the corrected spans as a sample (samples, with entities)"
        elif kind is Kind.SAMPLE and model.entities is None:
            why = 'this box extracts entities: a sample needs "entities" [{start, end, label}], not a label'
        else:
            return None
    elif kind is Kind.ENTITIES:
        why = "this box classifies texts (a sequence-classification bundle): ask on infer/req"
    elif kind is Kind.SAMPLE and model.entities is not None:
        why = 'this box classifies texts: a sample needs a "label", not entities'
    else:
        return None
    return MessageError(ErrorCode.NOT_AVAILABLE, why, rid)


@dataclass
class Pending:
    kind: Kind
    row: NewRow
    msg: InboundMessage
    request_id: str | None = None
    publish: dict[str, Any] | None = None  # published on `publish_topic` once committed
    publish_topic: str | None = None  # `predictions`, or `entities` for a token box's events

    def __post_init__(self) -> None:
        if (self.publish is None) != (self.publish_topic is None):
            raise ValueError("publish and publish_topic go together")


class IngestWriter(threading.Thread):
    """Group commit: one transaction for everything that has arrived, then an ack per message."""

    def __init__(
        self,
        store: Store,
        replier: Replier,
        counters: Counters,
        runtime: Callable[[], RuntimeConfig],
        *,
        commit_window_ms: float,
        max_batch: int,
    ):
        super().__init__(name="ingest-writer", daemon=True)
        self.store = store
        self.replier = replier
        self.transport = replier.transport
        self.topics = replier.topics
        self.counters = counters
        self.runtime = runtime
        self.commit_window = commit_window_ms / 1000.0
        self.max_batch = max_batch
        self.queue: queue.Queue[Pending] = queue.Queue()
        self.heartbeat = time.monotonic()
        self.storage_error: StorageError | None = None
        self._stop_requested = threading.Event()
        self._give_up_at: float | None = None
        self._rows_since_retention = 0
        self._last_retention = time.monotonic()

    def put(self, item: Pending) -> None:
        self.queue.put(item)

    def stop(self, timeout: float) -> None:
        """Commit and ack what is queued, then end; a failing store is retried until ``timeout``."""
        self._give_up_at = time.monotonic() + timeout
        self._stop_requested.set()
        self.join(timeout + 1.0)

    def run(self) -> None:
        pending: list[Pending] = []
        delay = 0.05
        while True:
            self.heartbeat = time.monotonic()
            if not pending:
                try:
                    pending.append(self.queue.get(timeout=0.2))
                except queue.Empty:
                    if self._stop_requested.is_set():
                        return
                    self._maybe_retention()
                    continue
            self._gather(pending)
            try:
                outcomes = self.store.write([p.row for p in pending], self.runtime().store.holdout_fraction)
            except StorageError as e:
                self._storage_failed(e, pending)
                if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
                    log.error(
                        "stopping with %d messages uncommitted (not acked: the broker keeps them)",
                        len(pending),
                    )
                    return
                time.sleep(delay)
                delay = min(delay * 2, STORAGE_RETRY_MAX_S)
                continue
            delay = 0.05
            if self.storage_error is not None:
                log.info("store writable again after %s", self.storage_error.reason)
                self.storage_error = None
            self._after_commit(pending, outcomes)
            self._rows_since_retention += len(pending)
            pending = []
            self._maybe_retention()

    def _gather(self, pending: list[Pending]) -> None:
        # Take everything already queued; a lone message waits a moment for company.
        deadline = time.monotonic() + self.commit_window
        while len(pending) < self.max_batch:
            try:
                pending.append(self.queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if len(pending) > 1 or remaining <= 0:
                return
            try:
                pending.append(self.queue.get(timeout=remaining))
            except queue.Empty:
                return

    def _storage_failed(self, e: StorageError, pending: list[Pending]) -> None:
        self.counters.inc("storage_errors", e.reason)
        if self.storage_error is None or self.storage_error.reason != e.reason:
            log.error("store: %s; %d messages kept unacked, retrying", e, len(pending))
            # Tell the senders once per episode; the messages are not lost, only delayed.
            for p in pending:
                self.replier.reply(
                    p.kind,
                    p.msg,
                    error_payload(
                        ErrorCode.STORAGE,
                        f"{e}; not acknowledged, will retry",
                        p.request_id,
                        reason=e.reason,
                        retrying=True,
                    ),
                )
        self.storage_error = e

    def _after_commit(self, pending: list[Pending], outcomes: list[Outcome]) -> None:
        tally: Counter[tuple[str, str]] = Counter()
        for p, outcome in zip(pending, outcomes, strict=True):
            if outcome is Outcome.UNKNOWN_PREDICTION:
                assert isinstance(p.row, NewFeedback)
                self.replier.reject(
                    p.kind,
                    p.msg,
                    MessageError(
                        ErrorCode.UNKNOWN_PREDICTION,
                        f"no prediction with id {p.row.prediction_id!r}",
                        p.request_id,
                    ),
                    prediction_id=p.row.prediction_id,
                )
                continue
            tally["stored" if outcome is Outcome.STORED else "duplicates", str(p.kind)] += 1
            if p.publish is not None and p.publish_topic is not None:
                # Also for a redelivered event: whoever sent it again is waiting for the answer.
                self.transport.publish(p.publish_topic, p.publish)
            self.transport.ack(p.msg)
        for (group, kind), n in tally.items():
            self.counters.inc(group, kind, n)

    def _maybe_retention(self) -> None:
        now = time.monotonic()
        if (
            self._rows_since_retention < RETENTION_EVERY_ROWS
            and now - self._last_retention < RETENTION_EVERY_S
        ):
            return
        self._last_retention = now
        self._rows_since_retention = 0
        try:
            deleted = self.store.enforce_retention(retention_limits(self.runtime()))
        except StorageError as e:
            log.warning("retention skipped: %s", e)
            return
        for kind, n in deleted.items():
            if n:
                self.counters.inc("retention_deleted", kind, n)


class KnownLabels:
    """The serving model's label set; an adapter may bring its own head, so it follows the adapter."""

    def __init__(self, engine: EngineLike):
        self.engine = engine
        self._cached: tuple[str | None, frozenset[str]] = (None, frozenset())

    def get(self) -> frozenset[str]:
        version = self.engine.adapter_version
        if self._cached[0] != version or not self._cached[1]:
            self._cached = (version, frozenset(self.engine.labels))
        return self._cached[1]


class LabeledHandler:
    """``samples`` and ``feedback``: a known label (or valid spans), then the writer; anything else
    is rejected."""

    kinds = (Kind.SAMPLE, Kind.FEEDBACK)

    def __init__(self, writer: IngestWriter, replier: Replier, labels: KnownLabels):
        self.writer = writer
        self.replier = replier
        self.labels = labels

    def handle(self, kind: Kind, model: Any, msg: InboundMessage) -> None:
        refusal = task_mismatch(task_of(self.labels.engine), kind, model)
        if refusal is not None:
            self.replier.reject(kind, msg, refusal)
            return
        row: NewRow
        if isinstance(model, Sample) and model.entities is not None:
            spans = self._spans(model, msg)
            if spans is None:
                return
            row = NewSample(
                key=model.key(spans),
                text=model.text,
                label=ENTITY_SAMPLE_LABEL,
                sample_id=model.id,
                ts=model.ts,
                entities=canonical_spans(spans),
            )
        elif isinstance(model, Sample):
            assert model.label is not None  # the model holds one of label and entities
            if not self._check_label(kind, model.label, model.id, msg):
                return
            row = NewSample(
                key=model.key(), text=model.text, label=model.label, sample_id=model.id, ts=model.ts
            )
        else:
            assert isinstance(model, Feedback)
            if not self._check_label(kind, model.label, model.id, msg):
                return
            row = NewFeedback(
                key=model.key(), prediction_id=model.prediction_id, label=model.label, feedback_id=model.id
            )
        self.writer.put(Pending(kind, row, msg, model.id))

    def _check_label(self, kind: Kind, label: str, rid: str | None, msg: InboundMessage) -> bool:
        labels = self.labels.get()
        if label in labels:
            return True
        err = MessageError(ErrorCode.UNKNOWN_LABEL, f"label {label!r} is not one of {sorted(labels)}", rid)
        self.replier.reject(kind, msg, err)
        return False

    def _spans(self, sample: Sample, msg: InboundMessage) -> list[tuple[int, int, str]] | None:
        """The sample's spans as ``validate_spans`` returns them, or None once it is rejected."""
        known = entity_labels(self.labels.engine)
        try:
            return validate_spans(sample.text, sample.entities, known)
        except SpanError as e:
            err = _span_error(sample, known, e)
        self.replier.reject(Kind.SAMPLE, msg, err)
        return None


def _span_error(sample: Sample, known: tuple[str, ...], error: SpanError) -> MessageError:
    """``unknown_label`` when the spans would pass with their labels known, else ``invalid_payload``
    with what is malformed: a label the model lacks is told apart from a bad span, as it is for a
    label sample."""
    # Labels are JSON here, not yet strings: lists and objects are not hashable.
    named = [e.get("label") for e in sample.entities or () if isinstance(e, dict)]
    unknown = sorted({label for label in named if isinstance(label, str) and label not in known})
    if not unknown:
        return MessageError(ErrorCode.INVALID_PAYLOAD, str(error), sample.id)
    try:
        validate_spans(sample.text, sample.entities, (*known, *unknown))
    except SpanError as malformed:
        return MessageError(ErrorCode.INVALID_PAYLOAD, str(malformed), sample.id)
    return MessageError(ErrorCode.UNKNOWN_LABEL, str(error), sample.id)
