"""`make demo`: a fleet of three plants on this machine, federated, with a drift event (~5 min).

1. `make` builds the default bundle (all-MiniLM-L6-v2, offline) before this runs;
2. a private mosquitto starts from the shipped examples/mosquitto.conf on a free port; the fleet's
   Ed25519 keys are made with `edge-agent keys`; `edge-agent aggregator run` starts (FFA-LoRA
   rounds that close on three uploads), then three `edge-agent run` boxes, one per site;
3. each box gets its runtime config over MQTT (learning and sync on, small round budgets);
4. the fleet simulator (tools.simulate: three sites with their own label mix and vocabulary)
   sends each site's records: every record is first classified (``events``), the prediction is
   compared with the record's label (prequential accuracy), then the label goes back as
   ``feedback`` and as a labeled ``sample``. Each box's learner trains in a spawned process, its
   gate promotes, the box uploads, the aggregator averages, every box judges the signed global;
5. once every box has judged the first global (100-150 s into the stream), a drift event (new
   PLC firmware: new alarm codes, renamed sensor keys, new failure words) hits every site;
   held-out test sets per site are asked over ``infer/req`` before the drift, right after it, and
   at the end, once every box serves an adapter learned after the drift (100-170 s later);
6. SIGTERM to every process (exit codes checked, no process left behind), a summary table, and
   ``demo-report/``: summary.json and the plots of tools.report, drawn from the boxes' databases.

A live view (rich) shows per site accuracy, adapters, learner, latency and queues; without a
terminal it prints log lines instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil

from tools import report as fleet_report
from tools.broker import Mosquitto
from tools.simulate import LabeledText, PlantStream, default_sites

FLEET = "demo-fleet"
LORA_SEED = 20261202

# What the demo publishes as each box's runtime config. Rounds are kept short for a 2-core
# machine running three boxes: a round trains at most `time_budget_s` on the newest
# `max_train_samples` (new ones plus a class-balanced replay of older ones).
LEARNING: dict[str, Any] = {
    "enabled": True,
    "min_new_samples": 60,
    # Room for the fleet's global to be judged between two local rounds, and for the drift's
    # first records to arrive before the round after it reads its data.
    "min_interval_s": 40,
    "epochs": 4,
    # Measured on this stream (FFA-LoRA, 15/30 steps): lr 3e-3 0.54/0.72, 1e-2 0.69/0.78, 3e-2 diverges.
    "learning_rate": 1e-2,
    # Few rows, several passes: after the drift the newest (drifted) rows are half of a round.
    "max_train_samples": 240,
    "time_budget_s": 60,
    # No distillation: no teacher forward pass per step, so more steps fit in the budget.
    "distill_weight": 0.0,
    # Three boxes and their learners share two cores here: the guard must not wait for idle CPU.
    "max_cpu_percent": 100,
    "min_free_memory_mb": 256,
    "max_inference_p99_ms": 10000,
    # The drift is a change of the plant, not a bad adapter: after it every adapter's live
    # accuracy falls below what it was promoted with, and the default rollback (0.05 below) would
    # go back to older adapters that are no better. Retraining is the answer (accuracy_drop).
    "rollback_max_drop": 0.5,
}
SYNC: dict[str, Any] = {"enabled": True, "min_examples": 30, "upload_interval_s": 0, "resend_after_s": 5}
# A round closes on three uploads, or at its deadline with what it has.
ROUNDS: dict[str, Any] = {
    "strategy": "ffa_lora",
    "min_uploads": 3,
    "duration_s": 200.0,
    "lora_seed": LORA_SEED,
}

TEST_SIZE = 300  # held-out texts per site and distribution
ANSWER_TIMEOUT_S = 60.0
# What the demo's devices read from their box (not its own inbound topics: no echo of every record).
ANSWER_TOPICS = (
    "predictions",
    "infer/res",
    "events/res",
    "samples/res",
    "feedback/res",
    "status",
    "config/state",
    "telemetry",
    "learner",
    "sync",
)


def now() -> float:
    return time.time()


def device_of(site: str) -> str:
    """One box per site; device ids are unique within a fleet (its uploads are keyed by them)."""
    return f"{site}-box1"


# ---- state the view shows ------------------------------------------------------------------


@dataclass
class SiteState:
    name: str
    online: bool = False
    config: str = "-"
    adapter: str | None = None
    learner: str = "idle"
    promoted_local: int = 0
    promoted_fleet: int = 0
    rejected: int = 0
    records: int = 0
    samples_acked: int = 0
    failed: int = 0
    judged: deque[bool] = field(default_factory=lambda: deque(maxlen=50))
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=200))
    queue_engine: int = 0
    queue_ingest: int = 0
    outbox: int = 0
    tests: dict[str, float | None] = field(default_factory=dict)
    fleet_judged: int = 0  # globals this box's gate has judged
    promoted_after_drift: int = 0  # local adapters promoted after the drift event
    last_promoted_at: float = 0.0  # any promotion: the final window needs the new adapter serving

    def accuracy(self) -> float | None:
        return sum(self.judged) / len(self.judged) if self.judged else None


@dataclass
class FleetState:
    round: int | None = None
    uploads_in_round: int = 0
    min_uploads: int = ROUNDS["min_uploads"]
    globals: list[str] = field(default_factory=list)
    phase: str = "starting"
    started: float = field(default_factory=now)
    drift_at: float | None = None


class EventLog:
    """Recent events for the live view; printed at once when there is no terminal."""

    def __init__(self, plain: bool, started: float):
        self.plain = plain
        self.started = started
        self.lines: deque[str] = deque(maxlen=9)
        self.lock = threading.Lock()

    def __call__(self, text: str) -> None:
        line = f"[{now() - self.started:6.1f}s] {text}"
        with self.lock:
            self.lines.append(line)
        if self.plain:
            print(line, flush=True)


# ---- MQTT clients ------------------------------------------------------------------------------


def _client(client_id: str) -> mqtt.Client:
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)


class SiteDevices:
    """The plant side of one site: its devices publish records, feedback and samples to the box,
    read what the box answers, and keep device-side counts (PUBACKs, answers, errors)."""

    def __init__(self, port: int, site: str, state: SiteState, fleet: FleetState, log: EventLog):
        self.site, self.state, self.fleet, self.log = site, state, fleet, log
        self.base = f"edge/{site}/{device_of(site)}/"
        self.cond = threading.Condition()
        self.answers: dict[str, dict[str, Any]] = {}
        self.puback_failed: dict[int, str] = {}
        self.acked_samples: list[str] = []
        self.refused_samples: list[str] = []
        self.failures: list[str] = []
        self.requests = 0
        self.c = _client(f"demo-devices-{site}")
        self.c.on_message = self._on_message
        self.c.on_publish = self._on_publish
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe([(self.base + t, 1) for t in ANSWER_TOPICS])
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.puback_failed[mid] = str(reason_code)

    def _on_message(self, client, userdata, m) -> None:
        suffix = m.topic[len(self.base) :]
        try:
            body = json.loads(m.payload) if m.payload else {}
        except ValueError:
            return
        s = self.state
        if suffix in ("predictions", "infer/res", "events/res"):
            with self.cond:
                self.answers[str(body.get("id"))] = body
                self.cond.notify_all()
        elif suffix in ("samples/res", "feedback/res"):
            self.failures.append(f"{suffix}: {body.get('error')}")
            self.log(f"{self.site}: {suffix} error {body.get('error')}")
        elif suffix == "status":
            s.online = body.get("state") == "online"
            s.adapter = body.get("adapter_version")
        elif suffix == "config/state":
            s.config = f"v{body.get('version')} {body.get('status')}"
        elif suffix == "telemetry":
            queues = body.get("queues") or {}
            s.queue_engine = int(queues.get("engine", 0))
            s.queue_ingest = int(sum(v for k, v in queues.items() if k != "engine" and isinstance(v, int)))
            s.outbox = int(((body.get("sync") or {}).get("outbox") or {}).get("queued", 0))
            s.adapter = body.get("adapter_version")
        elif suffix == "learner":
            self._learner_event(body)
        elif suffix == "sync":
            self._sync_event(body)

    def _learner_event(self, b: dict[str, Any]) -> None:
        s, event = self.state, b.get("event")
        if event == "round_started":
            what = "judging" if b.get("origin") == "fleet" else "training"
            s.learner = f"{what} {b.get('version')}"
            self.log(f"{self.site}: learner {what} {b.get('version')} ({b.get('reason')})")
        elif event == "round_finished":
            s.learner = "idle"
            status, origin = b.get("status"), b.get("origin", "local")
            if origin == "fleet" and status in ("promoted", "rejected"):
                s.fleet_judged += 1
            if status == "promoted":
                if origin == "fleet":
                    s.promoted_fleet += 1
                else:
                    s.promoted_local += 1
                    if self.fleet.drift_at is not None:
                        s.promoted_after_drift += 1
                s.last_promoted_at = now()
                s.adapter = b.get("version")
            elif status == "rejected":
                s.rejected += 1
            acc = ""
            if b.get("candidate_accuracy") is not None:
                acc = f" holdout {b.get('active_accuracy', 0):.2f} -> {b['candidate_accuracy']:.2f}"
            reasons = "; ".join(b.get("reasons") or [])[:80]
            self.log(
                f"{self.site}: {b.get('version')} ({origin}) {status}{acc}{' (' + reasons + ')' if reasons and status != 'promoted' else ''}"
            )
        elif event == "rollback":
            self.log(f"{self.site}: rollback {b.get('from')} -> {b.get('to')} ({b.get('reason')})")

    def _sync_event(self, b: dict[str, Any]) -> None:
        event = b.get("event")
        if event == "upload_queued":
            self.log(f"{self.site}: upload of {b.get('adapter_version')} queued for round {b.get('round')}")
        elif event == "upload_acknowledged":
            self.log(
                f"{self.site}: upload acknowledged in round {b.get('round')}{' (late)' if b.get('late') else ''}"
            )
        elif event == "global_verified":
            self.log(f"{self.site}: global {b.get('version')} verified (signature, hash, shapes)")
        elif event and event.endswith("_refused"):
            self.log(f"{self.site}: sync {event}: {b.get('code')} {b.get('reason', '')[:60]}")

    def publish(self, suffix: str, body: dict[str, Any], retain: bool = False) -> bool:
        """QoS 1, waits for the PUBACK; True when the broker acknowledged it with success."""
        info = self.c.publish(self.base + suffix, json.dumps(body), qos=1, retain=retain)
        try:
            info.wait_for_publish(10)
        except (RuntimeError, ValueError):
            return False
        return info.is_published() and self.puback_failed.pop(info.mid, None) is None

    def wait_answer(self, rid: str, timeout: float = ANSWER_TIMEOUT_S) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while rid not in self.answers:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.answers.pop(rid)

    def record(self, rid: str, rec: LabeledText) -> None:
        """One labeled record: classified first, then its label as feedback and as a sample."""
        s = self.state
        self.requests += 1
        sent_at = now()
        if not self.publish(
            "events", {"id": rid, "text": rec.text, "ts": round(sent_at, 3), "source": "sim"}
        ):
            self._failed(rid, "event not acknowledged by the broker")
            return
        ans = self.wait_answer(rid)
        if ans is None or "error" in ans:
            self._failed(rid, f"no prediction: {ans.get('error') if ans else 'timeout'}")
        else:
            s.judged.append(ans.get("label") == rec.label)
            if ans.get("latency_ms") is not None:
                s.latencies.append(float(ans["latency_ms"]))
            self.publish("feedback", {"id": f"{rid}-fb", "prediction_id": rid, "label": rec.label})
        sid = f"{rid}-s"
        ok = self.publish(
            "samples", {"id": sid, "text": rec.text, "label": rec.label, "ts": round(sent_at, 3)}
        )
        (self.acked_samples if ok else self.refused_samples).append(sid)
        s.records += 1
        s.samples_acked = len(self.acked_samples)

    def _failed(self, rid: str, why: str) -> None:
        self.failures.append(f"{rid}: {why}")
        self.state.failed += 1
        self.log(f"{self.site}: request {rid} failed: {why}")

    def test(self, rid: str, records: list[LabeledText], chunk: int = 40) -> float | None:
        """Accuracy on held-out ``records`` asked over ``infer/req`` (not stored by the box)."""
        correct = asked = 0
        for i in range(0, len(records), chunk):
            part = records[i : i + chunk]
            req = f"{rid}-{i // chunk}"
            self.requests += 1
            if not self.publish("infer/req", {"id": req, "texts": [r.text for r in part]}):
                self._failed(req, "request not acknowledged by the broker")
                continue
            ans = self.wait_answer(req)
            if ans is None or "error" in ans:
                self._failed(req, f"no answer: {ans.get('error') if ans else 'timeout'}")
                continue
            preds = ans["predictions"]
            correct += sum(p["label"] == r.label for p, r in zip(preds, part, strict=True))
            asked += len(part)
        return correct / asked if asked else None


class FleetWatcher:
    """Reads what headquarters publishes: the round (retained), the aggregator's status, globals."""

    def __init__(self, port: int, state: FleetState, log: EventLog):
        self.state, self.log = state, log
        self.base = f"fed/{FLEET}/"
        self.c = _client("demo-fleet-watcher")
        self.c.on_message = self._on_message
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [(self.base + "round", 1), (self.base + "global", 1), (self.base + "hq/+", 1)]
        )
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()

    def _on_message(self, client, userdata, m) -> None:
        try:
            body = json.loads(m.payload) if m.payload else {}
        except ValueError:
            return
        st = self.state
        topic = m.topic[len(self.base) :]
        if topic == "round" and body:
            if body.get("round") != st.round:
                self.log(
                    f"fleet: round {body.get('round')} open ({body.get('strategy')}, {body.get('min_uploads')} uploads)"
                )
            st.round, st.min_uploads = body.get("round"), body.get("min_uploads", st.min_uploads)
        elif topic == "global" and body.get("version"):
            if body["version"] not in st.globals:
                st.globals.append(body["version"])
                self.log(
                    f"fleet: global {body['version']} published ({body.get('participants')} boxes, signed)"
                )
        elif topic.startswith("hq/") and body:
            st.uploads_in_round = int(body.get("uploads_in_round") or 0)


