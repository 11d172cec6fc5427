"""The engine the daemon serves with, replaceable as a whole when a new base model arrives.

An adapter swap happens inside the engine (between batches). A new bundle needs a new engine:
its session, tokenizer and labels. ``SwitchableEngine`` holds the current one; ``switch`` puts a
fully opened engine in its place between two submits and then closes the old one, which finishes
every request already queued on it. So no request fails or waits on the switch, and at most two
engines exist for the moment of the hand-over.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class SwitchableEngine:
    def __init__(self, engine: Any, bundle_dir: Path):
        self._engine = engine
        self.bundle_dir = Path(bundle_dir)
        self._lock = threading.Lock()
        self.switches = 0

    @property
    def current(self) -> Any:
        return self._engine

    def submit(self, texts: list[str]) -> Future:
        with self._lock:
            return self._engine.submit(texts)

    def switch(self, engine: Any, bundle_dir: Path) -> Path:
        """Serve with ``engine`` (already open, adapter active) from the next request on; returns
        the bundle directory it replaced. The old engine finishes its queue, then closes."""
        with self._lock:
            old, self._engine = self._engine, engine
            old_dir, self.bundle_dir = self.bundle_dir, Path(bundle_dir)
            self.switches += 1
        old.close()
        log.info("serving bundle %s (was %s)", bundle_dir, old_dir)
        return old_dir

    def close(self) -> None:
        self._engine.close()

    def __getattr__(self, name: str) -> Any:
        # labels, adapter_version, manifest, precision, stats, activate_adapter, ...: the current engine's.
        return getattr(self._engine, name)
