"""``samples`` and ``feedback``: labeled rows, validated, committed to SQLite in groups, then acked.

``LabeledHandler`` checks each row's label against the serving model's label set and hands it to
the ``IngestWriter``, the one thread that writes inbound rows: it commits whatever has arrived in
one transaction (group commit), then acks each message, never before. A locked or full database
keeps the messages unacked and retries, so the broker keeps them. Event predictions (stream mode)
are written by the same thread, from ``agent.daemon.inference``.
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

from agent.config import RuntimeConfig
from agent.daemon.replies import Replier
from agent.daemon.settings import EngineLike, retention_limits
from agent.health import Counters
from agent.messages import ErrorCode, Feedback, MessageError, Sample, error_payload
from agent.mqtt import InboundMessage
from agent.store import NewFeedback, NewRow, NewSample, Outcome, StorageError, Store
from agent.topics import Kind

log = logging.getLogger(__name__)

RETENTION_EVERY_S = 10.0
RETENTION_EVERY_ROWS = 5000
STORAGE_RETRY_MAX_S = 5.0


@dataclass
class Pending:
    kind: Kind
    row: NewRow
    msg: InboundMessage
    request_id: str | None = None
    publish: dict[str, Any] | None = None  # published on `predictions` once committed


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
            if p.publish is not None:
                # Also for a redelivered event: whoever sent it again is waiting for the answer.
                self.transport.publish(self.topics.predictions, p.publish)
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
    """``samples`` and ``feedback``: a known label, then the writer; anything else is rejected."""

    kinds = (Kind.SAMPLE, Kind.FEEDBACK)

    def __init__(self, writer: IngestWriter, replier: Replier, labels: KnownLabels):
        self.writer = writer
        self.replier = replier
        self.labels = labels

    def handle(self, kind: Kind, model: Any, msg: InboundMessage) -> None:
        if not self._check_label(kind, model.label, model.id, msg):
            return
        row: NewRow
        if isinstance(model, Sample):
            row = NewSample(
                key=model.key(), text=model.text, label=model.label, sample_id=model.id, ts=model.ts
            )
        else:
            assert isinstance(model, Feedback)
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
