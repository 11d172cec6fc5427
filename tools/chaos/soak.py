"""The soak: minutes of mixed load on a fleet box (requests, samples, learner rounds, federated
rounds), watching the daemon's RSS, open file descriptors and request latency over time.

Requests go at a steady rate from a client that times each one from publish to answer. Samples
stream from a device that counts its PUBACKs; every ``min_new_samples`` of them start a learner
round, each promoted adapter is uploaded, each round of the aggregator (``min_uploads`` 1) returns
a global that the box gates. The first minute is warm-up (caches, allocator arenas). RSS growth
compares the median RSS of the first measured minute with that of the last. Latency counts the
requests answered while no learner round ran (a round on a 2-core box shares the CPU, which is the
learner benchmark's subject, not drift).

p99 drift is a trend, not one window: the measured time is cut into half-minute windows, and the
median of the windows' p99 in the last third is compared with that in the first third. A single
window's p99 (600 requests) moves with one event in it; comparing the first minute with the last
read +53 % in one run and -33 % and -39 % in others, with the per-window series flat but for one
spike each time. A leak, a growing queue or a table scan that grows with the data moves the whole
last third.

This machine is shared, and a neighbour's load late in the run but not early reads as drift. So a
control twin runs beside the soaked box: a second daemon on the same bundle and broker, asked at
the same rate, with no samples, rounds or sync. ``p99_drift_pct`` is the soaked box's ratio (last
third / first third) over the twin's, in the same windows: what the mixed load did to the daemon
beyond what the machine did to both. The first- and last-minute p99s are reported beside it.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from tests.integration.conftest import wait_until
from tools.chaos.world import LEARNING, SYNC, World, stored_samples


class Requester:
    """Asks ``rate`` times a second and keeps (sent at, latency) of every answer."""

    def __init__(self, world: World, topic_base: str, rate: float):
        self.base, self.rate = topic_base, rate
        self.sent: dict[str, float] = {}
        self.answers: list[tuple[float, float]] = []
        self.failed = 0
        self.stop = threading.Event()
        self.c = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"soak-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
        )
        self.c.on_message = self._on_message
        self.c.connect(world.broker.host, world.broker.port)
        self.c.subscribe(topic_base + "infer/res", qos=1)
        self.c.loop_start()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _on_message(self, client, userdata, m) -> None:
        body = json.loads(m.payload)
        t0 = self.sent.pop(body.get("id"), None)
        if t0 is None:
            return
        if "error" in body:
            self.failed += 1
        else:
            self.answers.append((t0, (time.monotonic() - t0) * 1000.0))

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            rid = f"soak-{i}"
            self.sent[rid] = time.monotonic()
            self.c.publish(
                self.base + "infer/req",
                json.dumps({"id": rid, "text": f"spindle vibration high {i % 50}"}),
                qos=1,
            )
            i += 1
            self.stop.wait(1.0 / self.rate)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        time.sleep(2.0)
        self.c.disconnect()
        self.c.loop_stop()


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(0.99 * len(values)))]


def third_medians(values: list[float | None], third: int) -> tuple[float | None, float | None]:
    """Median of the first ``third`` values and of the last ``third`` (windows without answers left out)."""
    head = [v for v in values[:third] if v is not None]
    tail = [v for v in values[-third:] if v is not None]
    return (statistics.median(head) if head else None, statistics.median(tail) if tail else None)


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def soak(world: World, seconds: float, warmup_s: float = 60.0, window_s: float = 60.0) -> dict[str, Any]:
    from tools.chaos.scenarios import fleet_box

    world.aggregator(min_uploads=1, duration_s=120.0)
    box = fleet_box(world)
    world.configure(box, 2, learning={**LEARNING, "min_new_samples": 400, "min_interval_s": 30}, sync=SYNC)
    assert box.proc is not None
    daemon = psutil.Process(box.proc.proc.pid)
    twin = world.box("control-twin")
    req = Requester(world, box.topic(""), rate=20.0)
    twin_req = Requester(world, twin.topic(""), rate=20.0)
    req.thread.start()
    twin_req.thread.start()
    device = world.devices(1, box, "soak")[0]
    rounds: list[tuple[float, float | None]] = []  # (start, end) of learner rounds, monotonic
    samples: list[tuple[float, float, int]] = []  # (t, rss MB, fds)
    t_start = time.monotonic()
    sent = 0
    seen_events = 0
    while time.monotonic() - t_start < seconds:
        device.publish(10, start=sent)
        sent += 10
        events = world.events(box, "learner")
        for ev in events[seen_events:]:
            now = time.monotonic()
            if ev["event"] == "round_started":
                rounds.append((now, None))
            elif ev["event"] == "round_finished" and rounds and rounds[-1][1] is None:
                rounds[-1] = (rounds[-1][0], now)
        seen_events = len(events)
        samples.append((time.monotonic() - t_start, daemon.memory_info().rss / 2**20, daemon.num_fds()))
        time.sleep(1.0)
    # The last window ends with the load: what follows (draining PUBACKs, settling rows) has no requests.
    end = time.monotonic()
    req.close()
    twin_req.close()
    wait_until(lambda: device.answered() == sent, timeout=60, what="PUBACKs")
    acked = device.acked()
    device.close()
    from tools.chaos.world import settle_rows

    settle_rows(box, len(acked), quiet_s=5.0)
    ids, rows = stored_samples(box)

    def in_round(t: float) -> bool:
        return any(start - 1.0 <= t <= (end or float("inf")) + 1.0 for start, end in rounds)

    def in_round_s(a: float, b: float) -> int:
        return sum(1 for k in range(int(b - a)) if in_round(a + k))

    first = (t_start + warmup_s, t_start + warmup_s + window_s)
    last = (end - window_s, end)

    def window_p99(w: tuple[float, float], r: Requester = req) -> float | None:
        return p99([lat for t, lat in r.answers if w[0] <= t < w[1] and not in_round(t)])

    def window_rss(w: tuple[float, float]) -> float:
        return statistics.median(rss for t, rss, _ in samples if w[0] - t_start <= t < w[1] - t_start)

    def window_fds(w: tuple[float, float]) -> float:
        return statistics.median(fds for t, _, fds in samples if w[0] - t_start <= t < w[1] - t_start)

    p_first, p_last = window_p99(first), window_p99(last)
    c_first, c_last = window_p99(first, twin_req), window_p99(last, twin_req)
    # Half-minute windows after the warm-up: (start, box p99, twin p99, seconds of it in a round).
    starts = [t_start + warmup_s + k * 30.0 for k in range(int((end - t_start - warmup_s) // 30))]
    series = [
        (w0, window_p99((w0, w0 + 30.0)), window_p99((w0, w0 + 30.0), twin_req), in_round_s(w0, w0 + 30.0))
        for w0 in starts
    ]
    third = max(1, len(series) // 3)
    trend = {
        name: third_medians([row[col] for row in series], third) for name, col in (("box", 1), ("twin", 2))
    }
    drift = None
    (b_first, b_last), (t_first, t_last) = trend["box"], trend["twin"]
    if b_first and b_last and t_first and t_last:
        drift = round(100.0 * ((b_last / b_first) / (t_last / t_first) - 1.0), 1)
    rss_first, rss_last = window_rss(first), window_rss(last)
    uploads = len([u for u in world.events(box, "sync") if u["event"] == "upload_acknowledged"])
    globals_ = len([u for u in world.events(box, "sync") if u["event"] == "global_verified"])
    return {
        "seconds": round(end - t_start, 1),
        "requests": len(req.answers),
        "requests_failed": req.failed + len(req.sent),
        "samples_sent": len(acked),
        "samples_lost": len(acked - ids),
        "duplicates": rows - len(ids),
        "learner_rounds": len(rounds),
        "uploads_acknowledged": uploads,
        "globals_verified": globals_,
        "rss_mb_first": round(rss_first, 1),
        "rss_mb_last": round(rss_last, 1),
        "rss_growth_pct": round(100.0 * (rss_last - rss_first) / rss_first, 2),
        # Medians over the same windows: learner rounds open pipes and database connections for a while.
        "fds_first": window_fds(first),
        "fds_last": window_fds(last),
        "p99_ms_first_minute": p_first,
        "p99_ms_last_minute": p_last,
        "twin_p99_ms_first_minute": c_first,
        "twin_p99_ms_last_minute": c_last,
        "p99_ms_first_third": b_first,
        "p99_ms_last_third": b_last,
        "p99_drift_raw_pct": round(100.0 * (b_last - b_first) / b_first, 1) if b_first and b_last else None,
        "twin_p99_ms_first_third": t_first,
        "twin_p99_ms_last_third": t_last,
        "twin_requests_failed": twin_req.failed + len(twin_req.sent),
        "p99_drift_pct": drift,
        # p99 over time: (s since start, box p99 outside rounds, twin p99, seconds of the window in a round).
        "p99_series": [(round(w0 - t_start), _round(b), _round(t), r) for w0, b, t, r in series],
        "rounds": [(round(a - t_start, 1), round(b - t_start, 1) if b else None) for a, b in rounds],
        "rss_series": [(round(t), round(r, 1), f) for t, r, f in samples[:: max(1, len(samples) // 60)]],
        "alive": box.alive() and os.path.exists(f"/proc/{daemon.pid}"),
    }
