"""``infer/req``, ``entities/req`` and ``events``: texts to the engine, answers from its callbacks.

The engine micro-batches; nothing here blocks paho's thread. A request is answered on
``infer/res`` (``entities/res``; or its MQTT 5 response topic) and acked once the answer is queued.
An event's prediction is written to SQLite by the ingest writer and published on ``predictions``
(a token-classification box's spans on ``entities``) once committed, so a redelivered event is
answered again but stored once. Which of the two a box does follows its bundle's task
(``agent.daemon.ingest.task_of``); a request for the other task is refused with ``not_available``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from agent.bundle import Task
from agent.config import RuntimeConfig
from agent.daemon.ingest import TOKEN_CLASSIFICATION, IngestWriter, Pending, task_mismatch, task_of
from agent.daemon.replies import Inflight, Replier
from agent.daemon.settings import EngineLike
from agent.entity_serving import Entities
from agent.health import Counters
from agent.messages import ErrorCode, Event, InferRequest, MessageError, error_payload, event_id
from agent.mqtt import InboundMessage
from agent.store import ENTITY_SAMPLE_LABEL, NewPrediction
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
    kinds = (Kind.INFER, Kind.ENTITIES, Kind.EVENT)

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
        self.topics = replier.topics
        self.writer = writer
        self.inflight = inflight
        self.counters = counters
        self.runtime = runtime
        self._bucket = TokenBucket()

    def handle(self, kind: Kind, model: Any, msg: InboundMessage) -> None:
        if kind is Kind.EVENT:
            assert isinstance(model, Event)
            self._event(model, msg)
            return
        assert isinstance(model, InferRequest)  # entities/req's EntityRequest is one too
        refusal = task_mismatch(task_of(self.engine), kind, model)
        if refusal is not None:
            self.replier.reject(kind, msg, refusal)
            return
        rate = self.runtime().inference.max_requests_per_s
        if rate and not self._bucket.take(rate):
            err = MessageError(
                ErrorCode.RATE_LIMITED, f"more than {rate:g} requests/s; retry later", model.id
            )
            self.replier.reject(kind, msg, err)
            return
        self._request(kind, model, msg)

    def _request(self, kind: Kind, req: InferRequest, msg: InboundMessage) -> None:
        self.inflight.add()
        try:
            future = self.engine.submit(req.all_texts())
        except Exception as e:
            self._request_done(kind, req, msg, None, e)
            return
        future.add_done_callback(lambda f: self._request_done(kind, req, msg, f, None))

    def _request_done(
        self,
        kind: Kind,
        req: InferRequest,
        msg: InboundMessage,
        future: Future | None,
        exc: BaseException | None,
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
                answers = future.result()
                latency_ms = round((time.monotonic() - msg.received_at) * 1000.0, 3)
                if kind is Kind.ENTITIES:
                    payload = {
                        "id": req.id,
                        "entities": [[span.to_json() for span in spans] for spans in answers],
                        "adapter_version": answers[0].adapter_version if answers else None,
                        # Which of the unit's models found them: "transformer" or "crf".
                        "model": answers[0].model if answers else None,
                        "latency_ms": latency_ms,
                    }
                else:
                    threshold = self.runtime().inference.low_confidence_threshold
                    payload = {
                        "id": req.id,
                        "predictions": [prediction_json(p, threshold) for p in answers],
                        "adapter_version": answers[0].adapter_version if answers else None,
                        "latency_ms": latency_ms,
                    }
            self.replier.reply(kind, msg, payload)
            self.transport.ack(msg)
        finally:
            self.inflight.done()

    def _event(self, event: Event, msg: InboundMessage) -> None:
        self.inflight.add()
        # Asked before the submit: the engine that takes it answers for this task, even across a
        # bundle switch (the old engine finishes its queue).
        task = task_of(self.engine)
        try:
            future = self.engine.submit([event.text])
        except Exception as e:
            self._event_done(event, msg, task, None, e)
            return
        future.add_done_callback(lambda f: self._event_done(event, msg, task, f, None))

    def _event_done(
        self, event: Event, msg: InboundMessage, task: Task, future: Future | None, exc: BaseException | None
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
            (answer,) = future.result()
            runtime = self.runtime()
            text = event.text if runtime.store.store_text else None
            digest = hashlib.sha256(event.text.encode()).hexdigest()
            latency_ms = round((time.monotonic() - msg.received_at) * 1000.0, 3)
            if task == TOKEN_CLASSIFICATION:
                spans: Entities = answer
                version = spans.adapter_version
                row = NewPrediction(
                    id=pid,
                    text=text,
                    text_sha256=digest,
                    label=ENTITY_SAMPLE_LABEL,
                    # The least certain span speaks for the record; nothing found is certain.
                    score=min((s.score for s in spans), default=1.0),
                    top_k=[],
                    adapter_version=version,
                    source=event.source,
                    ts=event.ts,
                    latency_ms=latency_ms,
                    entities=json.dumps([[s.start, s.end, s.label, s.score] for s in spans]),
                )
                publish: dict[str, Any] = {
                    "id": pid,
                    "entities": [s.to_json() for s in spans],
                    "adapter_version": version,
                    "model": spans.model,
                }
                topic = self.topics.entities
            else:
                row = NewPrediction(
                    id=pid,
                    text=text,
                    text_sha256=digest,
                    label=answer.label,
                    score=answer.score,
                    top_k=list(answer.top_k),
                    adapter_version=answer.adapter_version,
                    source=event.source,
                    ts=event.ts,
                    latency_ms=latency_ms,
                )
                publish = {
                    "id": pid,
                    **prediction_json(answer, runtime.inference.low_confidence_threshold),
                    "adapter_version": answer.adapter_version,
                }
                topic = self.topics.predictions
            publish.update(source=event.source, ts=event.ts, latency_ms=latency_ms)
            self.writer.put(Pending(Kind.EVENT, row, msg, pid, publish, topic))
        finally:
            self.inflight.done()
