"""The soak: minutes of mixed load on a fleet box (requests, samples, learner rounds, federated
rounds), watching the daemon's RSS, open file descriptors and request latency over time.

Requests go at a steady rate from a client that times each one from publish to answer. Samples
stream from a device that counts its PUBACKs; every ``min_new_samples`` of them start a learner
round, each promoted adapter is uploaded, each round of the aggregator (``min_uploads`` 1) returns
a global that the box gates. The first minute is warm-up (caches, allocator arenas). RSS growth
compares the median RSS of the first measured minute with that of the last; p99 drift compares
the p99 of requests answered while no learner round ran, first measured minute against the last
(a round on a 2-core box shares the CPU, which is the learner benchmark's subject, not drift).

This machine is shared, and a neighbour's load in the last minute but not the first reads as
drift. So a control twin runs beside the soaked box: a second daemon on the same bundle and broker,
asked at the same rate, with no samples, rounds or sync. ``p99_drift_pct`` is the soaked box's p99
ratio (last / first minute) over the twin's, measured in the same windows: what the mixed load did
to the daemon beyond what the machine did to both. The raw figures are reported beside it.
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

    first = (t_start + warmup_s, t_start + warmup_s + window_s)
    end = time.monotonic()
    last = (end - window_s, end)

    def window_p99(w: tuple[float, float], r: Requester = req) -> float | None:
        return p99([lat for t, lat in r.answers if w[0] <= t < w[1] and not in_round(t)])

    def window_rss(w: tuple[float, float]) -> float:
        return statistics.median(rss for t, rss, _ in samples if w[0] - t_start <= t < w[1] - t_start)

    def window_fds(w: tuple[float, float]) -> float:
        return statistics.median(fds for t, _, fds in samples if w[0] - t_start <= t < w[1] - t_start)

    p_first, p_last = window_p99(first), window_p99(last)
    c_first, c_last = window_p99(first, twin_req), window_p99(last, twin_req)
    drift = None
    if p_first and p_last and c_first and c_last:
        drift = round(100.0 * ((p_last / p_first) / (c_last / c_first) - 1.0), 1)
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
        "p99_ms_first": p_first,
        "p99_ms_last": p_last,
        "p99_drift_raw_pct": round(100.0 * (p_last - p_first) / p_first, 1) if p_first and p_last else None,
        "twin_p99_ms_first": c_first,
        "twin_p99_ms_last": c_last,
        "twin_requests_failed": twin_req.failed + len(twin_req.sent),
        "p99_drift_pct": drift,
        "rss_series": [(round(t), round(r, 1), f) for t, r, f in samples[:: max(1, len(samples) // 60)]],
        "alive": box.alive() and os.path.exists(f"/proc/{daemon.pid}"),
    }
