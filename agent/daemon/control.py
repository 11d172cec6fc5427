"""The control thread: everything that changes the box's state runs here, one thing at a time.

Configs, commands and reloads are queued by their handlers and run in order; between them the
periodic steps (the learner's triggers and promotions, the sync client's outbox) are ticked. So a
learner promotion never races a config change or a rollback command, and no lock is needed
between them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

Job = tuple[str, Callable[[], object]]  # (what, for the log; the work)


class ControlLoop(threading.Thread):
    def __init__(self, stop_event: threading.Event, idle_s: float = 0.5):
        super().__init__(name="control", daemon=True)
        self.stop_event = stop_event
        self.idle_s = idle_s
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._ticks: list[tuple[str, Callable[[], object]]] = []

    def submit(self, what: str, fn: Callable[[], object]) -> None:
        self._jobs.put((what, fn))

    def every_idle(self, what: str, fn: Callable[[], object]) -> None:
        """``fn`` runs every ``idle_s`` or so, between jobs."""
        self._ticks.append((what, fn))

    def qsize(self) -> int:
        return self._jobs.qsize()

    def wake_to_stop(self) -> None:
        self._jobs.put(None)

    def run(self) -> None:
        last_tick = time.monotonic()
        while not self.stop_event.is_set():
            idle = False
            try:
                job = self._jobs.get(timeout=self.idle_s)
            except queue.Empty:
                idle = True
            else:
                if job is None:
                    return
                self._run(*job)
            # A stream of commands must not starve the learner's steps: tick on time regardless.
            if idle or time.monotonic() - last_tick >= self.idle_s:
                last_tick = time.monotonic()
                for what, fn in self._ticks:
                    self._run(what, fn)

    @staticmethod
    def _run(what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:
            log.exception("control: %s failed", what)
