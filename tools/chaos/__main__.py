"""``python -m tools.chaos [--quick] [--only A,B] [--fuzz-messages N] [--soak-seconds S] [--json]``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tools.bench.common import format_table, json_line, machine_info
from tools.chaos.runner import run
from tools.chaos.scenarios import SCENARIOS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.chaos", description=__doc__)
    p.add_argument("--quick", action="store_true", help="the quick scenarios only (what make test runs)")
    p.add_argument("--only", help="comma list of scenarios: " + ", ".join(SCENARIOS))
    p.add_argument("--fuzz-messages", type=int, default=100_000, help="hostile MQTT messages (0: no fuzzing)")
    p.add_argument("--fuzz-examples", type=int, default=400, help="hypothesis examples per parser family")
    p.add_argument("--soak-seconds", type=float, default=600.0, help="mixed-load soak (0: none)")
    p.add_argument("--workdir", help="keep the stages here (default: a temp dir, removed when all passed)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(
        quick=args.quick,
        only=args.only.split(",") if args.only else None,
        fuzz_messages=args.fuzz_messages,
        fuzz_examples=args.fuzz_examples,
        soak_seconds=args.soak_seconds,
        workdir=Path(args.workdir) if args.workdir else None,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    result["machine"] = machine_info()
    rows = [
        (
            name,
            "pass" if r["passed"] else "FAIL",
            r["sent"],
            r["lost"],
            r["duplicates"],
            r["crashes"],
            r["seconds"],
        )
        for name, r in result["scenarios"].items()
    ]
    print(format_table(["scenario", "", "sent", "lost", "dup", "crash", "s"], rows), file=sys.stderr)
    for name, ok in result["targets_met"].items():
        print(f"{'met    ' if ok else 'MISSED '} {name}", file=sys.stderr)
    if args.json:
        print(json_line(result))
    return 0 if all(result["targets_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
