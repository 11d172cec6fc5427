"""``python -m tools.bench NAME [options]``: run the benchmark module ``tools.bench.NAME`` (its ``main(argv)``)."""

from __future__ import annotations

import importlib
import importlib.util
import sys

BENCHMARKS = {
    "inference": "the engine vs torch: kernels, stream, agreement, adapter swap",
    "ingest": "MQTT sample ingest into the store",
    "learning": "on-box LoRA training rounds",
    "fleet": "federated LoRA over non-IID sites vs local-only and centralized",
    "bundle": "request latency and failures across a base-model (bundle) switch",
    "ner": "entity extraction: the engine vs the HF token-classification pipeline, span agreement",
}


def _available() -> dict[str, str]:
    return {
        name: doc
        for name, doc in BENCHMARKS.items()
        if importlib.util.find_spec(f"tools.bench.{name}") is not None
    }


def _usage(out) -> None:
    print("usage: python -m tools.bench NAME [options]   (NAME --help for its options)", file=out)
    for name, doc in _available().items():
        print(f"  {name:<10} {doc}", file=out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _usage(sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS or name not in _available():
        print(f"unknown or unavailable benchmark {name!r}", file=sys.stderr)
        _usage(sys.stderr)
        return 2
    # Thread variables must be set before numpy/torch load their thread pools.
    from tools.bench.common import DEFAULT_THREADS, pin_thread_env

    pin_thread_env(DEFAULT_THREADS)
    module = importlib.import_module(f"tools.bench.{name}")
    rc = module.main(rest)
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
