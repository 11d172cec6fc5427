"""``edge-agent run``: the daemon. One app object that starts things in order and stops them in reverse.

Threads (all but the first are ours):
- paho's network thread: ``EdgeAgent.on_message`` (the dispatcher) parses each payload and routes
  it; inference requests and events go straight to the engine (it micro-batches; replies are sent
  from its callbacks), samples and feedback to the writer, config and commands to the control thread;
- ``IngestWriter``: commits whatever has arrived in one transaction (group commit), then acks each
  message, never before; a locked or full database keeps the messages unacked and retries;
- control: runtime config (validate, apply live, persist, report) and commands, one at a time;
- telemetry: health every ``telemetry.interval_s``;
- the main thread: signals, systemd notification and watchdog pings.

SIGTERM: stop taking work (new messages stay unacked, so the broker keeps them for the next run),
finish in-flight inference, commit and ack what was received, publish a clean ``offline`` status,
disconnect, exit 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent import __version__, exit_codes
from agent.config import (
    BootstrapConfig,
    ConfigError,
    RuntimeConfig,
    json_schema,
    load_bootstrap,
    parse_runtime,
    validate_config_file,
)
from agent.health import Counters, SystemProbe, sd_notify, watchdog_interval
from agent.learner import policy as learner_policy
from agent.learner.manager import LearnerManager, LearnerSettings
from agent.messages import (
    Command,
    ErrorCode,
    Event,
    Feedback,
    InferRequest,
    MessageError,
    Parsed,
    Sample,
    error_payload,
    event_id,
    parse,
)
from agent.mqtt import InboundMessage, MqttClient, Transport, Will
from agent.store import (
    NewFeedback,
    NewPrediction,
    NewRow,
    NewSample,
    Outcome,
    RetentionLimits,
    StorageError,
    Store,
)
from agent.topics import Kind, Topics

log = logging.getLogger(__name__)

# Seconds SIGTERM waits for in-flight inference and the last commit.
DRAIN_TIMEOUT_S = 10.0
RETENTION_EVERY_S = 10.0
RETENTION_EVERY_ROWS = 5000
STORAGE_RETRY_MAX_S = 5.0
# The writer must have looped this recently for the watchdog to be fed.
WRITER_STALL_S = 60.0


class EngineLike(Protocol):
    """What the daemon uses of ``agent.engine.InferenceEngine`` (injected, so tests can choose)."""

    @property
    def labels(self) -> list[str]: ...

    @property
    def adapter_version(self) -> str | None: ...

    def submit(self, texts: list[str]) -> Future: ...

    def stats(self) -> dict: ...

    def apply_config(self, config: Any) -> None: ...

    def close(self) -> None: ...


def engine_config(boot: BootstrapConfig, runtime: RuntimeConfig) -> Any:
    from agent.engine import EngineConfig

    inf = runtime.inference
    return EngineConfig(
        max_batch=inf.max_batch,
        max_batch_tokens=inf.max_batch_tokens,
        max_wait_ms=inf.max_wait_ms,
        top_k=inf.top_k,
        cache_size=inf.cache_size,
        intra_op_threads=boot.engine.intra_op_threads,
        precision=boot.engine.precision,
        provider=boot.engine.provider,
    )


def open_engine(
    boot: BootstrapConfig, runtime: RuntimeConfig, calibration_texts: list[str] | None = None
) -> EngineLike:
    from agent.engine import InferenceEngine

    return InferenceEngine.open(
        boot.bundle,
        engine_config(boot, runtime),
        adapter_dir=boot.engine.adapter_dir,
        work_dir=boot.data_dir / "engine",
        calibration_texts=calibration_texts,
    )


def learner_settings(runtime: RuntimeConfig) -> LearnerSettings:
    """The runtime config's learning section in the learner's own terms."""
    ls = runtime.learning
    return LearnerSettings(
        enabled=ls.enabled,
        triggers=learner_policy.TriggerPolicy(
            min_new_samples=ls.min_new_samples,
            accuracy_drop=ls.accuracy_drop,
            drift_enabled=ls.drift.enabled,
            drift_threshold=ls.drift.threshold,
        ),
        limits=learner_policy.ResourceLimits(
            max_cpu_percent=ls.max_cpu_percent,
            min_free_memory_mb=ls.min_free_memory_mb,
            max_temperature_c=ls.max_temperature_c,
            max_inference_p99_ms=ls.max_inference_p99_ms,
        ),
        gate=learner_policy.GatePolicy(epsilon=ls.gate_epsilon, delta=ls.gate_delta),
        rollback=learner_policy.RollbackPolicy(
            min_feedback=ls.rollback_min_feedback, max_drop=ls.rollback_max_drop
        ),
        schedule=list(ls.schedule),
        epochs=ls.epochs,
        lr=ls.learning_rate,
        batch_size=ls.batch_size,
        anchor_lambda=ls.anchor_lambda,
        distill_weight=ls.distill_weight,
        replay_fraction=ls.replay_fraction,
        max_train_samples=ls.max_train_samples,
        time_budget_s=ls.time_budget_s,
        threads=ls.threads,
        keep_versions=ls.keep_versions,
        min_interval_s=ls.min_interval_s,
    )


def retention_limits(runtime: RuntimeConfig) -> RetentionLimits:
    s = runtime.store
    return RetentionLimits(
        max_samples=s.max_samples,
        max_sample_bytes=s.max_sample_bytes,
        holdout_fraction=s.holdout_fraction,
        max_predictions=s.max_predictions,
        prediction_retention_days=s.prediction_retention_days,
        max_feedback=s.max_feedback,
    )


def prediction_json(pred: Any, threshold: float) -> dict[str, Any]:
    return {
        "label": pred.label,
        "score": pred.score,
        "top_k": [[label, score] for label, score in pred.top_k],
        "uncertain": pred.score < threshold,
    }


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


class Replier:
    """Publishes replies: to a request's MQTT 5 response topic when it has one, else the result topic."""

    def __init__(self, transport: Transport, topics: Topics, counters: Counters):
        self.transport = transport
        self.topics = topics
        self.counters = counters

    def reply(self, kind: Kind, msg: InboundMessage | None, payload: dict[str, Any]) -> None:
        topic = self.topics.result_topic(kind)
        correlation = None
        if msg is not None:
            correlation = msg.correlation_data
            if kind is not Kind.CONFIG and msg.response_topic and _publishable(msg.response_topic):
                topic = msg.response_topic
        self.transport.publish(topic, payload, retain=kind is Kind.CONFIG, correlation_data=correlation)

    def reject(self, kind: Kind, msg: InboundMessage, err: MessageError, **extra: Any) -> None:
        """A bad message: error reply, counter, log line, ack. Nothing else changes."""
        self.counters.inc("rejected", str(err.code))
        self.counters.inc("rejected_by_topic", str(kind))
        log.warning(
            "rejected %s message (mid %d, id %s): %s: %s",
            kind,
            msg.mid,
            err.request_id,
            err.code,
            err.message,
        )
        self.reply(kind, msg, err.payload(**extra))
        self.transport.ack(msg)