# ---- live view ------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _pct(values: deque[float], q: float) -> float | None:
    return fleet_report.percentile(list(values), q) if values else None


def site_rows(sites: list[SiteState]) -> list[list[str]]:
    rows = []
    for s in sites:
        tests = " / ".join(_fmt(s.tests.get(k)) for k in ("before_drift", "after_drift", "final"))
        rows.append(
            [
                s.name,
                "online" if s.online else "offline",
                _fmt(s.accuracy()),
                tests,
                s.adapter or "base",
                f"{s.promoted_local}/{s.promoted_fleet}/{s.rejected}",
                s.learner,
                f"{_fmt(_pct(s.latencies, 50), '.0f')}/{_fmt(_pct(s.latencies, 99), '.0f')}",
                f"{s.queue_engine}/{s.queue_ingest}/{s.outbox}",
                f"{s.records}/{s.samples_acked}/{s.failed}",
            ]
        )
    return rows


HEADERS = [
    "site",
    "box",
    "acc (last 50)",
    "test before/after/final",
    "adapter",
    "local/fleet/refused",
    "learner",
    "latency p50/p99 ms",
    "queue engine/ingest/outbox",
    "records/samples acked/failed",
]


def fleet_line(f: FleetState) -> str:
    elapsed = now() - f.started
    drift = f"drift at {f.drift_at - f.started:.0f}s" if f.drift_at else "no drift yet"
    rnd = f"round {f.round}: {f.uploads_in_round}/{f.min_uploads} uploads" if f.round else "no round yet"
    return f"{elapsed:5.0f}s  phase: {f.phase}  |  fleet {FLEET}: {rnd}, {len(f.globals)} globals  |  {drift}"


