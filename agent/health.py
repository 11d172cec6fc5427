"""Health: counters, system figures (psutil, NVML when importable), systemd notification and the
status file.

``sd_notify`` speaks the sd_notify datagram protocol over ``$NOTIFY_SOCKET`` directly: no
dependency on libsystemd. NVML comes from the ``nvidia-ml-py`` package (module ``pynvml``) only
when it is installed and a driver answers; without it telemetry reports ``gpu: null``.

The status file (``data_dir/status.json``) is the container's equivalent of the systemd
watchdog: the daemon rewrites it every few seconds (:func:`write_status_file`) and
``edge-agent healthcheck`` (:func:`check_status_file`) calls it healthy only while it is fresh and
says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from agent.durable import write_json_atomic

log = logging.getLogger(__name__)


class LogThrottle:
    """At most ``burst`` log lines per key per ``window_s``, then one line saying how many were held
    back: a device flooding bad messages must not flood the journal (or the disk) as well. The
    counters keep every event; the log keeps a sample."""

    def __init__(self, burst: int = 20, window_s: float = 60.0):
        self.burst, self.window_s = burst, window_s
        self._lock = threading.Lock()
        self._state: dict[str, list[float]] = {}  # key -> [window start, logged, held back]

    def log(self, logger: logging.Logger, level: int, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            st = self._state.get(key)
            if st is None or now - st[0] >= self.window_s:
                held = int(st[2]) if st is not None else 0
                st = self._state[key] = [now, 0, 0]
                if held:
                    logger.log(
                        level,
                        "%d more like the next (%s) in the last %.0f s, not logged",
                        held,
                        key,
                        self.window_s,
                    )
            if st[1] >= self.burst:
                st[2] += 1
                return
            st[1] += 1
        logger.log(level, msg, *args)


class Counters:
    """Thread-safe counters in named groups, e.g. ``rejected[invalid_json]``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def inc(self, group: str, key: str, n: int = 1) -> None:
        with self._lock:
            self._groups[group][key] += n

    def get(self, group: str, key: str) -> int:
        with self._lock:
            return self._groups.get(group, {}).get(key, 0)

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {g: dict(v) for g, v in self._groups.items()}


# ---- systemd ----------------------------------------------------------------------------------


def sd_notify(*states: str) -> bool:
    """Send ``READY=1``, ``WATCHDOG=1``, ``STATUS=...``, ``STOPPING=1`` to systemd; False outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            # Never wait on the supervisor: a notify socket nobody reads fills up, and a blocking
            # send then holds the main thread, SIGTERM included (found by the chaos suite).
            sock.send("\n".join(states).encode(), socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False  # its queue is full: this ping is dropped, the next one tries again
    except OSError as e:
        log.warning("sd_notify to %s failed: %s", address, e)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when the watchdog is off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


# ---- status file (container health) ------------------------------------------------------------

STATUS_FILE_NAME = "status.json"
# The daemon writes every STATUS_INTERVAL_S; a reader allows a few missed writes.
STATUS_INTERVAL_S = 5.0
STATUS_MAX_AGE_S = 30.0


def status_file_path(data_dir: Path) -> Path:
    return Path(data_dir) / STATUS_FILE_NAME


def write_status_file(path: Path, healthy: bool, payload: Mapping[str, Any] | None = None) -> None:
    """Atomically replace ``path`` with ``{"healthy", "ts", "pid", **payload}`` (temp + fsync +
    rename: a reader sees the old file or the new one, never half of one)."""
    write_json_atomic(
        Path(path), {**(payload or {}), "healthy": bool(healthy), "ts": time.time(), "pid": os.getpid()}
    )


@dataclass(frozen=True)
class StatusCheck:
    ok: bool
    reason: str
    status: dict[str, Any] | None = None


def check_status_file(
    path: Path, max_age_s: float = STATUS_MAX_AGE_S, now: float | None = None
) -> StatusCheck:
    """Healthy only if the file exists, parses, says ``healthy: true`` and was written within
    ``max_age_s`` (a timestamp as far in the future counts as stale too: a clock that jumped)."""
    path = Path(path)
    try:
        status = json.loads(path.read_text())
    except FileNotFoundError:
        return StatusCheck(False, f"{path} does not exist (the daemon has not written it yet)")
    except (OSError, ValueError) as e:
        return StatusCheck(False, f"{path} unreadable: {e}")
    if not isinstance(status, dict) or not isinstance(status.get("ts"), int | float):
        return StatusCheck(False, f"{path} has no timestamp")
    age = (time.time() if now is None else now) - float(status["ts"])
    if abs(age) > max_age_s:
        return StatusCheck(
            False, f"{path} is {age:.0f} s old (max {max_age_s:g} s): the daemon stopped writing it", status
        )
    if status.get("healthy") is not True:
        state = status.get("state", "unknown")
        return StatusCheck(False, f"daemon reports unhealthy (state {state}), {age:.1f} s ago", status)
    return StatusCheck(True, f"healthy (state {status.get('state', 'unknown')}), {age:.1f} s ago", status)


# ---- system figures ---------------------------------------------------------------------------


class Nvml:
    """GPU figures through NVML; ``available`` is False without the package or a driver."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml  # the nvidia-ml-py package; optional

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as e:  # ImportError, or NVMLError without a driver
            log.debug("NVML not available: %s", e)

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def sample(self) -> list[dict[str, Any]] | None:
        nv = self._nvml
        if nv is None:
            return None
        gpus = []
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                util = nv.nvmlDeviceGetUtilizationRates(h)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                name = nv.nvmlDeviceGetName(h)
                gpus.append(
                    {
                        "index": i,
                        "name": name.decode() if isinstance(name, bytes) else name,
                        "util_percent": util.gpu,
                        "mem_used_mb": round(mem.used / 2**20, 1),
                        "mem_total_mb": round(mem.total / 2**20, 1),
                        "temperature_c": nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
                    }
                )
        except Exception as e:
            log.warning("NVML query failed: %s", e)
            return None
        return gpus

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                log.debug("nvmlShutdown failed", exc_info=True)
            self._nvml = None


