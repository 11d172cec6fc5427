"""Helpers shared by the benchmarks: thread pinning, interleaved timing, statistics, tables, JSON, machine info.

Everything here is light (stdlib + numpy only when asked) so that each benchmark can import it before
torch or onnxruntime, and the unit tests run in milliseconds.

Timing method used by every benchmark: warm-up calls first, then ``runs`` rounds; in each round every
config runs once, in a seeded shuffled order, after an untimed settle pause. On a shared, noisy
machine a burst of load then hits all configs alike instead of whichever config happened to be
running, no config always runs right after the same neighbour, and the pause keeps one config's
spinning thread pool (ONNX Runtime spins ~40 ms after each run, torch's OpenMP a few ms) from
being billed to the next. The summary statistic is the median.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

DEFAULT_THREADS = 2
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
VERSION_PACKAGES = (
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnx",
    "tokenizers",
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "edge-agent",
)
CPU_FLAGS_OF_INTEREST = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_int8",
    "amx_bf16",
)


# ---- threads --------------------------------------------------------------------------------------
def pin_thread_env(threads: int = DEFAULT_THREADS, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set the BLAS/OpenMP thread variables (only those not already set); call before importing numpy/torch."""
    env = os.environ if environ is None else environ
    for var in THREAD_ENV_VARS:
        env.setdefault(var, str(threads))
    return {var: env[var] for var in THREAD_ENV_VARS}


def limit_threads(threads: int = DEFAULT_THREADS) -> None:
    """Limit torch (if imported or installed) and numpy's BLAS (via threadpoolctl, if installed)."""
    try:
        import torch

        torch.set_num_threads(threads)
        with contextlib.suppress(RuntimeError):  # only settable before any inter-op parallel work
            torch.set_num_interop_threads(1)
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    except ImportError:
        pass


# ---- statistics -----------------------------------------------------------------------------------
def median(values: Iterable[float]) -> float:
    """Median; NaN for an empty sequence (so a missing config shows up instead of raising)."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return math.nan
    mid = n // 2
    return float(xs[mid]) if n % 2 else (xs[mid - 1] + xs[mid]) / 2.0


def percentile(values: Iterable[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method), q in [0, 100]; NaN when empty."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside [0, 100]")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    p10: float
    p90: float
    min: float
    max: float

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: a relative noise figure; NaN when the median is 0 or missing."""
        return (self.p90 - self.p10) / self.median if self.median else math.nan


