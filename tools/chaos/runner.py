"""Runs the scenarios, the fuzzing and the soak; one result dict with the issue's keys."""

from __future__ import annotations

import shutil
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tools.chaos.scenarios import SCENARIOS, Result
from tools.chaos.world import World

TARGETS = {
    "scenarios_passed == scenarios_total (>= 12)": lambda r: (
        r["scenarios_passed"] == r["scenarios_total"] >= 12
    ),
    "messages_lost == 0": lambda r: r["messages_lost"] == 0,
    "duplicates_applied == 0": lambda r: r["duplicates_applied"] == 0,
    "crashes == 0": lambda r: r["crashes"] == 0,
    "soak_rss_growth_pct <= 5": lambda r: r["soak_rss_growth_pct"] is None or r["soak_rss_growth_pct"] <= 5,
    "soak_p99_drift_pct <= 20": lambda r: r["soak_p99_drift_pct"] is None or r["soak_p99_drift_pct"] <= 20,
}


def tiny_bundle(root: Path) -> Path:
    """The tests' tiny random BERT as a bundle, built once per work directory."""
    out = root / "bundle"
    if not (out / "manifest.json").exists():
        from agent.build import build_bundle
        from tests.tiny import TINY_LABELS, make_tiny_bert

        build_bundle(out, model_path=make_tiny_bert(root / "hf-model"), labels=TINY_LABELS)
    return out


def run_scenario(name: str, root: Path, bundle: Path, log: Any = print) -> dict[str, Any]:
    sc = SCENARIOS[name]
    t0 = time.monotonic()
    world = World(root / name, bundle, broker_settings=sc.broker_settings, secure_boxes=sc.secure_boxes)
    result = Result()
    error = None
    try:
        result = sc.run(world)
    except Exception as e:  # noqa: BLE001 - a failed scenario is a result, not the end of the suite
        error = f"{type(e).__name__}: {e}"
        result.notes.append(traceback.format_exc(limit=6))
    crashes = world.crashes()
    result.crashes += len(crashes)
    result.notes += crashes
    world.close()
    passed = error is None and not crashes and all(result.checks.values()) and bool(result.checks)
    out = {
        **asdict(result),
        "passed": passed,
        "error": error,
        "seconds": round(time.monotonic() - t0, 1),
        "doc": sc.doc,
    }
    log(f"{'PASS' if passed else 'FAIL'} {name} ({out['seconds']}s) {error or ''}")
    for check, ok in result.checks.items():
        if not ok:
            log(f"     failed: {check}")
    return out


def run(
    *,
    quick: bool = False,
    only: list[str] | None = None,
    fuzz_messages: int = 100_000,
    fuzz_examples: int = 400,
    soak_seconds: float = 600.0,
    workdir: Path | None = None,
    log: Any = print,
) -> dict[str, Any]:
    # Short: sd_notify socket paths live in here and Unix socket paths stop at 108 bytes.
    root = Path(workdir or tempfile.mkdtemp(prefix="chaos-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    bundle = tiny_bundle(root)
    names = only or [n for n, s in SCENARIOS.items() if s.quick or not quick]
    scenarios = {n: run_scenario(n, root, bundle, log) for n in names}

    from tools.chaos import fuzz, soak

    fuzz_result: dict[str, Any] = {}
    if fuzz_messages:
        world = World(root / "fuzz", bundle)
        try:
            from tools.chaos.scenarios import fleet_box

            box = fleet_box(world)
            fuzz_result["mqtt"] = fuzz.fuzz_over_mqtt(world, box, fuzz_messages)
        except Exception as e:  # noqa: BLE001 - a failed fuzz run is a result
            fuzz_result["mqtt"] = {"messages": 0, "error": f"{type(e).__name__}: {e}"[:2000], "alive": False}
        finally:
            fuzz_result["mqtt"]["crashes"] = len(world.crashes())
            world.close()
        fuzz_result["in_process"] = fuzz.fuzz_in_process(fuzz_examples)
        m = fuzz_result["mqtt"]
        fuzz_ok = (
            "error" not in m
            and m["alive"]
            and m["config_unchanged"]
            and m["adapter_unchanged"]
            and m["round_unchanged"]
            and m["samples_stored"] == m["samples_expected"]
            and m["crashes"] == 0
        )
        log(f"{'PASS' if fuzz_ok else 'FAIL'} fuzz: {m}")
        fuzz_result["passed"] = fuzz_ok
    soak_result: dict[str, Any] | None = None
    if soak_seconds:
        world = World(root / "soak", bundle)
        try:
            soak_result = soak.soak(world, soak_seconds)
        except Exception as e:  # noqa: BLE001
            soak_result = {
                "error": f"{type(e).__name__}: {e}"[:2000],
                "rss_growth_pct": None,
                "p99_drift_pct": None,
            }
        finally:
            assert soak_result is not None
            soak_result["crashes"] = len(world.crashes())
            world.close()
        log(f"soak: { ({k: v for k, v in soak_result.items() if k != 'rss_series'}) }")

    results = list(scenarios.values())
    out: dict[str, Any] = {
        "scenarios_total": len(results),
        "scenarios_passed": sum(r["passed"] for r in results),
        "messages_sent": sum(r["sent"] for r in results) + (soak_result or {}).get("samples_sent", 0),
        "messages_lost": sum(r["lost"] for r in results) + (soak_result or {}).get("samples_lost", 0),
        "duplicates_applied": sum(r["duplicates"] for r in results)
        + (soak_result or {}).get("duplicates", 0),
        "fuzz_messages": (
            fuzz_result.get("mqtt", {}).get("messages", 0)
            + fuzz_result.get("in_process", {}).get("messages", 0)
        ),
        "fuzz_passed": fuzz_result.get("passed"),
        "crashes": sum(r["crashes"] for r in results)
        + fuzz_result.get("mqtt", {}).get("crashes", 0)
        + (soak_result or {}).get("crashes", 0),
        "soak_rss_growth_pct": (soak_result or {}).get("rss_growth_pct"),
        "soak_p99_drift_pct": (soak_result or {}).get("p99_drift_pct"),
        "scenarios": scenarios,
        "fuzz": fuzz_result,
        "soak": soak_result,
        "work_dir": str(root),
    }
    out["targets_met"] = {name: bool(check(out)) for name, check in TARGETS.items()}
    if quick:  # the subset: fewer than 12 scenarios by design
        out["targets_met"].pop("scenarios_passed == scenarios_total (>= 12)")
        out["targets_met"]["quick scenarios all passed"] = out["scenarios_passed"] == out["scenarios_total"]
    if fuzz_messages:
        out["targets_met"]["fuzz invariants hold"] = bool(fuzz_result.get("passed"))
    if soak_seconds:
        out["targets_met"]["soak ran to the end"] = soak_result is not None and "error" not in soak_result
    if all(r["passed"] for r in results) and out["targets_met"] and all(out["targets_met"].values()):
        shutil.rmtree(root, ignore_errors=True)
        out["work_dir"] = None
    return out
