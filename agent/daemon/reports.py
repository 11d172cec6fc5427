"""What the box says about itself: ``status`` (retained, and the ``status`` command), ``telemetry``.

Parts that have something to report (learner, sync client, transport) add a section; the
reporter itself reads only the figures every box has (engine, store, queues, counters, system).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from agent import __version__
from agent.config import BootstrapConfig
from agent.daemon.ingest import IngestWriter, entity_labels, task_of
from agent.daemon.runtime_config import LiveConfig
from agent.daemon.settings import EngineLike
from agent.health import Counters, SystemProbe
from agent.mqtt import Transport
from agent.store import Store

log = logging.getLogger(__name__)


class Reporter:
    def __init__(
        self,
        boot: BootstrapConfig,
        live: LiveConfig,
        engine: EngineLike,
        store: Store,
        writer: IngestWriter,
        transport: Transport,
        counters: Counters,
        probe: SystemProbe,
        queues: Callable[[], dict[str, int]],
        draining: Callable[[], bool],
    ):
        self.boot = boot
        self.live = live
        self.engine = engine
        self.store = store
        self.writer = writer
        self.transport = transport
        self.counters = counters
        self.probe = probe
        self.queues = queues
        self.draining = draining
        self.started_at = time.monotonic()
        self._sections: dict[str, Callable[[], Any]] = {}

    def add_section(self, name: str, fn: Callable[[], Any]) -> None:
        """``fn()`` is reported under ``name`` in both status and telemetry."""
        self._sections[name] = fn

    def _extra(self) -> dict[str, Any]:
        out = {}
        for name, fn in self._sections.items():
            try:
                out[name] = fn()
            except Exception as e:  # a broken section must not take the whole report down
                log.exception("report section %s failed", name)
                out[name] = {"error": str(e)}
        return out

    def model_info(self) -> dict[str, Any]:
        manifest = getattr(self.engine, "manifest", None)
        info: dict[str, Any] = {"bundle": str(getattr(self.engine, "bundle_dir", self.boot.bundle))}
        if manifest is not None:
            info.update(name=getattr(manifest, "name", None), base_hash=getattr(manifest, "base_hash", None))
        info["precision"] = getattr(self.engine, "precision", None)
        info["provider"] = getattr(self.engine, "provider", None)
        return info

    def _store(self) -> dict[str, Any]:
        return {**self.store.totals(), "file_bytes": self.store.file_bytes()}

    def _storage_error(self) -> str | None:
        return str(self.writer.storage_error) if self.writer.storage_error else None

    def status(self) -> dict[str, Any]:
        """The ``status`` command's answer: everything an operator asks first."""
        return {
            "state": "stopping" if self.draining() else "online",
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "connected": self.transport.connected,
            "config_version": self.live.current.version,
            "model": self.model_info(),
            "adapter_version": self.engine.adapter_version,
            # What answers: the gate's choice among transformer, linear and combined.
            "serving_model": getattr(self.engine, "serving_model", "transformer"),
            # What the box answers: labels (infer/req) or entity spans (entities/req); for the
            # latter ``labels`` are the entity labels samples may use, not the head's tags.
            "task": task_of(self.engine),
            "labels": sorted(entity_labels(self.engine) or self.engine.labels),
            "store": self._store(),
            "storage_error": self._storage_error(),
            "queues": self.queues(),
            "counters": self.counters.snapshot(),
            **self._extra(),
        }

    def status_payload(self, state: str, **extra: Any) -> dict[str, Any]:
        """The retained ``status`` message (and, as ``offline``, the last will)."""
        return {
            "state": state,
            "device": self.boot.device,
            "site": self.boot.site,
            "client_id": self.boot.client_id,
            "agent_version": __version__,
            "model": self.model_info(),
            "adapter_version": self.engine.adapter_version,
            # What answers: the gate's choice among transformer, linear and combined.
            "serving_model": getattr(self.engine, "serving_model", "transformer"),
            "config_version": self.live.current.version,
            "pid": os.getpid(),
            "ts": round(time.time(), 3),
            **extra,
        }

    def telemetry(self) -> dict[str, Any]:
        runtime = self.live.current
        stats = self.engine.stats()
        return {
            "ts": round(time.time(), 3),
            "device": self.boot.device,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "system": self.probe.sample(gpu=runtime.telemetry.gpu),
            "inference": stats,
            "queues": {**self.queues(), "engine": stats.get("queue_depth", 0)},
            "counters": self.counters.snapshot(),
            "store": self._store(),
            "storage_error": self._storage_error(),
            "model": self.model_info(),
            "adapter_version": self.engine.adapter_version,
            # What answers: the gate's choice among transformer, linear and combined.
            "serving_model": getattr(self.engine, "serving_model", "transformer"),
            "config_version": runtime.version,
            "connected": self.transport.connected,
            **self._extra(),
        }


class TelemetryLoop(threading.Thread):
    """Publishes ``Reporter.telemetry()`` every ``telemetry.interval_s`` while connected."""

    def __init__(
        self, reporter: Reporter, transport: Transport, topic: str, live: LiveConfig, stop: threading.Event
    ):
        super().__init__(name="telemetry", daemon=True)
        self.reporter = reporter
        self.transport = transport
        self.topic = topic
        self.live = live
        self.stop_event = stop

    def run(self) -> None:
        last = 0.0
        while not self.stop_event.wait(0.5):
            if time.monotonic() - last < self.live.current.telemetry.interval_s:
                continue
            last = time.monotonic()
            if not self.transport.connected:
                continue  # stale figures help nobody; the next interval reports fresh ones
            try:
                self.transport.publish(self.topic, self.reporter.telemetry())
            except Exception:
                log.exception("telemetry failed")
