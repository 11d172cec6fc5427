"""``infer/req`` and ``events``: texts to the engine, answers from its callbacks.

The engine micro-batches; nothing here blocks paho's thread. A request is answered on
``infer/res`` (or its MQTT 5 response topic) and acked once the answer is queued. An event's
prediction is written to SQLite by the ingest writer and published on ``predictions`` once
committed, so a redelivered event is answered again but stored once.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from agent.config import RuntimeConfig
from agent.daemon.ingest import IngestWriter, Pending
from agent.daemon.replies import Inflight, Replier
from agent.daemon.settings import EngineLike
from agent.health import Counters
from agent.messages import ErrorCode, Event, InferRequest, MessageError, error_payload, event_id
from agent.mqtt import InboundMessage
from agent.store import NewPrediction
from agent.topics import Kind

log = logging.getLogger(__name__)


def prediction_json(pred: Any, threshold: float) -> dict[str, Any]:
    return {
        "label": pred.label,
        "score": pred.score,
        "top_k": [[label, score] for label, score in pred.top_k],
        "uncertain": pred.score < threshold,
        # Which model answered: "transformer", "linear" (the fast learner) or "combined".
        "model": getattr(pred, "model", "transformer"),
    }


class TokenBucket:
    """``take(rate)``: True while the caller stays under ``rate`` per second, bursts up to one second's
    worth. Only paho's thread calls it, so no lock."""

    def __init__(self) -> None:
        self._tokens = 0.0
        self._at = time.monotonic()
        self._rate = 0.0

    def take(self, rate: float) -> bool:
        now = time.monotonic()
        burst = max(1.0, rate)
        if rate != self._rate:  # a new config: start full
            self._rate, self._tokens = rate, burst
        self._tokens = min(burst, self._tokens + (now - self._at) * rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class InferenceHandler:
    kinds = (Kind.INFER, Kind.EVENT)

    def __init__(
        self,
        engine: EngineLike,
        replier: Replier,
        writer: IngestWriter,
        inflight: Inflight,
        counters: Counters,
        runtime: Callable[[], RuntimeConfig],
    ):
        self.engine = engine
        self.replier = replier
        self.transport = replier.transport
        self.writer = writer
        self.inflight = inflight
        self.counters = counters
        self.runtime = runtime
        self._bucket = TokenBucket()

    def handle(self, kind: Kind, model: Any, msg: InboundMessage) -> None:
        if isinstance(model, InferRequest):
            rate = self.runtime().inference.max_requests_per_s
            if rate and not self._bucket.take(rate):
                err = MessageError(
                    ErrorCode.RATE_LIMITED, f"more than {rate:g} requests/s; retry later", model.id
                )
                self.replier.reject(kind, msg, err)
                return
            self._infer(model, msg)
        else:
            assert isinstance(model, Event)
            self._event(model, msg)

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
                threshold = self.runtime().inference.low_confidence_threshold
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
            runtime = self.runtime()
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
                latency_ms=round((time.monotonic() - msg.received_at) * 1000.0, 3),
            )
            publish = {
                "id": pid,
                **prediction_json(pred, runtime.inference.low_confidence_threshold),
                "adapter_version": pred.adapter_version,
                "source": event.source,
                "ts": event.ts,
                "latency_ms": row.latency_ms,
            }
            self.writer.put(Pending(Kind.EVENT, row, msg, pid, publish))
        finally:
            self.inflight.done()
