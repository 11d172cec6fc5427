"""``config`` → ``config/state``: the desired runtime config, validated, applied live, persisted, reported.

A published config must carry a higher version than the active one. It is checked against the
schema (in ``agent.messages``), then by each part that has a say (``checks``: e.g. sync needs the
bootstrap file's ``[fleet]`` section), then applied to the engine, then saved; only then is it the
active config, and the parts listening (learner, sync) get it. Any failure on the way restores
what was in force and says why on ``config/state``: a rejected config changes nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.config import RuntimeConfig
from agent.daemon.replies import Replier
from agent.daemon.settings import EngineLike
from agent.health import Counters, LogThrottle
from agent.messages import ErrorCode, MessageError
from agent.mqtt import InboundMessage
from agent.store import StorageError, Store
from agent.topics import Kind

log = logging.getLogger(__name__)


class LiveConfig:
    """The runtime config in force, and who wants to hear when it changes."""

    def __init__(self, initial: RuntimeConfig | None = None):
        self._current = initial or RuntimeConfig()
        self._listeners: list[Callable[[RuntimeConfig], None]] = []
        self._checks: list[Callable[[RuntimeConfig], list[str]]] = []
        self._lock = threading.Lock()

    @property
    def current(self) -> RuntimeConfig:
        return self._current

    def __call__(self) -> RuntimeConfig:
        return self._current

    def listen(self, fn: Callable[[RuntimeConfig], None]) -> None:
        self._listeners.append(fn)

    def add_check(self, fn: Callable[[RuntimeConfig], list[str]]) -> None:
        """``fn(config)`` returns problems (``key.path: why``) that make a config unacceptable here."""
        self._checks.append(fn)

    def problems(self, config: RuntimeConfig) -> list[str]:
        return [p for check in self._checks for p in check(config)]

    def set(self, config: RuntimeConfig) -> None:
        with self._lock:
            self._current = config
        for fn in self._listeners:
            try:
                fn(config)
            except Exception:
                log.exception("config listener %s failed on version %d", fn, config.version)


class RuntimeConfigHandler:
    """Runs on the control thread: one config at a time, never racing a command or a learner step."""

    def __init__(
        self,
        live: LiveConfig,
        store: Store,
        engine: EngineLike,
        replier: Replier,
        counters: Counters,
        engine_config: Callable[[RuntimeConfig], Any],
    ):
        self.live = live
        self.store = store
        self.engine = engine
        self.replier = replier
        self.transport = replier.transport
        self.counters = counters
        self.engine_config = engine_config
        self._throttle = LogThrottle()

    def state(self, status: str, version: int | None, **extra: Any) -> dict[str, Any]:
        return {
            "status": status,
            "version": version,
            "active_version": self.live.current.version,
            "ts": round(time.time(), 3),
            **extra,
        }

    def reject(self, err: MessageError, msg: InboundMessage | None, version: int | None = None) -> None:
        if version is None and err.request_id is not None and err.request_id.isdigit():
            version = int(err.request_id)
        self.counters.inc("rejected", str(err.code))
        self.counters.inc("rejected_by_topic", str(Kind.CONFIG))
        errors = err.details or [err.message]
        self._throttle.log(
            log,
            logging.WARNING,
            str(err.code),
            "config version %s rejected (%s): %s",
            version,
            err.code,
            "; ".join(errors),
        )
        try:
            self.store.save_config(version or 0, {}, accepted=False, errors=errors)
        except StorageError as e:
            log.warning("could not record the rejected config: %s", e)
        self.replier.reply(
            Kind.CONFIG, msg, self.state("rejected", version, code=str(err.code), errors=errors)
        )
        if msg is not None:
            self.transport.ack(msg)

    def apply(self, desired: RuntimeConfig, msg: InboundMessage | None) -> bool:
        """Validate the version, apply live, persist, report. A rejected config changes nothing."""
        current = self.live.current
        v = desired.version
        if v == 0:
            err = MessageError(
                ErrorCode.INVALID_PAYLOAD,
                "published configs need a version >= 1",
                "0",
                ["version: must be >= 1"],
            )
            self.reject(err, msg, 0)
            return False
        if v < current.version:
            err = MessageError(
                ErrorCode.STALE_VERSION, f"version {v} is older than the active version {current.version}"
            )
            self.reject(err, msg, v)
            return False
        if v == current.version:
            if desired.body() != current.body():
                err = MessageError(
                    ErrorCode.VERSION_CONFLICT,
                    f"version {v} is already active with different content; publish version {v + 1}",
                )
                self.reject(err, msg, v)
                return False
            # The retained config again (reconnect, reload): already in force.
            self.replier.reply(Kind.CONFIG, msg, self.state("accepted", v, applied="unchanged"))
            if msg is not None:
                self.transport.ack(msg)
            return True
        problems = self.live.problems(desired)
        if problems:
            err = MessageError(ErrorCode.INVALID_PAYLOAD, "; ".join(problems), str(v), problems)
            self.reject(err, msg, v)
            return False
        try:
            self.engine.apply_config(self.engine_config(desired))
        except Exception as e:
            self._restore_engine(current)
            self.reject(MessageError(ErrorCode.INVALID_PAYLOAD, f"the engine refused it: {e}"), msg, v)
            return False
        try:
            self.store.save_config(v, desired.body(), accepted=True)
        except StorageError as e:
            # Not persisted, so not accepted: the retained config comes again on reconnect or reload_config.
            self._restore_engine(current)
            self.reject(MessageError(ErrorCode.STORAGE, str(e)), msg, v)
            return False
        self.live.set(desired)
        log.info("config version %d accepted (was %d)", v, current.version)
        self.replier.reply(Kind.CONFIG, msg, self.state("accepted", v, applied="live"))
        if msg is not None:
            self.transport.ack(msg)
        return True

    def _restore_engine(self, config: RuntimeConfig) -> None:
        try:
            self.engine.apply_config(self.engine_config(config))
        except Exception:
            log.exception("could not restore the engine config of version %d", config.version)
