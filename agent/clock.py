"""Wall-clock time for what federation reasons about in hours and days: outbox ages and resend
backoff on the box, round deadlines at headquarters.

A week-long outage cannot be waited out in a test, so this clock can be moved forward: when
``EDGE_AGENT_CLOCK_FILE`` names a file, its content (seconds, a float) is added to the real time.
The file is re-read only when it changes, so a running agent or aggregator follows it at no cost.
Nothing on the inference or ingest path reads this clock: the store's sample timestamps and the
engine's latencies use the real one.
"""

from __future__ import annotations

import os
import time as _time

ENV = "EDGE_AGENT_CLOCK_FILE"
_cache: tuple[str, float, float] | None = None  # (path, mtime, offset)


def offset() -> float:
    """Seconds added to the real time (0 unless ``EDGE_AGENT_CLOCK_FILE`` says otherwise)."""
    global _cache
    path = os.environ.get(ENV)
    if not path:
        return 0.0
    try:
        mtime = os.stat(path).st_mtime
    except OSError:
        return 0.0
    if _cache is None or _cache[0] != path or _cache[1] != mtime:
        try:
            with open(path) as f:
                value = float(f.read().strip() or 0)
        except (OSError, ValueError):
            value = 0.0
        _cache = (path, mtime, value)
    return _cache[2]


def time() -> float:
    return _time.time() + offset()


def advance(path: str, seconds: float) -> float:
    """For tests and the chaos suite: move the clock of every process reading ``path`` forward."""
    current = 0.0
    try:
        with open(path) as f:
            current = float(f.read().strip() or 0)
    except (OSError, ValueError):
        pass
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(repr(current + seconds))
    os.replace(tmp, path)
    return current + seconds