class LiveView:
    """rich Live + Table on a terminal; periodic plain status lines otherwise."""

    def __init__(self, sites: list[SiteState], fleet: FleetState, log: EventLog, plain: bool):
        self.sites, self.fleet, self.log, self.plain = sites, fleet, log, plain
        self._live: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def render(self) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table

        t = Table(title="edge-agent fleet demo", title_justify="left", expand=True)
        for h in HEADERS:
            t.add_column(h, overflow="fold")
        for row in site_rows(self.sites):
            t.add_row(*row)
        with self.log.lock:
            events = "\n".join(self.log.lines)
        return Group(t, Panel(fleet_line(self.fleet), title="fleet"), Panel(events or "-", title="events"))

    def __enter__(self) -> LiveView:
        if self.plain:
            self._thread = threading.Thread(target=self._plain_loop, daemon=True)
            self._thread.start()
        else:
            from rich.live import Live

            self._live = Live(get_renderable=self.render, refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def _plain_loop(self) -> None:
        while not self._stop.wait(15.0):
            print(f"-- {fleet_line(self.fleet)}", flush=True)
            for row in site_rows(self.sites):
                print("   " + "  ".join(f"{h}={v}" for h, v in zip(HEADERS, row, strict=True)), flush=True)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._live is not None:
            self._live.__exit__(None, None, None)


# ---- processes -------------------------------------------------------------------------------------


class Processes:
    """The demo's child processes: started in their own session (a Ctrl-C reaches only the demo,
    which stops them in order), watched for descendants (learners), stopped with SIGTERM."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, str] = {}  # every descendant seen, pid -> name

    def start(self, name: str, args: list[str], log_path: Path) -> subprocess.Popen:
        log = log_path.open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def watch(self) -> None:
        for p in psutil.Process().children(recursive=True):
            if p.pid not in self.seen:
                try:
                    self.seen[p.pid] = " ".join(p.cmdline()[-4:])
                except psutil.Error:
                    self.seen[p.pid] = "?"

    def stop(self, names: list[str], timeout: float = 90.0) -> dict[str, int | None]:
        self.watch()
        for n in names:
            p = self.procs[n]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for n in names:
            p = self.procs[n]
            try:
                codes[n] = p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                codes[n] = None  # did not stop on SIGTERM
        return codes

    def leftovers(self) -> list[str]:
        left = []
        for pid, name in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {name}")
            except psutil.NoSuchProcess:
                pass
        return left


# ---- the demo ----------------------------------------------------------------------------------------


def write_box_config(path: Path, site: str, port: int, bundle: Path, data: Path, public_key: Path) -> Path:
    path.write_text(
        f"""\
site = "{site}"
device = "{device_of(site)}"
data_dir = "{data}"
bundle = "{bundle}"
log_level = "INFO"

[broker]
host = "127.0.0.1"
port = {port}

[engine]
# Two cores for three boxes and their learners: one ORT thread each (README, Operations).
intra_op_threads = 1

[fleet]
id = "{FLEET}"
public_key_files = ["{public_key}"]
"""
    )
    return path


def write_hq_config(path: Path, port: int, bundle: Path, data: Path, key: Path) -> Path:
    rounds = "\n".join(f"{k} = {json.dumps(v)}" for k, v in ROUNDS.items())
    path.write_text(
        f"""\
fleet = "{FLEET}"
data_dir = "{data}"
bundle = "{bundle}"
signing_key_file = "{key}"
worker_id = "hq-1"
log_level = "INFO"

[broker]
host = "127.0.0.1"
port = {port}

[rounds]
{rounds}
"""
    )
    return path


def wait_for(cond: Callable[[], bool], timeout: float, what: str, procs: Processes | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if procs is not None:
            dead = [n for n, p in procs.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited early (see the logs in the work directory)")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.2)


def stream(
    dev: SiteDevices, src: PlantStream, until: Callable[[], bool], rate: float, stop: threading.Event
) -> None:
    """The site's records at ``rate`` per second until ``until()``; the drift flips ``src.drift_at``."""
    interval = 1.0 / rate
    next_at = time.monotonic()
    while not until() and not stop.is_set():
        (rec,) = src.take(1)
        dev.record(f"{dev.site}-{dev.state.records:05d}", rec)
        next_at = max(next_at + interval, time.monotonic() - interval)
        time.sleep(max(0.0, next_at - time.monotonic()))


def run_demo(args: argparse.Namespace) -> int:
    work = Path(args.workdir).resolve()
    out = Path(args.out).resolve()
    bundle = Path(args.bundle).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    plain = args.plain or not sys.stdout.isatty()
    fleet = FleetState()
    log = EventLog(plain, fleet.started)
    profiles = default_sites(args.sites, args.seed)
    sites = [SiteState(p.name) for p in profiles]
    procs = Processes()
    devices: list[SiteDevices] = []
    watcher: FleetWatcher | None = None
    stop = threading.Event()
    results: dict[str, Any] = {"exit_codes": {}}
    broker = Mosquitto(work / "broker")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        broker.start()
        port = broker.port
        log(f"mosquitto on 127.0.0.1:{port} (examples/mosquitto.conf; log {broker.log_path})")
        keys = work / "keys"
        subprocess.run(
            [sys.executable, "-m", "agent.cli", "keys", "--out", str(keys)], check=True, capture_output=True
        )
        hq_conf = write_hq_config(work / "hq.toml", port, bundle, work / "hq", keys / "fleet.key")
        procs.start("aggregator", ["aggregator", "run", "--config", str(hq_conf)], work / "aggregator.log")
        for p in profiles:
            conf = write_box_config(
                work / f"{p.name}.toml", p.name, port, bundle, work / p.name, keys / "fleet.pub"
            )
            procs.start(p.name, ["run", "--config", str(conf)], work / f"{p.name}.log")
        log(f"aggregator and {len(profiles)} boxes started (logs and databases in {work})")
        watcher = FleetWatcher(port, fleet, log)
        devices = [SiteDevices(port, p.name, s, fleet, log) for p, s in zip(profiles, sites, strict=True)]
        with LiveView(sites, fleet, log, plain):
            fleet.phase = "boxes starting"
            wait_for(lambda: all(s.online for s in sites), 240, "boxes online", procs)
            wait_for(lambda: fleet.round is not None, 60, "round 1 announced", procs)
            for d in devices:
                d.publish(
                    "config",
                    {"version": 1, "learning": LEARNING, "sync": SYNC, "telemetry": {"interval_s": 2}},
                    retain=True,
                )
            wait_for(
                lambda: all(s.config == "v1 accepted" for s in sites), 30, "runtime config accepted", procs
            )
            log("boxes online, runtime config v1 accepted (learning + sync on)")

            streams = [PlantStream(p, seed=args.seed) for p in profiles]
            tests_pre = [PlantStream(p, seed=args.seed + 101).take(TEST_SIZE) for p in profiles]
            tests_post = [PlantStream(p, seed=args.seed + 202, drift_at=0).take(TEST_SIZE) for p in profiles]
            t_start = now()
            fleet.phase = "before drift"
            drift_event, end_event = threading.Event(), threading.Event()

            def site_main(i: int) -> None:
                d, src, s = devices[i], streams[i], sites[i]
                stream(d, src, drift_event.is_set, args.rate, stop)
                if stop.is_set():
                    return
                s.tests["before_drift"] = d.test(f"{d.site}-test-pre", tests_pre[i])
                src.drift_at = s.records  # the firmware update: every record from here on is drifted
                s.tests["after_drift"] = d.test(f"{d.site}-test-drift", tests_post[i])
                stream(d, src, end_event.is_set, args.rate, stop)
                if stop.is_set():
                    return
                s.tests["final"] = d.test(f"{d.site}-test-final", tests_post[i])
                s.tests["final_pre_drift_set"] = d.test(f"{d.site}-test-final-pre", tests_pre[i])

            threads = [
                threading.Thread(target=site_main, args=(i,), daemon=True) for i in range(len(devices))
            ]
            for t in threads:
                t.start()
            drift_time = end_time = 0.0
            while any(t.is_alive() for t in threads):
                procs.watch()
                elapsed = now() - t_start
                # The drift comes once the fleet has settled (every box judged the first global),
                # within [min, max] seconds; the end once every box promoted an adapter learned
                # after it (and the plant has seen it a while), within its own bounds.
                if not drift_event.is_set() and (
                    elapsed >= args.drift_max
                    or (elapsed >= args.drift_min and all(s.fleet_judged for s in sites))
                ):
                    drift_time = now()
                    fleet.drift_at = drift_time
                    fleet.phase = "after drift"
                    drift_event.set()
                    log("DRIFT: new PLC firmware at every site (new alarm codes, sensor keys, failure words)")
                if drift_event.is_set() and not end_event.is_set():
                    since = now() - drift_time
                    # ... and no box is in the middle of judging a global (its verdict is in the report).
                    settled = all(
                        s.promoted_after_drift
                        and now() - s.last_promoted_at >= args.settle
                        and not s.learner.startswith("judging")
                        for s in sites
                    )
                    if since >= args.after_max or (since >= args.after_min and settled):
                        end_time = now()
                        fleet.phase = "final tests"
                        end_event.set()
                        log("every site has served a post-drift adapter: final held-out tests")
                dead = [n for n, p in procs.procs.items() if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"{', '.join(dead)} exited during the demo")
                time.sleep(0.5)
            results["t_start"], results["drift_at"], results["t_end"] = t_start, drift_time, end_time
            fleet.phase = "stopping"
            log("streams done; stopping boxes, aggregator, broker (SIGTERM)")
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        results["interrupted"] = True
    finally:
        stop.set()
        for d in devices:
            d.close()
        if watcher is not None:
            watcher.close()
        boxes = [p.name for p in profiles if p.name in procs.procs]
        codes = procs.stop(boxes)
        if "aggregator" in procs.procs:
            codes.update(procs.stop(["aggregator"]))
        broker.stop()
        codes["mosquitto"] = broker.proc.returncode if broker.proc is not None else None
        results["exit_codes"] = codes
        results["left_behind"] = procs.leftovers()
        results["processes_watched"] = len(procs.seen)
    if results.get("interrupted") or "t_start" not in results:
        print(f"exit codes: {results['exit_codes']}; left behind: {results['left_behind'] or 'none'}")
        return 1
    return finish(args, work, out, profiles, sites, devices, results)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def finish(
    args: argparse.Namespace,
    work: Path,
    out: Path,
    profiles: list[Any],
    sites: list[SiteState],
    devices: list[SiteDevices],
    results: dict[str, Any],
) -> int:
    shutil.rmtree(out, ignore_errors=True)
    dbs = [work / p.name / "edge-agent.db" for p in profiles]
    hq_db = work / "hq" / "aggregator.db"
    drift, t_start, t_end = results["drift_at"], results["t_start"], results["t_end"]
    fleet = fleet_report.read_fleet([*dbs, hq_db], marks=[("drift", drift)])
    report = fleet_report.write_report(fleet, out)
    per_site: dict[str, Any] = {}
    lost_total = failed_total = 0
    for box, s, d in zip(fleet.boxes, sites, devices, strict=True):
        stored: dict[str, int] = {}
        for sid in box.sample_ids:
            stored[sid] = stored.get(sid, 0) + 1
        lost = [sid for sid in d.acked_samples if sid not in stored]
        dup = [sid for sid in d.acked_samples if stored.get(sid, 0) > 1]
        lost_total += len(lost) + len(dup)
        failed_total += len(d.failures)
        w = args.window_s
        promoted = [a.at for a in box.promotions]  # each window measures the adapter then serving
        per_site[s.name] = {
            "held_out_test": {
                "before_drift": _round(s.tests.get("before_drift")),
                "after_drift": _round(s.tests.get("after_drift")),
                "final": _round(s.tests.get("final")),
                "final_on_pre_drift_set": _round(s.tests.get("final_pre_drift_set")),
                "texts": TEST_SIZE,
            },
            "prequential": {
                "before_drift": _round(
                    fleet_report.serving_window(box.judged, promoted, drift - w, drift, "end")
                ),
                "after_drift": _round(
                    fleet_report.serving_window(box.judged, promoted, drift, drift + w, "start")
                ),
                "final": _round(
                    fleet_report.serving_window(box.judged, promoted, t_end - w, t_end + 1, "end")
                ),
                "window_s": w,
            },
            "records": s.records,
            "samples_acked_by_broker": len(d.acked_samples),
            "samples_refused_by_broker": len(d.refused_samples),
            "samples_stored": len(box.sample_ids),
            "samples_lost": len(lost),
            "samples_duplicated": len(dup),
            "requests": d.requests,
            "requests_failed": len(d.failures),
            **{k: v for k, v in fleet_report.box_summary(box).items() if k != "database"},
        }
    improving = {
        n: (v["held_out_test"]["final"] or 0) > (v["held_out_test"]["after_drift"] or 1)
        for n, v in per_site.items()
    }
    codes = results["exit_codes"]
    summary = {
        "sites": [p.name for p in profiles],
        "rounds_completed": report["rounds_completed"],
        "globals_judged": len(
            {a.version for b in fleet.boxes for a in b.adapters if a.origin == "fleet" and not a.refresh}
        ),
        "accuracy": {n: v["held_out_test"] for n, v in per_site.items()},
        "accuracy_improving_after_drift": improving,
        "samples_lost": lost_total,
        "requests_failed": failed_total,
        "how_accuracy_is_measured": (
            "held_out_test: per site, TEST_SIZE texts the boxes never saw (one set from before the drift, "
            "one from after), asked over MQTT infer/req: before_drift = the pre-drift set just before the "
            "drift; after_drift = the post-drift set right after it (the adapter trained before the drift); "
            "final = the post-drift set at the end. prequential: every labeled record's text was first "
            "asked over MQTT (events), its prediction compared with its label, then the label sent as "
            "feedback and as a sample; accuracy over the window_s seconds before the drift, after it, and "
            "at the end, each cut to one adapter's service (from its promotion, or until the next one); the "
            "plots show it over time, from the boxes' databases."
        ).replace("TEST_SIZE", str(TEST_SIZE)),
        "how_samples_lost_is_counted": (
            "device side: every sample whose PUBACK reported success, looked up by id in that box's SQLite "
            "after the boxes stopped; missing or stored more than once counts as lost"
        ),
        "timeline_s": {
            "drift": round(drift - t_start, 1),
            "end": round(t_end - t_start, 1),
            "rate_per_site_per_s": args.rate,
        },
        "runtime_config": {"learning": LEARNING, "sync": SYNC},
        "aggregator_rounds": ROUNDS,
        "exit_codes": codes,
        "processes_left_behind": results["left_behind"],
        "processes_watched": results["processes_watched"],
        "per_site": per_site,
        "plots": report["plots"],
        "redraw": "edge-agent report "
        + " ".join(str(p) for p in [*dbs, hq_db])
        + f" --mark drift={drift:.3f} --out DIR",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, out)
    problems = [f"{n} exited with {c}" for n, c in codes.items() if c != 0]
    problems += [f"left behind: {p}" for p in results["left_behind"]]
    problems += [f"{lost_total} samples lost"] if lost_total else []
    problems += [f"{failed_total} requests failed"] if failed_total else []
    problems += [
        f"{n}: held-out accuracy did not improve after the drift" for n, ok in improving.items() if not ok
    ]
    print("demo checks: " + ("all met" if not problems else "NOT MET: " + "; ".join(problems)))
    return 0 if not problems else 1


def print_summary(summary: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    # A log file has no width: wide enough for the table without wrapping.
    console = Console(width=None if sys.stdout.isatty() else 150)
    t = Table(title="edge-agent fleet demo: summary", title_justify="left")
    for h in (
        "site",
        "test before drift",
        "after drift",
        "final",
        "prequential before/after/final",
        "promoted local/fleet",
        "refused",
        "samples acked/stored/lost",
        "requests/failed",
        "p50/p99 ms",
    ):
        t.add_column(h)
    for name, v in summary["per_site"].items():
        ht, pq = v["held_out_test"], v["prequential"]
        t.add_row(
            name,
            _fmt(ht["before_drift"]),
            _fmt(ht["after_drift"]),
            _fmt(ht["final"]),
            " / ".join(_fmt(pq[k]) for k in ("before_drift", "after_drift", "final")),
            f"{v['promoted_local']}/{v['promoted_fleet']}",
            str(v["rejected"]),
            f"{v['samples_acked_by_broker']}/{v['samples_stored']}/{v['samples_lost']}",
            f"{v['requests']}/{v['requests_failed']}",
            f"{_fmt(v['latency_p50_ms'], '.0f')}/{_fmt(v['latency_p99_ms'], '.0f')}",
        )
    console.print(t)
    codes = ", ".join(f"{k} {v}" for k, v in summary["exit_codes"].items())
    console.print(
        f"rounds completed {summary['rounds_completed']}, globals judged by the boxes' gates "
        f"{summary['globals_judged']}; "
        f"samples_lost {summary['samples_lost']}, requests_failed {summary['requests_failed']}; "
        f"accuracy improving after drift: {summary['accuracy_improving_after_drift']}"
    )
    console.print(
        f"exit codes (SIGTERM): {codes}; processes left behind: {len(summary['processes_left_behind'])} "
        f"of {summary['processes_watched']} watched"
    )
    console.print(f"report: {out}/summary.json, {', '.join(summary['plots'])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="build/bundle-minilm")
    ap.add_argument("--workdir", default="build/demo", help="broker, keys, configs, logs, databases")
    ap.add_argument("--out", default="demo-report", help="summary.json and the plots")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--rate", type=float, default=4.0, help="labeled records per second per site")
    ap.add_argument("--drift-min", type=float, default=100.0, help="earliest drift (s of streaming)")
    ap.add_argument("--drift-max", type=float, default=150.0, help="latest drift (s of streaming)")
    ap.add_argument("--after-min", type=float, default=100.0, help="least streaming after the drift (s)")
    ap.add_argument("--after-max", type=float, default=200.0, help="most streaming after the drift (s)")
    ap.add_argument(
        "--settle", type=float, default=20.0, help="streaming after the last post-drift promotion (s)"
    )
    ap.add_argument("--window-s", type=float, default=40.0, help="prequential summary windows (seconds)")
    ap.add_argument("--plain", action="store_true", help="log lines instead of the live view")
    return run_demo(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
