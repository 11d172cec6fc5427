"""``python -m tools.bench bundle``: request latency and failures across a base-model (bundle) switch.

The daemon serves through ``agent.daemon.serving.SwitchableEngine``; a new bundle is opened in a
background thread (as ``agent.fed.bundles`` ``_try`` does) and then ``switch``-ed in. Here client
threads submit single, distinct texts (no cache hits) at a steady rate; midway through each round an
engine is opened on the other bundle (A: the bundle, B: a copy in a temp dir, so a real new session
opens) and switched to. Rounds alternate A->B, B->A. Per round: ``bundle_switch_ms`` = p99 of the
requests started from the start of the open to ``--after-s`` after the switch, ``steady_p99_ms`` = p99
of the requests outside that window, ``open_ms``, failures (exception, timeout or missing result).
Reported figures are medians over rounds; failures are summed.

Output: a table on stdout; with ``--json`` the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tools.bench import common
from tools.bench.common import log

DEFAULT_BUNDLE = Path("build/bundle-minilm")
THREADS = common.DEFAULT_THREADS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench bundle", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle A (built if missing)")
    p.add_argument("--switches", type=int, default=None, help="switch rounds (default 5; 2 with --quick)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rate", type=float, default=10.0, help="requests per second per client")
    p.add_argument("--pre-s", type=float, default=3.0, help="steady load before each open")
    p.add_argument("--after-s", type=float, default=2.0, help="window after the switch; also load after")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 switches, short phases")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    return p


def _open(bundle: Path, work: Path) -> Any:
    from agent.engine import EngineConfig, InferenceEngine

    return InferenceEngine.open(bundle, EngineConfig(intra_op_threads=THREADS), work_dir=work)


def _round(served: Any, other: Path, work: Path, args: argparse.Namespace, tag: int) -> dict[str, Any]:
    stop = threading.Event()
    records: list[tuple[float, float, bool]] = []  # (start, ms, failed)
    lock = threading.Lock()

    def client(cid: int) -> None:
        gap, n = 1.0 / args.rate, 0
        nxt = time.perf_counter()
        while not stop.is_set():
            n += 1
            text = f"spindle motor {cid} vibration reading {tag}-{n} above threshold on line {n % 7}"
            t0 = time.perf_counter()
            failed = False
            try:
                preds = served.submit([text]).result(timeout=60)
                failed = len(preds) != 1 or preds[0] is None
            except Exception:  # noqa: BLE001 - every failure counts
                failed = True
            ms = (time.perf_counter() - t0) * 1000.0
            with lock:
                records.append((t0, ms, failed))
            nxt += gap
            time.sleep(max(0.0, nxt - time.perf_counter()))

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(args.pre_s)
    t_open = time.perf_counter()
    box: dict[str, Any] = {}
    opener = threading.Thread(target=lambda: box.setdefault("engine", _open(other, work)))
    opener.start()
    opener.join()
    t_switch = time.perf_counter()
    served.switch(box["engine"], other)
    t_switched = time.perf_counter()
    time.sleep(args.after_s + args.pre_s)
    stop.set()
    for t in threads:
        t.join()
    end = t_switched + args.after_s
    inside = [r for r in records if t_open <= r[0] <= end]
    outside = [r for r in records if not (t_open <= r[0] <= end)]
    sw = common.percentile([r[1] for r in inside], 99)
    st = common.percentile([r[1] for r in outside], 99)
    return {
        "bundle": str(other),
        "open_ms": (t_switch - t_open) * 1000.0,
        "switch_call_ms": (t_switched - t_switch) * 1000.0,
        "bundle_switch_ms": sw,
        "switch_p50_ms": common.percentile([r[1] for r in inside], 50),
        "steady_p99_ms": st,
        "steady_p50_ms": common.percentile([r[1] for r in outside], 50),
        "switch_p99_ratio": common.ratio(sw, st),
        "requests_during_switch": len(inside),
        "failed_requests_during_bundle_switch": sum(r[2] for r in inside),
        "failed_requests_total": sum(r[2] for r in records),
        "requests_total": len(records),
        "max_ms_during_switch": max((r[1] for r in inside), default=None),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from agent.daemon.serving import SwitchableEngine

    t_start = time.perf_counter()
    machine = common.machine_info(THREADS)
    a = common.ensure_bundle(Path(args.bundle))
    work = Path(tempfile.mkdtemp(prefix="bench-bundle-"))
    try:
        b = work / "bundle-b"
        shutil.copytree(a, b)
        served = SwitchableEngine(_open(a, work / "engine-a0"), a)
        served.submit(["warm up"]).result(timeout=60)
        rounds = []
        for i in range(args.switches):
            other = b if i % 2 == 0 else a
            log(f"round {i + 1}/{args.switches}: switch to {other}")
            rounds.append(_round(served, other, work / f"engine-{i}", args, i))
            log(
                f"  open {rounds[-1]['open_ms']:.0f} ms, switch p99 {rounds[-1]['bundle_switch_ms']:.1f} ms, "
                f"steady p99 {rounds[-1]['steady_p99_ms']:.1f} ms, failed {rounds[-1]['failed_requests_during_bundle_switch']}"
            )
        served.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(key: str) -> float:
        return common.median([r[key] for r in rounds if r[key] is not None])

    machine["loadavg_max_during_run"] = max(common.loadavg_seen(), default=None)
    result: dict[str, Any] = {
        "bundle_switch_ms": med("bundle_switch_ms"),
        "failed_requests_during_bundle_switch": sum(
            r["failed_requests_during_bundle_switch"] for r in rounds
        ),
        "steady_p99_ms": med("steady_p99_ms"),
        "switch_p99_ratio": med("switch_p99_ratio"),
        "requests_during_switch": med("requests_during_switch"),
        "open_ms": med("open_ms"),
        "switch_call_ms": med("switch_call_ms"),
        "failed_requests_total": sum(r["failed_requests_total"] for r in rounds),
        "bundle": str(a),
        "switches": args.switches,
        "clients": args.clients,
        "rate_per_client": args.rate,
        "after_s": args.after_s,
        "quick": args.quick,
        "rounds": rounds,
        "cpu_flags": machine["cpu_flags"],
        "machine": machine,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    common.pin_thread_env(THREADS)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.switches is None:
        args.switches = 2 if args.quick else 5
    if args.quick:
        args.pre_s, args.after_s = min(args.pre_s, 1.0), min(args.after_s, 1.0)
    result = run(args)
    keys = ["bundle_switch_ms", "steady_p99_ms", "switch_p99_ratio", "open_ms", "requests_during_switch"]
    rows = [[k, common.fmt_num(result[k], 1)] for k in keys]
    rows.append(["failed_requests_during_bundle_switch", result["failed_requests_during_bundle_switch"]])
    try:
        print(common.format_table(["metric", "median over switches"], rows), flush=True)
    finally:
        if args.json:
            common.print_json_line(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