class SystemProbe:
    """CPU, memory, disk (of the data directory), temperatures, this process, GPUs."""

    def __init__(self, data_dir: Path):
        self._data_dir = Path(data_dir)
        self._process = psutil.Process()
        self._nvml: Nvml | None = None
        # The first cpu_percent() call only sets the reference point.
        psutil.cpu_percent(interval=None)
        self._process.cpu_percent(interval=None)

    def sample(self, gpu: bool = True) -> dict[str, Any]:
        vm = psutil.virtual_memory()
        out: dict[str, Any] = {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "load_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "memory": {
                "total_mb": round(vm.total / 2**20, 1),
                "available_mb": round(vm.available / 2**20, 1),
                "percent": vm.percent,
            },
            "disk": self._disk(),
            "temperatures_c": self._temperatures(),
        }
        with self._process.oneshot():
            out["process"] = {
                "rss_mb": round(self._process.memory_info().rss / 2**20, 1),
                "cpu_percent": self._process.cpu_percent(interval=None),
                "threads": self._process.num_threads(),
            }
        if gpu:
            if self._nvml is None:
                self._nvml = Nvml()
            out["gpu"] = self._nvml.sample()
        else:
            out["gpu"] = None
        return out

    def _disk(self) -> dict[str, Any] | None:
        path = next((p for p in (self._data_dir, *self._data_dir.parents) if p.exists()), None)
        if path is None:
            return None
        du = psutil.disk_usage(str(path))
        return {
            "path": str(self._data_dir),
            "total_mb": round(du.total / 2**20, 1),
            "free_mb": round(du.free / 2**20, 1),
            "percent": du.percent,
        }

    @staticmethod
    def _temperatures() -> dict[str, float]:
        read = getattr(psutil, "sensors_temperatures", None)
        if read is None:
            return {}
        try:
            sensors = read()
        except (OSError, RuntimeError):
            return {}
        # The hottest reading per chip is what a guard or a dashboard wants.
        return {chip: max(t.current for t in temps) for chip, temps in sensors.items() if temps}

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()


def supervise(
    stop: threading.Event,
    healthy: Callable[[], bool],
    status_line: Callable[[], str],
    status_file: Path | None = None,
    status_payload: Callable[[], Mapping[str, Any]] | None = None,
) -> None:
    """The main thread of a service until ``stop``: WATCHDOG=1 while ``healthy()``, STATUS= when the
    line changes, and the status file (container health) every STATUS_INTERVAL_S. Ends by writing
    the file one last time as not healthy (stopping)."""
    ping = watchdog_interval()
    tick = min(1.0, ping) if ping else 1.0
    last_line, last_write = "", 0.0
    while not stop.wait(tick):
        ok = healthy()
        if ping and ok:
            sd_notify("WATCHDOG=1")
        line = status_line()
        if line != last_line:
            sd_notify(f"STATUS={line}")
            last_line = line
        if status_file is not None and time.monotonic() - last_write >= STATUS_INTERVAL_S:
            last_write = time.monotonic()
            try:
                write_status_file(
                    status_file, ok, {"status": line, **(status_payload() if status_payload else {})}
                )
            except OSError as e:
                log.warning("status file %s: %s", status_file, e)
    if status_file is not None:
        with contextlib.suppress(OSError):
            write_status_file(status_file, False, {"state": "stopping"})