def summarize(values: Sequence[float]) -> Summary:
    return Summary(
        n=len(values),
        median=median(values),
        p10=percentile(values, 10),
        p90=percentile(values, 90),
        min=float(min(values)) if values else math.nan,
        max=float(max(values)) if values else math.nan,
    )


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN instead of an exception for a zero or NaN denominator."""
    if denominator is None or numerator is None or not denominator or math.isnan(denominator):
        return math.nan
    return numerator / denominator


# ---- timing ---------------------------------------------------------------------------------------
def round_orders(names: Sequence[str], rounds: int, seed: int | None = 0) -> list[list[str]]:
    """The config order of each round: a seeded shuffle per round, or plain rotation with ``seed=None``.

    Shuffling matters: with a fixed cyclic order every config always follows the same neighbour,
    and whatever that neighbour leaves behind (ORT thread pools spin ~40 ms after a run) always
    lands on the same config.
    """
    names = list(names)
    if seed is None:
        return [rotated(names, r) for r in range(rounds)]
    rng = random.Random(seed)
    orders = []
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        orders.append(order)
    return orders


def rotated(names: Sequence[str], shift: int) -> list[str]:
    """``names`` rotated left by ``shift`` (mod len)."""
    if not names:
        return []
    k = shift % len(names)
    return list(names[k:]) + list(names[:k])


def run_interleaved(
    configs: Mapping[str, Callable[[], object]],
    runs: int,
    warmup: int = 2,
    settle_s: float = 0.0,
    seed: int | None = 0,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Time each config ``runs`` times, interleaved per round, after ``warmup`` untimed rounds; ms per call.

    Every round runs each config once, in the order ``round_orders`` gives (seeded shuffle).
    ``settle_s`` is slept (untimed) before every call so that the previous config's spinning
    worker threads have parked and each call starts from a quiet process. Returns
    ``{name: [ms, ...]}`` in the order the samples were taken.
    """
    if runs < 1:
        raise ValueError("runs must be >= 1")
    names = list(configs)
    for order in round_orders(names, warmup, None):
        for name in order:
            configs[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r, order in enumerate(round_orders(names, runs, seed)):
        for name in order:
            fn = configs[name]
            if settle_s > 0:
                sleep(settle_s)
            t0 = clock()
            fn()
            samples[name].append((clock() - t0) * 1000.0)
        if on_round is not None:
            on_round(r)
    return samples


def time_calls(
    fn: Callable[[], object], runs: int, warmup: int = 1, clock: Callable[[], float] = time.perf_counter
) -> list[float]:
    """Milliseconds of ``runs`` calls of ``fn`` after ``warmup`` untimed ones."""
    return run_interleaved({"fn": fn}, runs, warmup, clock=clock)["fn"]


# ---- analytic FLOPs -------------------------------------------------------------------------------
def encoder_flops(batch: int, seq: int, hidden: int, intermediate: int, layers: int) -> float:
    """Forward FLOPs of a BERT encoder (multiply-add = 2 FLOPs), linears + attention matmuls only.

    Per token per layer: Q/K/V/output projections 4·H² and the FFN 2·H·I multiply-adds, plus
    attention scores and context 2·S·H multiply-adds. Embeddings, softmax, LayerNorm, GELU,
    pooler, head and LoRA (r·3H per token per layer, < 1%) are left out.
    """
    per_token_layer = 2.0 * (4 * hidden * hidden + 2 * hidden * intermediate) + 2.0 * 2 * seq * hidden
    return per_token_layer * layers * batch * seq


def gflops_per_s(flops: float, ms: float) -> float:
    return ratio(flops, ms * 1e6)


def gemm_peak_gflops(n: int = 2048, runs: int = 7, use_torch: bool = True) -> dict[str, float]:
    """Best-case fp32 GEMM throughput (GFLOP/s) of numpy's BLAS and torch, median of ``runs`` n³ products.

    Uses whatever thread limits are in force (see ``limit_threads``). Keys: ``numpy``, ``torch``
    (if importable), ``max``.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    flops = 2.0 * n**3
    result = {"numpy": gflops_per_s(flops, median(time_calls(lambda: np.matmul(a, b, out=out), runs)))}
    if use_torch:
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None:
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            tout = torch.empty((n, n), dtype=torch.float32)
            with torch.inference_mode():
                result["torch"] = gflops_per_s(
                    flops, median(time_calls(lambda: torch.mm(ta, tb, out=tout), runs))
                )
    result["max"] = max(v for v in result.values() if not math.isnan(v))
    return result


def ort_int8_gemm_peak_gops(n: int = 2048, runs: int = 7, threads: int = DEFAULT_THREADS) -> float:
    """u8 x s8 -> s32 GEMM throughput (GOP/s) of ONNX Runtime's CPU kernels (MatMulInteger), median of ``runs``.

    The machine limit for an INT8 model: on CPUs with VNNI it is well above the fp32 GEMM peak.
    """
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.integers(-128, 128, (n, n), dtype=np.int8), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "W"], ["Y"])],
        "int8_gemm",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {"A": rng.integers(0, 256, (n, n), dtype=np.uint8)}
    return gflops_per_s(2.0 * n**3, median(time_calls(lambda: sess.run(None, feeds), runs)))


# ---- output ---------------------------------------------------------------------------------------
def ensure_bundle(bundle: Path) -> Path:
    """The benchmarks' bundle: built (offline, default model) when missing; a stale one is named."""
    from agent.bundle import MANIFEST, load_manifest

    if not (bundle / MANIFEST).is_file():
        from agent.build import build_bundle

        log(f"bundle {bundle} missing: building it")
        build_bundle(bundle)
    elif "lora.0.intermediate.A" not in load_manifest(bundle).lora.graph_inputs:
        log(
            f"bundle {bundle} was built before the dense LoRA branches (query/value only): it measures the "
            f"old graph; `edge-agent model build --out {bundle}` rebuilds it"
        )
    return bundle


def bundle_for_labels(bundle: Path, labels: Iterable[str], work: Path) -> tuple[Path, bool]:
    """``bundle`` (via ``ensure_bundle``) when it knows every label, else one built for ``sorted(labels)``
    in ``work`` (fp32 only); and whether it was built."""
    from agent.bundle import load_manifest

    bundle = ensure_bundle(Path(bundle))
    wanted = sorted(set(labels))
    known = set(load_manifest(bundle).labels)
    if set(wanted) <= known:
        return bundle, False
    from agent.build import build_bundle

    out = Path(work) / "bundle"
    log(
        f"labels {sorted(set(wanted) - known)[:5]} not in {bundle}: building a bundle for {len(wanted)} labels"
    )
    build_bundle(out, labels=wanted, precisions=("fp32",))
    return out, True


def jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays to Python, NaN/Inf to None, tuples/sets to lists, keys to str."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str | int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):  # numpy scalar or array
        return jsonable(obj.tolist())
    if hasattr(obj, "__dataclass_fields__"):
        return jsonable({k: getattr(obj, k) for k in obj.__dataclass_fields__})
    return str(obj)


def json_line(obj: Any) -> str:
    """One line of strict JSON (no NaN), for the machine-readable last line of a benchmark."""
    return json.dumps(jsonable(obj), separators=(",", ":"), allow_nan=False)


def print_json_line(obj: Any, file: Any = None) -> None:
    out = file or sys.stdout
    out.write(json_line(obj) + "\n")
    out.flush()


def fmt_num(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A Markdown-style table; ``align`` is one char per column, 'l' or 'r' (default: first l, rest r)."""
    align = align or ("l" + "r" * (len(headers) - 1))
    if len(align) != len(headers):
        raise ValueError("align needs one character per column")
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row {row} has {len(row)} cells, expected {len(headers)}")
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align, strict=True)]
        return "| " + " | ".join(parts) + " |"

    sep = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, align, strict=True)
        )
        + "|"
    )
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


_LOAD_SEEN: list[float] = []


def loadavg_seen() -> list[float]:
    """1-minute load averages sampled at every ``log`` call so far (to flag a contended run)."""
    return list(_LOAD_SEEN)


def log(msg: str) -> None:
    """Progress to stderr, so stdout keeps only the table and the final JSON line; samples the load."""
    try:
        one = os.getloadavg()[0]
        _LOAD_SEEN.append(one)
        load = f" load {one:.2f}"
    except OSError:
        load = ""
    print(f"[bench {time.strftime('%H:%M:%S')}{load}] {msg}", file=sys.stderr, flush=True)


# ---- machine --------------------------------------------------------------------------------------
def _cpuinfo(text: str | None = None) -> tuple[str, list[str]]:
    if text is None:
        try:
            with open("/proc/cpuinfo") as f:
                text = f.read()
        except OSError:
            return platform.processor() or platform.machine(), []
    model, flags = "", []
    for raw in text.splitlines():
        key, _, value = raw.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = value.split()
    return model or platform.processor() or platform.machine(), flags


def package_versions(packages: Iterable[str] = VERSION_PACKAGES) -> dict[str, str]:
    out = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def machine_info(threads: int = DEFAULT_THREADS, cpuinfo_text: str | None = None) -> dict[str, Any]:
    """CPU model, cores, relevant ISA flags, memory, load and library versions (imports nothing heavy)."""
    model, flags = _cpuinfo(cpuinfo_text)
    physical = None
    mem_gib = None
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        mem_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "cpu_flags": [f for f in CPU_FLAGS_OF_INTEREST if f in flags],
        "memory_gib": mem_gib,
        "threads": threads,
        "loadavg_at_start": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": package_versions(),
    }


def targets_table(targets: dict[str, dict[str, Any]]) -> str:
    """The benchmarks' closing table: metric, value, target, met."""
    rows = [
        [
            k,
            fmt_num(v["value"], 3) if isinstance(v["value"], float) else v["value"],
            v["target"],
            {True: "yes", False: "NO", None: "-"}[v["met"]],
        ]
        for k, v in targets.items()
    ]
    return format_table(["metric", "value", "target", "met"], rows, align="lrll")