def _publishable(topic: str) -> bool:
    return 0 < len(topic) <= 1024 and "+" not in topic and "#" not in topic and "\x00" not in topic


# ---- the writer -------------------------------------------------------------------------------


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


# ---- commands -----------------------------------------------------------------------------------


class CommandError(Exception):
    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


CommandHandler = Callable[[dict[str, Any]], dict[str, Any]]


def not_available(name: str, part: str) -> CommandHandler:
    """The answer for commands whose part of the agent is not in this build (learner, sync)."""

    def handler(args: dict[str, Any]) -> dict[str, Any]:
        raise CommandError(
            ErrorCode.NOT_AVAILABLE, f"{name} is not available in this build: it needs the {part}"
        )

    return handler


# ---- the app ------------------------------------------------------------------------------------


class EdgeAgent:
    """The daemon: ``init_*`` builds, ``start`` starts in order, ``stop`` ends in reverse."""

    def __init__(
        self,
        boot: BootstrapConfig,
        *,
        config_path: Path | None = None,
        engine_factory: Callable[[BootstrapConfig, RuntimeConfig], EngineLike] = open_engine,
        engine_config_factory: Callable[[BootstrapConfig, RuntimeConfig], Any] = engine_config,
    ):
        self.boot = boot
        self.config_path = config_path
        self.topics = Topics(boot.site, boot.device)
        self.counters = Counters()
        self.inflight = Inflight()
        self.started_at = time.monotonic()
        self.runtime = RuntimeConfig()
        self.draining = False
        self.stop_event = threading.Event()
        self._engine_factory = engine_factory
        self._engine_config = engine_config_factory
        self._labels: tuple[str | None, frozenset[str]] = (None, frozenset())
        self._control: queue.Queue[tuple[str, Any, InboundMessage | None]] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self.commands: dict[str, CommandHandler] = {
            "status": lambda args: self.status(),
            "reload_config": lambda args: self.reload_config(),
            "snapshot": lambda args: self.snapshot(),
            "train_now": not_available("train_now", "learner"),
            "rollback": not_available("rollback", "learner"),
            "cancel_training": not_available("cancel_training", "learner"),
            "sync_now": not_available("sync_now", "fedsync client"),
        }
        self.store: Store
        self.engine: EngineLike
        self.learner: LearnerManager | None = None
        self.transport: MqttClient
        self.replier: Replier
        self.writer: IngestWriter
        self.probe: SystemProbe

    # ---- init ----------------------------------------------------------------------------------
    def init_store(self) -> None:
        self.store = Store(
            self.boot.db_path,
            synchronous=self.boot.store.synchronous,
            busy_timeout_ms=self.boot.store.busy_timeout_ms,
        ).open()

    def init_runtime_config(self) -> None:
        """The last accepted config from SQLite: in force even when the broker is unreachable."""
        saved = self.store.last_accepted_config()
        if saved is None:
            log.info("runtime config: built-in defaults (version 0)")
            return
        try:
            self.runtime = parse_runtime(saved)
        except ConfigError as e:
            log.error(
                "stored config version %s no longer validates (%s); using defaults", saved.get("version"), e
            )
            return
        log.info("runtime config: version %d from the store", self.runtime.version)

    def init_engine(self) -> None:
        if self._engine_factory is open_engine:
            # The INT8-vs-fp32 trial is judged on this plant's own texts when it has some.
            self.engine = open_engine(self.boot, self.runtime, self.store.recent_holdout_texts(256))
        else:
            self.engine = self._engine_factory(self.boot, self.runtime)

    def init_learner(self) -> None:
        """The learner needs an engine that can swap adapters; it restores the promoted one."""
        if not hasattr(self.engine, "activate_adapter"):
            return
        self.learner = LearnerManager(
            db_path=self.boot.db_path,
            bundle_dir=self.boot.bundle,
            data_dir=self.boot.data_dir,
            engine=self.engine,
            settings=learner_settings(self.runtime),
            publish=self._learner_event,
        )
        restored = self.learner.restore_active()
        if restored:
            log.info("adapter %s restored from the registry", restored)
        learner = self.learner
        self.register_command("train_now", lambda args: self._learner_answer(learner.train_now()))
        self.register_command(
            "rollback",
            lambda args: self._learner_answer(learner.rollback(args.get("version"), reason="command")),
        )
        self.register_command("cancel_training", lambda args: self._learner_answer(learner.cancel()))

    @staticmethod
    def _learner_answer(result: dict[str, Any]) -> dict[str, Any]:
        if not result.get("ok"):
            raise CommandError(ErrorCode.NOT_AVAILABLE, str(result.get("error")))
        return result

    def _learner_event(self, event: str, body: dict[str, Any]) -> None:
        if self.transport.connected:
            self.transport.publish(self.topics.learner, {"event": event, "ts": round(time.time(), 3), **body})

    def init_transport(self) -> None:
        self.transport = MqttClient(
            self.boot.broker,
            self.boot.client_id,
            will=Will(self.topics.status, {"state": "offline", "clean": False, "device": self.boot.device}),
            # Only the desired config is meant to be retained; a retained request or sample left on
            # the broker by mistake would otherwise be served again after every reconnect.
            subscriptions={t: kind is Kind.CONFIG for t, kind in self.topics.inbound().items()},
            on_message=self.on_message,
            on_connection_change=self._on_connection_change,
        )
        self.replier = Replier(self.transport, self.topics, self.counters)

    def init_workers(self) -> None:
        self.writer = IngestWriter(
            self.store,
            self.replier,
            self.counters,
            lambda: self.runtime,
            commit_window_ms=self.boot.store.commit_window_ms,
            max_batch=self.boot.store.max_batch,
        )
        self.probe = SystemProbe(self.boot.data_dir)

    # ---- start / stop --------------------------------------------------------------------------
    def start(self) -> None:
        self.writer.start()
        for target, name in ((self._control_loop, "control"), (self._telemetry_loop, "telemetry")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        # Last: no message arrives before every handler is ready.
        self.transport.start()
        log.info(
            "edge-agent %s started: %s/%s, broker %s:%d, config v%d",
            __version__,
            self.boot.site,
            self.boot.device,
            self.boot.broker.host,
            self.boot.broker.port,
            self.runtime.version,
        )

    def stop(self) -> None:
        """Reverse order; the transport goes last because acks and replies still need it."""
        log.info("stopping: no new work; %d requests in flight", self.inflight.count)
        self.draining = True
        if not self.inflight.wait_idle(DRAIN_TIMEOUT_S):
            log.warning("%d inference requests unanswered after %.0fs", self.inflight.count, DRAIN_TIMEOUT_S)
        self.writer.stop(DRAIN_TIMEOUT_S)
        self.stop_event.set()
        self._control.put(("stop", None, None))
        for t in self._threads:
            t.join(5.0)
        if self.transport.connected:
            self.transport.publish_and_wait(
                self.topics.status, self._status_payload("offline", clean=True), retain=True
            )
        if self.learner is not None:
            self.learner.stop()
        self.transport.stop()
        self.engine.close()
        self.probe.close()
        self.store.close()
        log.info("stopped cleanly")

    def healthy(self) -> bool:
        """Fed to the watchdog: our threads alive and the writer looping."""
        threads_ok = (
            self.transport.alive and self.writer.is_alive() and all(t.is_alive() for t in self._threads)
        )
        return threads_ok and time.monotonic() - self.writer.heartbeat < WRITER_STALL_S

    # ---- inbound -------------------------------------------------------------------------------
    def on_message(self, msg: InboundMessage) -> None:
        """paho's thread: parse, route. Nothing slow happens here."""
        if self.draining:
            return  # not acked: the broker keeps it for the next run
        kind = self.topics.kind_of(msg.topic)
        if kind is None:
            log.warning("message on unexpected topic %s ignored", msg.topic)
            self.transport.ack(msg)
            return
        self.counters.inc("received", str(kind))
        if kind is Kind.CONFIG and not msg.payload:
            log.info("retained desired config cleared; keeping version %d", self.runtime.version)
            self.transport.ack(msg)
            return
        try:
            model = parse(kind, msg.payload)
        except MessageError as e:
            if kind is Kind.CONFIG:
                self._control.put(("config_error", e, msg))
            else:
                self.replier.reject(kind, msg, e)
            return
        self._route(kind, model, msg)

    def _route(self, kind: Kind, model: Parsed, msg: InboundMessage) -> None:
        if isinstance(model, InferRequest):
            self._infer(model, msg)
        elif isinstance(model, Event):
            self._event(model, msg)
        elif isinstance(model, Sample):
            if not self._check_label(kind, model.label, model.id, msg):
                return
            row = NewSample(
                key=model.key(), text=model.text, label=model.label, sample_id=model.id, ts=model.ts
            )
            self.writer.put(Pending(kind, row, msg, model.id))
        elif isinstance(model, Feedback):
            if not self._check_label(kind, model.label, model.id, msg):
                return
            fb = NewFeedback(
                key=model.key(), prediction_id=model.prediction_id, label=model.label, feedback_id=model.id
            )
            self.writer.put(Pending(kind, fb, msg, model.id))
        elif isinstance(model, Command):
            self._control.put(("cmd", model, msg))
        else:
            self._control.put(("config", model, msg))

    def _known_labels(self) -> frozenset[str]:
        # An adapter may bring its own head: refresh the set when the adapter changes.
        version = self.engine.adapter_version
        if self._labels[0] != version or not self._labels[1]:
            self._labels = (version, frozenset(self.engine.labels))
        return self._labels[1]

    def _check_label(self, kind: Kind, label: str, rid: str | None, msg: InboundMessage) -> bool:
        labels = self._known_labels()
        if label in labels:
            return True
        err = MessageError(ErrorCode.UNKNOWN_LABEL, f"label {label!r} is not one of {sorted(labels)}", rid)
        self.replier.reject(kind, msg, err)
        return False

    def _infer(self, req: InferRequest, msg: InboundMessage) -> None:
        self.inflight.add()
        try:
            future = self.engine.submit(req.all_texts())
        except Exception as e:
            self._infer_done(req, msg, None, e)
            return
        future.add_done_callback(lambda f: self._infer_done(req, msg, f, None))

    def _infer_done(
        self, req: InferRequest, msg: InboundMessage, future: Future | None, exc: BaseException | None
    ) -> None:
        try:
            if future is not None:
                exc = future.exception()
            if exc is not None:
                self.counters.inc("rejected", str(ErrorCode.INFERENCE))
                log.error("inference failed for request %s: %s", req.id, exc)
                payload = error_payload(ErrorCode.INFERENCE, f"inference failed: {exc}", req.id)
            else:
                assert future is not None
                preds = future.result()
                threshold = self.runtime.inference.low_confidence_threshold
                payload = {
                    "id": req.id,
                    "predictions": [prediction_json(p, threshold) for p in preds],
                    "adapter_version": preds[0].adapter_version if preds else None,
                    "latency_ms": round((time.monotonic() - msg.received_at) * 1000.0, 3),
                }
            self.replier.reply(Kind.INFER, msg, payload)
            self.transport.ack(msg)
        finally:
            self.inflight.done()

    def _event(self, event: Event, msg: InboundMessage) -> None:
        self.inflight.add()
        try:
            future = self.engine.submit([event.text])
        except Exception as e:
            self._event_done(event, msg, None, e)
            return
        future.add_done_callback(lambda f: self._event_done(event, msg, f, None))

    def _event_done(
        self, event: Event, msg: InboundMessage, future: Future | None, exc: BaseException | None
    ) -> None:
        try:
            pid = event_id(event, msg.payload)
            if future is not None:
                exc = future.exception()
            if exc is not None:
                err = MessageError(ErrorCode.INFERENCE, f"inference failed: {exc}", pid)
                self.replier.reject(Kind.EVENT, msg, err)
                return
            assert future is not None
            (pred,) = future.result()
            runtime = self.runtime
            digest = hashlib.sha256(event.text.encode()).hexdigest()
            row = NewPrediction(
                id=pid,
                text=event.text if runtime.store.store_text else None,
                text_sha256=digest,
                label=pred.label,
                score=pred.score,
                top_k=list(pred.top_k),
                adapter_version=pred.adapter_version,
                source=event.source,
                ts=event.ts,
            )
            publish = {
                "id": pid,
                **prediction_json(pred, runtime.inference.low_confidence_threshold),
                "adapter_version": pred.adapter_version,
                "source": event.source,
                "ts": event.ts,
            }
            self.writer.put(Pending(Kind.EVENT, row, msg, pid, publish))
        finally:
            self.inflight.done()

    # ---- control: config and commands ---------------------------------------------------------
    def _control_loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                what, item, msg = self._control.get(timeout=0.5)
            except queue.Empty:
                # Learner rounds start, finish and get promoted from this thread only, so they
                # never race a config change or a rollback command.
                if self.learner is not None:
                    try:
                        self.learner.tick()
                    except Exception:
                        log.exception("learner tick failed")
                continue
            if what == "stop":
                return
            try:
                if what == "config":
                    self.apply_config(item, msg)
                elif what == "config_error":
                    self._reject_config(item, msg)
                elif what == "cmd":
                    self.run_command(item, msg)
                elif what == "reload":
                    self.reload_config()
            except Exception:
                log.exception("control: %s failed", what)

    def _config_state(self, status: str, version: int | None, **extra: Any) -> dict[str, Any]:
        return {
            "status": status,
            "version": version,
            "active_version": self.runtime.version,
            "ts": round(time.time(), 3),
            **extra,
        }

    def _reject_config(
        self, err: MessageError, msg: InboundMessage | None, version: int | None = None
    ) -> None:
        if version is None and err.request_id is not None and err.request_id.isdigit():
            version = int(err.request_id)
        self.counters.inc("rejected", str(err.code))
        self.counters.inc("rejected_by_topic", str(Kind.CONFIG))
        errors = err.details or [err.message]
        log.warning("config version %s rejected (%s): %s", version, err.code, "; ".join(errors))
        try:
            self.store.save_config(version or 0, {}, accepted=False, errors=errors)
        except StorageError as e:
            log.warning("could not record the rejected config: %s", e)
        self.replier.reply(
            Kind.CONFIG, msg, self._config_state("rejected", version, code=str(err.code), errors=errors)
        )
        if msg is not None:
            self.transport.ack(msg)

    def apply_config(self, desired: RuntimeConfig, msg: InboundMessage | None) -> bool:
        """Validate the version, apply live, persist, report. A rejected config changes nothing."""
        current = self.runtime
        v = desired.version
        if v == 0:
            err = MessageError(
                ErrorCode.INVALID_PAYLOAD,
                "published configs need a version >= 1",
                "0",
                ["version: must be >= 1"],
            )
            self._reject_config(err, msg, 0)
            return False
        if v < current.version:
            err = MessageError(
                ErrorCode.STALE_VERSION, f"version {v} is older than the active version {current.version}"
            )
            self._reject_config(err, msg, v)
            return False
        if v == current.version:
            if desired.body() != current.body():
                err = MessageError(
                    ErrorCode.VERSION_CONFLICT,
                    f"version {v} is already active with different content; publish version {v + 1}",
                )
                self._reject_config(err, msg, v)
                return False
            # The retained config again (reconnect, reload): already in force.
            self.replier.reply(Kind.CONFIG, msg, self._config_state("accepted", v, applied="unchanged"))
            if msg is not None:
                self.transport.ack(msg)
            return True
        try:
            self.engine.apply_config(self._engine_config(self.boot, desired))
        except Exception as e:
            self._restore_engine(current)
            self._reject_config(
                MessageError(ErrorCode.INVALID_PAYLOAD, f"the engine refused it: {e}"), msg, v
            )
            return False
        try:
            self.store.save_config(v, desired.body(), accepted=True)
        except StorageError as e:
            # Not persisted, so not accepted: the retained config comes again on reconnect or reload_config.
            self._restore_engine(current)
            self._reject_config(MessageError(ErrorCode.STORAGE, str(e)), msg, v)
            return False
        self.runtime = desired
        if self.learner is not None:
            self.learner.settings = learner_settings(desired)
        log.info("config version %d accepted (was %d)", v, current.version)
        self.replier.reply(Kind.CONFIG, msg, self._config_state("accepted", v, applied="live"))
        if msg is not None:
            self.transport.ack(msg)
        return True

    def _restore_engine(self, config: RuntimeConfig) -> None:
        try:
            self.engine.apply_config(self._engine_config(self.boot, config))
        except Exception:
            log.exception("could not restore the engine config of version %d", config.version)

    def run_command(self, cmd: Command, msg: InboundMessage | None) -> dict[str, Any]:
        try:
            previous = self.store.begin_command(cmd.id, cmd.cmd, cmd.args)
        except StorageError as e:
            log.warning("command %s (%s) not audited: %s", cmd.id, cmd.cmd, e)
            previous = None
        if previous is not None:
            log.info("command %s (%s) redelivered: answering from the audit", cmd.id, cmd.cmd)
            result = previous
        else:
            result = self._execute(cmd)
            try:
                self.store.finish_command(cmd.id, bool(result.get("ok")), result)
            except StorageError as e:
                log.warning("command %s result not audited: %s", cmd.id, e)
        self.replier.reply(Kind.COMMAND, msg, result)
        if msg is not None:
            self.transport.ack(msg)
        return result

    def _execute(self, cmd: Command) -> dict[str, Any]:
        handler = self.commands.get(cmd.cmd)
        base = {"id": cmd.id, "cmd": cmd.cmd}
        try:
            if handler is None:
                raise CommandError(
                    ErrorCode.UNKNOWN_COMMAND, f"unknown command {cmd.cmd!r}; known: {sorted(self.commands)}"
                )
            result = handler(dict(cmd.args))
        except CommandError as e:
            self.counters.inc("command_errors", str(e.code))
            log.warning("command %s (%s) failed: %s", cmd.id, cmd.cmd, e.message)
            return {**base, "ok": False, "error": {"code": str(e.code), "message": e.message}}
        except Exception as e:
            self.counters.inc("command_errors", str(ErrorCode.INTERNAL))
            log.exception("command %s (%s) crashed", cmd.id, cmd.cmd)
            return {**base, "ok": False, "error": {"code": str(ErrorCode.INTERNAL), "message": str(e)}}
        log.info("command %s (%s) done", cmd.id, cmd.cmd)
        return {**base, "ok": True, "result": result}

    def register_command(self, name: str, handler: CommandHandler) -> None:
        """For the learner and sync issues: replace a not-available answer with the real thing."""
        self.commands[name] = handler

    def status(self) -> dict[str, Any]:
        return {
            "state": "stopping" if self.draining else "online",
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "connected": self.transport.connected,
            "config_version": self.runtime.version,
            "model": self._model_info(),
            "adapter_version": self.engine.adapter_version,
            "learner": self.learner.status() if self.learner is not None else None,
            "labels": sorted(self._known_labels()),
            "store": {**self.store.totals(), "file_bytes": self.store.file_bytes()},
            "storage_error": str(self.writer.storage_error) if self.writer.storage_error else None,
            "queues": self._queues(),
            "counters": self.counters.snapshot(),
        }

    def snapshot(self) -> dict[str, Any]:
        try:
            path = self.store.snapshot(self.boot.data_dir / "snapshots")
        except StorageError as e:
            raise CommandError(ErrorCode.STORAGE, str(e)) from e
        return {"path": str(path), "bytes": path.stat().st_size}

    def reload_config(self) -> dict[str, Any]:
        """Re-read the bootstrap file (log level applies live, the rest on restart); re-fetch the
        retained runtime config from the broker."""
        result: dict[str, Any] = {"runtime_version": self.runtime.version, "restart_required": []}
        if self.config_path is not None:
            try:
                new = load_bootstrap(self.config_path)
            except ConfigError as e:
                raise CommandError(
                    ErrorCode.INVALID_PAYLOAD, f"bootstrap file invalid: {'; '.join(e.errors)}"
                ) from e
            old_dump, new_dump = self.boot.model_dump(mode="json"), new.model_dump(mode="json")
            result["restart_required"] = sorted(
                k for k in new_dump if k != "log_level" and new_dump[k] != old_dump[k]
            )
            if new.log_level != self.boot.log_level:
                logging.getLogger().setLevel(new.log_level)
                self.boot = self.boot.model_copy(update={"log_level": new.log_level})
            result["log_level"] = new.log_level
        self.transport.resubscribe(self.topics.config)
        return result

    def request_reload(self) -> None:
        self._control.put(("reload", None, None))

    # ---- health --------------------------------------------------------------------------------
    def _model_info(self) -> dict[str, Any]:
        manifest = getattr(self.engine, "manifest", None)
        info: dict[str, Any] = {"bundle": str(self.boot.bundle)}
        if manifest is not None:
            info.update(name=getattr(manifest, "name", None), base_hash=getattr(manifest, "base_hash", None))
        info["precision"] = getattr(self.engine, "precision", None)
        info["provider"] = getattr(self.engine, "provider", None)
        return info

    def _queues(self) -> dict[str, int]:
        return {
            "writer": self.writer.queue.qsize(),
            "control": self._control.qsize(),
            "inference_inflight": self.inflight.count,
        }

    def _status_payload(self, state: str, **extra: Any) -> dict[str, Any]:
        return {
            "state": state,
            "device": self.boot.device,
            "site": self.boot.site,
            "client_id": self.boot.client_id,
            "agent_version": __version__,
            "model": self._model_info(),
            "adapter_version": self.engine.adapter_version,
            "config_version": self.runtime.version,
            "pid": os.getpid(),
            "ts": round(time.time(), 3),
            **extra,
        }

    def _on_connection_change(self, connected: bool) -> None:
        if connected and not self.draining:
            self.transport.publish(self.topics.status, self._status_payload("online"), retain=True)

    def telemetry(self) -> dict[str, Any]:
        runtime = self.runtime
        stats = self.engine.stats()
        return {
            "ts": round(time.time(), 3),
            "device": self.boot.device,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "system": self.probe.sample(gpu=runtime.telemetry.gpu),
            "inference": stats,
            "queues": {**self._queues(), "engine": stats.get("queue_depth", 0)},
            "counters": self.counters.snapshot(),
            "store": {**self.store.totals(), "file_bytes": self.store.file_bytes()},
            "storage_error": str(self.writer.storage_error) if self.writer.storage_error else None,
            "model": self._model_info(),
            "adapter_version": self.engine.adapter_version,
            "learner": self.learner.status() if self.learner is not None else None,
            "config_version": runtime.version,
            "connected": self.transport.connected,
        }

    def _telemetry_loop(self) -> None:
        last = 0.0
        while not self.stop_event.wait(0.5):
            if time.monotonic() - last < self.runtime.telemetry.interval_s:
                continue
            last = time.monotonic()
            if not self.transport.connected:
                continue  # stale figures help nobody; the next interval reports fresh ones
            try:
                self.transport.publish(self.topics.telemetry, self.telemetry())
            except Exception:
                log.exception("telemetry failed")


# ---- process entry points -------------------------------------------------------------------------


def setup_logging(level: str) -> None:
    # Under systemd the journal stamps the time itself.
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if os.environ.get("JOURNAL_STREAM")
        else ("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    logging.getLogger("agent.mqtt.paho").setLevel(max(logging.getLevelName(level), logging.INFO))


def run(config_path: Path, log_level: str | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns an exit code (agent.exit_codes)."""
    try:
        boot = load_bootstrap(Path(config_path))
    except ConfigError as e:
        setup_logging(log_level or "INFO")
        for line in e.errors:
            log.error("config: %s", line)
        return exit_codes.CONFIG_ERROR
    setup_logging(log_level or boot.log_level)
    stop = threading.Event()
    app = EdgeAgent(boot, config_path=Path(config_path))
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: app.request_reload())

    sd_notify("STATUS=starting: store, engine, broker")
    code = init_app(app)
    if code != exit_codes.OK:
        return code
    try:
        app.start()
    except Exception:
        log.exception("start failed")
        return exit_codes.FAILURE
    sd_notify("READY=1", f"STATUS={_status_line(app)}")
    ping = watchdog_interval()
    tick = min(1.0, ping) if ping else 1.0
    last_status = ""
    while not stop.wait(tick):
        if ping and app.healthy():
            sd_notify("WATCHDOG=1")
        line = _status_line(app)
        if line != last_status:
            sd_notify(f"STATUS={line}")
            last_status = line
    sd_notify("STOPPING=1", "STATUS=stopping: finishing in-flight work")
    try:
        app.stop()
    except Exception:
        log.exception("stop failed")
        return exit_codes.FAILURE
    return exit_codes.OK


def init_app(app: EdgeAgent) -> int:
    """``init_*`` in order, each failure mapped to its exit code."""
    try:
        app.init_store()
        app.init_runtime_config()
    except StorageError as e:
        log.error("store %s: %s", app.boot.db_path, e)
        return exit_codes.STORE_ERROR
    try:
        app.init_engine()
    except (ValueError, OSError) as e:  # BundleError and AdapterError are ValueErrors
        log.error("bundle %s: %s", app.boot.bundle, e)
        app.store.close()
        return exit_codes.BUNDLE_ERROR
    except Exception:
        log.exception("engine failed to start")
        app.store.close()
        return exit_codes.FAILURE
    try:
        app.init_transport()
    except (OSError, ValueError) as e:  # password file, TLS files
        log.error("broker settings: %s", e)
        app.engine.close()
        app.store.close()
        return exit_codes.CONFIG_ERROR
    app.init_learner()
    app.init_workers()
    return exit_codes.OK


def _status_line(app: EdgeAgent) -> str:
    broker = f"{app.boot.broker.host}:{app.boot.broker.port}"
    conn = f"connected to {broker}" if app.transport.connected else f"waiting for broker {broker}"
    err = f"; STORE: {app.writer.storage_error.reason}" if app.writer.storage_error else ""
    return f"{conn}; config v{app.runtime.version}; adapter {app.engine.adapter_version}{err}"


def cmd_run(args: argparse.Namespace) -> int:
    """``edge-agent run --config PATH [--log-level LEVEL]``."""
    return run(Path(args.config), getattr(args, "log_level", None))


def cmd_validate_config(args: argparse.Namespace) -> int:
    """``edge-agent validate-config PATH``: every error with its key path; exit CONFIG_ERROR if any."""
    path = Path(args.path)
    errors = validate_config_file(path)
    for line in errors:
        print(f"{path}: {line}", file=sys.stderr)
    if errors:
        print(f"{path}: {len(errors)} error(s)", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    print(f"{path}: OK")
    return exit_codes.OK


def cmd_config_schema(args: argparse.Namespace) -> int:
    """``edge-agent config-schema [--bootstrap]``: JSON Schema of the runtime (or bootstrap) config."""
    print(json.dumps(json_schema("bootstrap" if getattr(args, "bootstrap", False) else "runtime"), indent=2))
    return exit_codes.OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The daemon's subcommands, for a CLI that wants them as they are."""
    r = sub.add_parser("run", help="run the agent daemon")
    r.add_argument("--config", required=True, help="bootstrap TOML file")
    r.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="override the file's log_level"
    )
    r.set_defaults(func=cmd_run)
    v = sub.add_parser("validate-config", help="check a config file (TOML bootstrap, or JSON runtime config)")
    v.add_argument("path")
    v.set_defaults(func=cmd_validate_config)
    s = sub.add_parser("config-schema", help="print the JSON Schema of the runtime config")
    s.add_argument("--bootstrap", action="store_true", help="the bootstrap file's schema instead")
    s.set_defaults(func=cmd_config_schema)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.daemon")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
