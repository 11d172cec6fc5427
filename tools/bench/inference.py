"""``python -m tools.bench inference``: the engine against torch, side by side in one process, on CPU.

What runs (all on CPU, 2 threads everywhere: torch.set_num_threads(2), ORT intra_op 2 / inter_op 1,
BLAS/OpenMP env vars 2):

1. a LoRA adapter is trained with ``agent.learner.train.train_adapter`` on ``labeled_dataset`` texts
   into a temp dir (a copy with another version in ``edge_adapter.json`` is the swap partner);
2. kernel cases 1x64, 1x128, 32x64, 32x128 (batch x tokens, full length, random word pieces >= 1996
   between [CLS]/[SEP], fixed seed), configs interleaved per round in a seeded shuffled order with a
   60 ms untimed settle pause before each call (``common.run_interleaved``): torch fp32 eager
   (``load_base_model``: eager attention), the same with sdpa attention (for reference), torch+peft (unmerged), ORT fp32 / INT8 without adapter, ORT fp32 / INT8 with
   the adapter (same sessions, adapter via RunOptions), and the engine itself
   (``InferenceEngine.open(..., adapter_dir=..., calibration_texts=...)``, 256 held-out plant texts as
   the daemon passes them; the benchmark waits for the engine's background merge, so
   ``engine.run_padded`` is the merged session: the adapter folded into the weights, at the
   precision the engine picks); ``merged_speedup_b1s128`` = the LoRA path (``ORT <precision> +
   adapter``) / the engine, ``lora_overhead_b1s128`` = the engine / ``ORT <precision>`` without adapter;
3. argmax agreement of the engine vs torch+peft fp32 on realistic texts (same token ids, padded per batch);
4. stream: ``stream_texts`` through the whole engine (requests of 1-8 texts, all submitted at once
   then awaited, as a burst from a device would queue up: tokenize, micro-batching, length bucketing,
   run, top-k, prediction cache) against ``transformers.pipeline("text-classification")`` on the
   merged torch model (sdpa attention) with batch_size=32 (per-batch padding, checked with a forward hook);
   the engine's per-stage time (``engine.stats()["stage_ms"]``: collect, lookup, tokenize, pad, run,
   post, reply) per stream pass, and the rest of the wall time (client submit/await, Python);
5. machine limit: fp32 GEMM GFLOP/s (numpy and torch, best of start and end) and the engine's achieved
   GFLOP/s at 32x128 from the analytic encoder FLOP count;
6. adapter swap latency while client threads keep calling ``engine.predict`` (cache off, so every
   request really runs; 0-50 ms random pause between swaps), the number of failed requests (exceptions,
   timeouts, or a response mixing adapter versions), and the same swaps on the idle engine;
7. merge switch under load: the same clients while adapters are activated in turn and the engine
   builds, checks and swaps in each merged session (``merge_build_s``: the median build, activation
   to merged serving), ``failed_requests_during_merge_switch`` and the clients' p99 during builds.

Output: a table on stdout; with ``--json`` the last stdout line is one JSON object (keys are a contract).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tools.bench import common
from tools.bench.common import log

DEFAULT_BUNDLE = Path("build/bundle-minilm")
THREADS = common.DEFAULT_THREADS
CASES = ((1, 64), (1, 128), (32, 64), (32, 128))
FIRST_WORDPIECE = 1996  # ids below are [unused]/special/punctuation/single characters in the BERT vocab

TORCH = "torch_fp32_eager"
SDPA = "torch_fp32_sdpa"
PEFT = "torch_peft"
ENGINE = "engine_adapter"
STAGE_KEYS = ("collect", "lookup", "tokenize", "pad", "run", "post", "reply")
CONFIG_LABELS = {
    TORCH: "torch fp32 eager",
    SDPA: "torch fp32, sdpa attention",
    PEFT: "torch + peft (unmerged)",
    "ort_fp32": "ORT fp32 (no adapter)",
    "ort_int8": "ORT INT8 (no adapter)",
    "ort_fp32_adapter": "ORT fp32 + adapter",
    "ort_int8_adapter": "ORT INT8 + adapter",
    ENGINE: "engine + adapter ({precision}, {path}, run_padded)",
}
TARGETS = {  # metric -> (comparison, threshold), from the issue
    "speedup_vs_torch_b1s128": (">=", 2.0),
    "speedup_vs_torch_b32s128": (">=", 1.5),
    "stream_speedup_vs_hf_pipeline": (">=", 5.0),
    "lora_overhead_b1s128": ("<=", 1.02),
    "fraction_of_gemm_peak_b32s128": (">=", 0.6),
    "argmax_agreement_vs_torch_peft": (">=", 0.99),
    "swap_p99_ms": ("<=", 20.0),
    "failed_requests_during_swap": ("<=", 0),
    "failed_requests_during_merge_switch": ("<=", 0),
}


@dataclass(frozen=True)
class Plan:
    runs: int
    warmup: int
    train_texts: int
    epochs: int
    train_budget_s: float
    stream_texts: int
    engine_stream_repeats: int
    hf_stream_repeats: int
    agreement_texts: int
    swaps: int
    swap_clients: int
    swap_gap_max_s: float
    merge_rounds: int
    calibration_texts: int
    settle_s: float
    gemm_n: int
    gemm_runs: int
    profile: bool
    is_quick: bool = False

    @classmethod
    def full(cls, runs: int) -> Plan:
        return cls(
            runs=runs,
            warmup=2,
            train_texts=1500,
            epochs=4,
            train_budget_s=900.0,  # a safety cap: the adapter is the same however busy the machine is
            stream_texts=5000,
            engine_stream_repeats=3,
            hf_stream_repeats=2,
            agreement_texts=1024,
            swaps=100,
            swap_clients=4,
            swap_gap_max_s=0.05,
            merge_rounds=4,
            calibration_texts=256,
            settle_s=0.06,
            gemm_n=2048,
            gemm_runs=7,
            profile=True,
        )

    @classmethod
    def quick(cls, runs: int) -> Plan:
        return cls(
            runs=runs,
            warmup=1,
            train_texts=128,
            epochs=1,
            train_budget_s=30.0,
            stream_texts=300,
            engine_stream_repeats=1,
            hf_stream_repeats=1,
            agreement_texts=64,
            swaps=10,
            swap_clients=2,
            swap_gap_max_s=0.05,
            merge_rounds=2,
            calibration_texts=64,
            settle_s=0.06,
            gemm_n=1024,
            gemm_runs=3,
            profile=False,
            is_quick=True,
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench inference", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="model bundle (built if missing)")
    p.add_argument(
        "--runs", type=int, default=None, help="timed rounds per kernel case (default 30; 3 with --quick)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: few runs, small training set and stream")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ORT per-op profile of the engine's config at 32x128 (default: on, off with --quick)",
    )
    return p


# ---- set-up -----------------------------------------------------------------------------------------
def _train_adapters(bundle: Path, work: Path, plan: Plan, seed: int) -> tuple[Path, Path, dict[str, Any]]:
    from agent.adapters import META
    from agent.learner.train import TrainConfig, train_adapter
    from tools.simulate import labeled_dataset

    records = labeled_dataset(plan.train_texts, seed=seed)
    a1 = work / "adapter-a1"
    cfg = TrainConfig(
        epochs=plan.epochs,
        lr=1e-3,
        batch_size=16,
        seed=seed,
        threads=THREADS,
        time_budget_s=plan.train_budget_s,
    )
    log(f"training adapter on {len(records)} texts, {plan.epochs} epochs (budget {plan.train_budget_s:.0f}s)")
    res = train_adapter(bundle, [r.text for r in records], [r.label for r in records], a1, "bench-a1", cfg)
    log(f"trained: {res.steps} steps in {res.seconds:.1f}s, final loss {res.final_loss:.4f}")
    # The swap partner: same weights, another version, so every swap is a full convert + load.
    a2 = work / "adapter-a2"
    shutil.copytree(a1, a2)
    meta = json.loads((a2 / META).read_text())
    meta["version"] = "bench-a2"
    (a2 / META).write_text(json.dumps(meta, indent=2))
    info = {
        "texts": len(records),
        "epochs": plan.epochs,
        "steps": res.steps,
        "seconds": round(res.seconds, 1),
        "final_loss": res.final_loss,
    }
    return a1, a2, info


def _session_options():
    # The engine's own settings, with the thread count pinned for the side-by-side runs.
    from agent.engine import EngineConfig, _session_options

    return _session_options(EngineConfig(intra_op_threads=THREADS))


def _adapter_run_options(adapter_dir: Path, manifest, work: Path, name: str):
    import onnxruntime as ort

    from agent.adapters import read_adapter, write_ort_adapter

    path = write_ort_adapter(read_adapter(adapter_dir, manifest), work / f"{name}.onnx_adapter")
    handle = ort.LoraAdapter()
    handle.Load(str(path))
    ro = ort.RunOptions()
    ro.add_active_adapter(handle)
    return ro, handle


def kernel_inputs(batch: int, seq: int, vocab_size: int, cls_id: int, sep_id: int, seed: int):
    """Full-length rows: [CLS] + random real word pieces (ids >= 1996) + [SEP], all-ones mask."""
    import numpy as np

    rng = np.random.default_rng([seed, batch, seq])
    ids = rng.integers(FIRST_WORDPIECE, vocab_size, size=(batch, seq), dtype=np.int64)
    ids[:, 0] = cls_id
    ids[:, -1] = sep_id
    return ids, np.ones((batch, seq), dtype=np.int64)


# ---- measurements -----------------------------------------------------------------------------------
def _case_configs(models: dict[str, Any], ids, mask) -> dict[str, Any]:
    """One callable per config for one input; the order here is the table's row order."""
    import torch

    base, peft, engine = models["base"], models["peft"], models["engine"]
    feeds = {"input_ids": ids, "attention_mask": mask}
    tids, tmask = torch.from_numpy(ids), torch.from_numpy(mask)
    configs = {
        TORCH: lambda: base(input_ids=tids, attention_mask=tmask).logits,
        SDPA: lambda: models["sdpa"](input_ids=tids, attention_mask=tmask).logits,
        PEFT: lambda: peft(input_ids=tids, attention_mask=tmask).logits,
    }
    for p, sess in models["sessions"].items():
        configs[f"ort_{p}"] = lambda s=sess: s.run(["logits"], feeds)
        configs[f"ort_{p}_adapter"] = lambda s=sess, r=models["run_options"][p]: s.run(["logits"], feeds, r)
    configs[ENGINE] = lambda: engine.run_padded(ids, mask)
    return configs


def _kernel_cases(models: dict[str, Any], plan: Plan, seed: int) -> tuple[dict, dict]:
    import torch

    medians: dict[str, dict[str, float]] = {}
    spreads: dict[str, dict[str, float]] = {}
    for batch, seq in CASES:
        case = f"b{batch}s{seq}"
        ids, mask = kernel_inputs(batch, seq, models["vocab_size"], models["cls_id"], models["sep_id"], seed)
        configs = _case_configs(models, ids, mask)
        t0 = time.perf_counter()
        warmup = plan.warmup + (1 if batch == 1 else 0)
        with torch.inference_mode():
            samples = common.run_interleaved(
                configs, plan.runs, warmup=warmup, settle_s=plan.settle_s, seed=seed
            )
        medians[case] = {name: common.median(v) for name, v in samples.items()}
        spreads[case] = {name: round(common.summarize(v).spread, 3) for name, v in samples.items()}
        log(
            f"case {case}: {time.perf_counter() - t0:.0f}s, "
            + ", ".join(f"{k} {v:.1f}" for k, v in medians[case].items())
        )
    return medians, spreads


def _agreement(models: dict[str, Any], plan: Plan, seed: int) -> dict[str, Any]:
    """Engine (adapter, picked precision) vs torch+peft fp32: argmax on the same ids, padded per batch of 32."""
    import numpy as np
    import torch

    from tools.simulate import labeled_dataset

    engine, peft = models["engine"], models["peft"]
    records = labeled_dataset(plan.agreement_texts, seed=seed + 101)  # training used `seed`
    labels = engine.labels
    truth = np.array([labels.index(r.label) for r in records])
    eng, ref, margins, by_p = [], [], [], {p: [] for p in models["sessions"]}
    max_diff = 0.0
    with torch.inference_mode():
        for start in range(0, len(records), 32):
            ids, mask = engine.tokenize([r.text for r in records[start : start + 32]])
            e = engine.run_padded(ids, mask)
            t = peft(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
            eng.append(e.argmax(1))
            ref.append(t.argmax(1))
            probs = np.exp(t - t.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            top2 = np.sort(probs, 1)[:, -2:]
            margins.append(top2[:, 1] - top2[:, 0])
            max_diff = max(max_diff, float(np.abs(e - t).max()))
            for p, sess in models["sessions"].items():
                by_p[p].append(
                    sess.run(
                        ["logits"], {"input_ids": ids, "attention_mask": mask}, models["run_options"][p]
                    )[0].argmax(1)
                )
    eng_a, ref_a, margin = np.concatenate(eng), np.concatenate(ref), np.concatenate(margins)
    flipped = eng_a != ref_a
    return {
        "texts": len(records),
        "agreement": float((eng_a == ref_a).mean()),
        "agreement_by_precision": {p: float((np.concatenate(v) == ref_a).mean()) for p, v in by_p.items()},
        "max_abs_logit_diff": max_diff,
        "disagreements": int(flipped.sum()),
        "torch_top1_top2_prob_margin_median": float(np.median(margin)),
        "torch_margin_median_where_disagree": float(np.median(margin[flipped])) if flipped.any() else None,
        "torch_margin_max_where_disagree": float(margin[flipped].max()) if flipped.any() else None,
        "accuracy_engine": float((eng_a == truth).mean()),
        "accuracy_torch_peft": float((ref_a == truth).mean()),
    }


def _stream(models: dict[str, Any], bundle: Path, adapter: Path, plan: Plan, seed: int) -> dict[str, Any]:
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, pipeline

    from agent.learner.model import load_base_model
    from tools.simulate import stream_texts

    engine = models["engine"]
    texts = stream_texts(plan.stream_texts, seed=seed + 202)
    rng = np.random.default_rng(seed + 303)
    requests, i = [], 0
    while i < len(texts):
        n = int(rng.integers(1, 9))
        requests.append(texts[i : i + n])
        i += n
    warm = stream_texts(64, seed=seed + 404)
    cfg = engine.config

    def clear_cache() -> None:
        engine.apply_config(replace(cfg, cache_size=0))  # shrinking below the entry count clears it
        engine.apply_config(cfg)

    stage_runs: list[dict[str, float]] = []

    def engine_run(cache: bool = True) -> tuple[float, list]:
        clear_cache()
        if not cache:
            engine.apply_config(replace(cfg, cache_size=0))
        try:
            before = engine.stats()
            t0 = time.perf_counter()
            futures = [engine.submit(r) for r in requests]
            out = [p for f in futures for p in f.result(timeout=900)]
            dt = time.perf_counter() - t0
            stage_runs.append({**_stage_delta(before, engine.stats(), dt * 1000.0), "cache": cache})
            return dt, out
        finally:
            engine.apply_config(cfg)

    tok = AutoTokenizer.from_pretrained(bundle / "tokenizer")
    # The baseline a team would serve: adapter merged into the weights, transformers' default sdpa attention.
    merged = PeftModel.from_pretrained(load_base_model(bundle), str(adapter)).merge_and_unload().eval()
    merged.set_attn_implementation("sdpa")
    shapes: list[tuple[int, int]] = []
    merged.register_forward_pre_hook(
        lambda _m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    pipe = pipeline("text-classification", model=merged, tokenizer=tok, device=-1, top_k=3)

    def hf_run() -> tuple[float, list]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = pipe(texts, batch_size=32, truncation=True, max_length=engine.manifest.max_length)
        return time.perf_counter() - t0, out

    engine.predict(warm)
    with torch.inference_mode():
        pipe(warm, batch_size=32, truncation=True)
    before = dict(engine.stats())
    eng_times, hf_times = [], []
    eng_out: list = []
    hf_out: list = []
    for r in range(max(plan.engine_stream_repeats, plan.hf_stream_repeats)):
        if r < plan.engine_stream_repeats:
            dt, eng_out = engine_run()
            eng_times.append(dt)
            log(f"stream engine: {len(texts) / dt:.0f} texts/s")
        if r < plan.hf_stream_repeats:
            shapes.clear()
            dt, hf_out = hf_run()
            hf_times.append(dt)
            log(f"stream HF pipeline: {len(texts) / dt:.0f} texts/s")
    after = engine.stats()
    nocache_dt, _ = engine_run(cache=False)
    log(f"stream engine without cache: {len(texts) / nocache_dt:.0f} texts/s")
    eng_tps = len(texts) / common.median(eng_times)
    hf_tps = len(texts) / common.median(hf_times)
    hits = after["cache_hits"] - before["cache_hits"]
    looked = after["texts"] - before["texts"]
    cached_runs = [r for r in stage_runs if r["cache"]]
    stages = {k: common.median(r[k] for r in cached_runs) for k in cached_runs[0] if k != "cache"}
    nocache_stages = next(r for r in stage_runs if not r["cache"])
    eng_labels = [p.label for p in eng_out]
    _, token_mask = engine.tokenize(texts)
    hf_labels = [o[0]["label"] for o in hf_out]
    return {
        "texts": len(texts),
        "unique_texts": len(set(texts)),
        "requests": len(requests),
        "mode": "requests of 1-8 texts, all submitted with engine.submit then awaited (burst)",
        "engine_seconds": [round(t, 3) for t in eng_times],
        "hf_seconds": [round(t, 3) for t in hf_times],
        "stream_texts_per_s": eng_tps,
        "hf_pipeline_texts_per_s": hf_tps,
        "stream_speedup_vs_hf_pipeline": common.ratio(eng_tps, hf_tps),
        "engine_texts_per_s_no_cache": len(texts) / nocache_dt,
        "speedup_no_cache_vs_hf_pipeline": common.ratio(len(texts) / nocache_dt, hf_tps),
        "engine_cache_hit_rate": common.ratio(hits, looked),
        "mean_tokens_per_text": float(token_mask.sum(1).mean()),
        "hf_batches": len(shapes),
        "hf_mean_padded_len": float(np.mean([s[1] for s in shapes])) if shapes else math.nan,
        "hf_max_padded_len": max((s[1] for s in shapes), default=0),
        "top1_agreement_engine_vs_hf": float(
            np.mean([a == b for a, b in zip(eng_labels, hf_labels, strict=True)])
        ),
        # Where the engine's time goes in one pass (medians over the cached passes): the batcher's
        # stages, and "other" = wall - the stages (client submit/await, GIL hand-offs).
        "stages_ms": {k: round(v, 2) for k, v in stages.items()},
        "stages_ms_no_cache": {k: round(v, 2) for k, v in nocache_stages.items() if k != "cache"},
        "stage_us_per_text": {
            k: round(1000.0 * stages[k] / len(texts), 2) for k in (*STAGE_KEYS, "other", "wall")
        },
        "serving_path": engine.serving_path,
    }


def _stage_delta(before: dict[str, Any], after: dict[str, Any], wall_ms: float) -> dict[str, float]:
    """Engine stage milliseconds between two ``stats()``, "other" (wall - stages) and the counters."""
    out = {k: after["stage_ms"][k] - before["stage_ms"][k] for k in after["stage_ms"]}
    out["other"] = wall_ms - sum(out.values())
    out["wall"] = wall_ms
    for k in ("runs", "real_tokens", "padded_tokens", "cache_hits", "duplicates_in_batch"):
        out[k] = after[k] - before[k]
    return out


def _swap(models: dict[str, Any], a1: Path, a2: Path, plan: Plan, seed: int) -> dict[str, Any]:
    import numpy as np

    from tools.simulate import stream_texts

    engine = models["engine"]
    texts = stream_texts(2000, seed=seed + 505)
    cfg = engine.config
    engine.apply_config(replace(cfg, cache_size=0))  # every request really runs during the swaps
    stop = threading.Event()
    lock = threading.Lock()
    counts = {"ok": 0, "errors": 0, "mixed": 0}
    error_kinds: list[str] = []

    def client(k: int) -> None:
        rng = np.random.default_rng([seed, k])
        while not stop.is_set():
            i = int(rng.integers(0, len(texts) - 8))
            batch = texts[i : i + int(rng.integers(1, 9))]
            try:
                preds = engine.predict(batch, timeout=30)
                mixed = len({p.adapter_version for p in preds}) != 1 or len(preds) != len(batch)
                with lock:
                    counts["mixed" if mixed else "ok"] += 1
            except Exception as e:  # noqa: BLE001 - every failure is what this measures
                with lock:
                    counts["errors"] += 1
                    error_kinds.append(type(e).__name__)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(plan.swap_clients)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    lat = []
    gaps = np.random.default_rng(seed + 606).uniform(0.0, plan.swap_gap_max_s, plan.swaps)
    try:
        with lock:
            start_counts = dict(counts)
        for i in range(plan.swaps):
            t0 = time.perf_counter()
            engine.activate_adapter(a2 if i % 2 == 0 else a1)
            lat.append((time.perf_counter() - t0) * 1000.0)
            time.sleep(gaps[i])  # swaps land at random points of the batches in flight
        with lock:
            during = {k: counts[k] - start_counts[k] for k in counts}
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        engine.apply_config(cfg)
    # The same swaps on an idle engine: what the swap itself costs, without contention.
    idle = []
    for i in range(min(plan.swaps, 20)):
        t0 = time.perf_counter()
        engine.activate_adapter(a2 if i % 2 == 0 else a1)
        idle.append((time.perf_counter() - t0) * 1000.0)
    if engine.adapter_version != "bench-a1":
        engine.activate_adapter(a1)
    return {
        "swaps": len(lat),
        "clients": plan.swap_clients,
        "client_request_texts": "1-8 stream texts, cache off",
        "gap_between_swaps_ms": f"uniform 0-{plan.swap_gap_max_s * 1000:.0f}",
        "idle_swap_p50_ms": common.percentile(idle, 50),
        "idle_swap_p99_ms": common.percentile(idle, 99),
        "swap_p50_ms": common.percentile(lat, 50),
        "swap_p99_ms": common.percentile(lat, 99),
        "swap_max_ms": max(lat),
        "requests_completed_during_swaps": during["ok"] + during["mixed"],
        "failed_requests_during_swap": during["errors"] + during["mixed"],
        "failed_breakdown": {"exceptions": during["errors"], "mixed_adapter_versions": during["mixed"]},
        "error_types": sorted(set(error_kinds)),
    }


def _merge_switch(models: dict[str, Any], a1: Path, a2: Path, plan: Plan, seed: int) -> dict[str, Any]:
    """Adapters activated in turn while clients keep calling: each activation serves at once
    through the LoRA inputs, the engine builds, checks and swaps in the merged session."""
    import numpy as np

    from tools.simulate import stream_texts

    engine = models["engine"]
    texts = stream_texts(2000, seed=seed + 707)
    cfg = engine.config
    engine.apply_config(replace(cfg, cache_size=0))
    stop = threading.Event()
    lock = threading.Lock()
    counts = {"ok": 0, "errors": 0, "mixed": 0}
    samples: list[tuple[float, float, str]] = []  # (start, ms, serving path at the end)

    def client(k: int) -> None:
        rng = np.random.default_rng([seed, 77, k])
        while not stop.is_set():
            i = int(rng.integers(0, len(texts) - 8))
            batch = texts[i : i + int(rng.integers(1, 9))]
            t0 = time.perf_counter()
            try:
                preds = engine.predict(batch, timeout=30)
                ms = (time.perf_counter() - t0) * 1000.0
                mixed = len({p.adapter_version for p in preds}) != 1 or len(preds) != len(batch)
                with lock:
                    counts["mixed" if mixed else "ok"] += 1
                    samples.append((t0, ms, engine.serving_path))
            except Exception:  # noqa: BLE001 - every failure is what this measures
                with lock:
                    counts["errors"] += 1
            time.sleep(float(rng.uniform(0.0, 0.01)))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(plan.swap_clients)]
    rounds = []
    windows: list[tuple[float, float]] = []
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        quiet_until = time.perf_counter()
        for r in range(plan.merge_rounds):
            adapter = a2 if r % 2 == 0 else a1
            t0 = time.perf_counter()
            engine.activate_adapter(adapter)
            state = engine.wait_merged(300)
            t1 = time.perf_counter()
            windows.append((t0, t1))
            rounds.append(
                {
                    "version": state.get("version"),
                    "state": state.get("state"),
                    "activation_to_merged_s": round(t1 - t0, 3),
                    "build_s": state.get("build_s"),
                    "verify": state.get("verify"),
                }
            )
            log(f"merge {r}: {state.get('version')} {state.get('state')} in {t1 - t0:.2f}s")
            time.sleep(1.0)
        end = time.perf_counter()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        engine.apply_config(cfg)
    if engine.adapter_version != "bench-a1":
        engine.activate_adapter(a1)
        engine.wait_merged(300)
    in_build = [ms for t, ms, _ in samples if any(a <= t < b for a, b in windows)]
    outside = [ms for t, ms, _ in samples if t < quiet_until or (t >= end)]
    outside += [
        ms for t, ms, _ in samples if quiet_until <= t < end and not any(a <= t < b for a, b in windows)
    ]
    return {
        "rounds": rounds,
        "clients": plan.swap_clients,
        "merge_build_s": common.median(r["build_s"] for r in rounds if r["build_s"] is not None),
        "activation_to_merged_s": common.median(r["activation_to_merged_s"] for r in rounds),
        "all_merged": all(r["state"] == "serving" for r in rounds),
        "requests_completed": counts["ok"] + counts["mixed"],
        "requests_on_merged_path": sum(1 for _, _, path in samples if path == "merged"),
        "failed_requests_during_merge_switch": counts["errors"] + counts["mixed"],
        "failed_breakdown": {"exceptions": counts["errors"], "mixed_adapter_versions": counts["mixed"]},
        "client_p50_ms_during_builds": common.percentile(in_build, 50),
        "client_p99_ms_during_builds": common.percentile(in_build, 99),
        "client_p50_ms_otherwise": common.percentile(outside, 50),
        "client_p99_ms_otherwise": common.percentile(outside, 99),
    }


def _profile(models: dict[str, Any], bundle: Path, seed: int, runs: int = 5) -> dict[str, Any]:
    """ORT per-op profile of the model the engine serves (merged, or the bundle's + adapter) at 32x128
    and at a stream-shaped run (96 texts of 20 tokens): top ops by total time, and the achieved
    GFLOP/s of the projections (INT8 or fp32 MatMuls) and of the whole run."""
    import onnxruntime as ort

    engine = models["engine"]
    merged = engine.serving_path == "merged"
    path = engine.serving_model_file
    so = _session_options()
    so.enable_profiling = True
    so.profile_file_prefix = str(models["work"] / "ort-profile")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ro = None if merged else models["run_options"][engine.precision]
    shapes = {"b32s128": (32, 128), "stream_b96s20": (96, 20)}
    for batch, seq in shapes.values():
        ids, mask = kernel_inputs(batch, seq, models["vocab_size"], models["cls_id"], models["sep_id"], seed)
        for _ in range(runs + 1):  # the first of each shape is a warm-up, not counted
            sess.run(["logits"], {"input_ids": ids, "attention_mask": mask}, ro)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    model_runs = sorted(
        (ev["ts"], ev["ts"] + ev["dur"]) for ev in trace if ev.get("name") == "model_run" and "dur" in ev
    )
    hidden, layers = engine.manifest.hidden_size, engine.manifest.num_layers
    inter = models["intermediate_size"]
    out: dict[str, Any] = {
        "precision": engine.precision,
        "model": "merged" if merged else "lora",
        "runs": runs,
    }
    for k, (name, (batch, seq)) in enumerate(shapes.items()):
        counted = model_runs[k * (runs + 1) + 1 : (k + 1) * (runs + 1)]
        wall_ms = sum(b - a for a, b in counted) / 1000.0 / max(1, len(counted))
        by_op: dict[str, float] = {}
        for ev in trace:
            ts = ev.get("ts", -1)
            if (
                ev.get("cat") == "Node"
                and ev.get("name", "").endswith("_kernel_time")
                and any(a <= ts <= b for a, b in counted)
            ):
                op = ev.get("args", {}).get("op_name", "?")
                by_op[op] = by_op.get(op, 0.0) + ev.get("dur", 0) / 1000.0
        total = sum(by_op.values()) or math.nan
        proj_ops = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMul", "FusedMatMul")
        proj_ms = sum(v for op, v in by_op.items() if op in proj_ops) / runs
        proj_flops = 2.0 * (4 * hidden * hidden + 2 * hidden * inter) * layers * batch * seq
        flops = common.encoder_flops(batch, seq, hidden, inter, layers)
        top = sorted(by_op.items(), key=lambda kv: -kv[1])[:8]
        out[name] = {
            "kernel_ms_per_run": total / runs,
            "wall_ms_per_run": wall_ms,
            "projection_ms_per_run": proj_ms,
            "projection_gflops": common.gflops_per_s(proj_flops, proj_ms),
            "run_gflops": common.gflops_per_s(flops, wall_ms),
            "top_ops": [
                {"op": op, "ms_per_run": round(ms / runs, 3), "share": round(ms / total, 3)} for op, ms in top
            ],
        }
    return out


# ---- report -----------------------------------------------------------------------------------------
def _targets(result: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, (op, thr) in TARGETS.items():
        value = result.get(key)
        ok = None
        if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
            ok = value >= thr if op == ">=" else value <= thr
        out[key] = {"value": value, "target": f"{op} {thr}", "met": ok}
    return out


def _gemm(plan: Plan, when: str) -> dict[str, float]:
    log(f"GEMM peaks ({plan.gemm_n}^3, {when})")
    out = common.gemm_peak_gflops(plan.gemm_n, plan.gemm_runs)
    out["ort_int8"] = common.ort_int8_gemm_peak_gops(plan.gemm_n, plan.gemm_runs, THREADS)
    return out


def _report(result: dict[str, Any], spreads: dict[str, dict[str, float]]) -> str:
    cases = result["cases"]
    case_names = list(cases)
    precision = result["precision"]
    rows = []
    for cfg, label in CONFIG_LABELS.items():
        row: list[object] = [label.format(precision=precision, path=result["serving_path"])]
        for case in case_names:
            ms = cases[case].get(cfg)
            sp = common.ratio(cases[case][TORCH], ms) if ms else math.nan
            row.append(
                f"{common.fmt_num(ms)} ({common.fmt_num(sp, 2)}x) ±{spreads[case].get(cfg, math.nan):.0%}"
            )
        rows.append(row)
    headers = ["config", *(c.replace("b", "", 1).replace("s", "x", 1) for c in case_names)]
    m = result["machine"]
    busy = m.get("loadavg_max_during_run")
    warn = []
    if busy is not None and m.get("logical_cores") and busy > m["logical_cores"] + 1.0:
        warn = [
            f"WARNING: 1-min load average reached {busy:.1f} on {m['logical_cores']} cores during this run (this"
            " benchmark alone is ~2): other processes competed for the CPU; absolute numbers are pessimistic.",
            "",
        ]
    lines = warn + [
        f"edge-agent inference benchmark: {m['cpu']}, {m['logical_cores']} cores, {THREADS} threads, "
        f"median ms of {result['runs']} interleaved runs (speedup vs torch fp32 eager) ±(p90-p10)/median",
        "",
        common.format_table(headers, rows),
        "",
    ]
    s, sw, ag = result["stream"], result["swap"], result["agreement"]
    ms = result["merge"]["switch_under_load"]
    st = s["stage_us_per_text"]
    lines += [
        f"engine precision picked: {precision}, serving {result['serving_path']}; LoRA overhead at 1x128 (served vs no"
        f" adapter): {common.fmt_num(result['lora_overhead_b1s128'], 3)}x (32x128: {common.fmt_num(result['lora_overhead_b32s128'], 3)}x;"
        f" unmerged {common.fmt_num(result['lora_overhead_unmerged_b1s128'], 3)}x / {common.fmt_num(result['lora_overhead_unmerged_b32s128'], 3)}x);"
        f" merged vs unmerged {common.fmt_num(result['merged_speedup_b1s128'], 3)}x at 1x128,"
        f" {common.fmt_num(result['merged_speedup_b32s128'], 3)}x at 32x128",
        f"merge under load ({ms['clients']} clients, {len(ms['rounds'])} activations): build {common.fmt_num(result['merge_build_s'], 2)} s"
        f" (activation to merged {common.fmt_num(ms['activation_to_merged_s'], 2)} s), all merged {ms['all_merged']},"
        f" {ms['requests_completed']} requests, {ms['failed_requests_during_merge_switch']} failed; client p99"
        f" {common.fmt_num(ms['client_p99_ms_during_builds'], 1)} ms during builds vs {common.fmt_num(ms['client_p99_ms_otherwise'], 1)} ms otherwise",
        "stream per text (us): " + ", ".join(f"{k} {common.fmt_num(v, 1)}" for k, v in st.items()),
        f"stream ({s['texts']} texts, {s['unique_texts']} unique, {s['mode']}): engine {s['stream_texts_per_s']:.0f} texts/s"
        f" (no cache {s['engine_texts_per_s_no_cache']:.0f}), HF pipeline {s['hf_pipeline_texts_per_s']:.0f} texts/s"
        f" (mean padded len {common.fmt_num(s['hf_mean_padded_len'])} for {common.fmt_num(s['mean_tokens_per_text'])} real tokens/text) -> {s['stream_speedup_vs_hf_pipeline']:.2f}x"
        f" ({common.fmt_num(s['speedup_no_cache_vs_hf_pipeline'], 2)}x without cache)",
        f"GEMM peak fp32 {result['gemm_peak_gflops']:.1f} GFLOP/s (numpy {result['gemm']['numpy']:.1f},"
        f" torch {common.fmt_num(result['gemm'].get('torch'))}), ORT int8 {result['gemm']['ort_int8']:.1f} GOP/s;"
        f" engine ({precision}) at 32x128 {result['engine_gflops_b32s128']:.1f} GFLOP/s -> "
        f"{result['fraction_of_gemm_peak_b32s128']:.2f} of fp32 peak"
        f" ({common.fmt_num(result['fraction_of_int8_gemm_peak_b32s128'], 2)} of int8 peak);"
        f" ORT fp32 + adapter {common.fmt_num(result['fraction_of_gemm_peak_ort_fp32_adapter_b32s128'], 2)} of fp32 peak",
        f"agreement vs torch+peft fp32 on {ag['texts']} texts: {ag['agreement']:.4f} (by precision "
        f"{ {k: round(v, 4) for k, v in ag['agreement_by_precision'].items()} }); accuracy engine "
        f"{ag['accuracy_engine']:.3f}, torch+peft {ag['accuracy_torch_peft']:.3f}; {ag['disagreements']} flips, torch"
        f" top1-top2 prob margin median {ag['torch_top1_top2_prob_margin_median']:.3f}, where flipped"
        f" {common.fmt_num(ag['torch_margin_median_where_disagree'], 3)}",
        f"swap under load ({sw['clients']} clients, {sw['swaps']} swaps): p50 {sw['swap_p50_ms']:.2f} ms,"
        f" p99 {sw['swap_p99_ms']:.2f} ms, max {sw['swap_max_ms']:.2f} ms; {sw['requests_completed_during_swaps']}"
        f" requests served, {sw['failed_requests_during_swap']} failed; idle engine p50 {sw['idle_swap_p50_ms']:.2f} ms,"
        f" p99 {sw['idle_swap_p99_ms']:.2f} ms",
    ]
    if result.get("profile"):
        pr = result["profile"]
        for shape in ("b32s128", "stream_b96s20"):
            sp = pr[shape]
            tops = ", ".join(f"{t['op']} {t['share']:.0%}" for t in sp["top_ops"][:6])
            lines.append(
                f"ORT profile {pr['precision']} {pr['model']} {shape} ({sp['kernel_ms_per_run']:.1f} ms of kernels/run,"
                f" projections {common.fmt_num(sp['projection_gflops'], 0)} GFLOP/s, whole run"
                f" {common.fmt_num(sp['run_gflops'], 0)} GFLOP/s): {tops}"
            )
    lines += ["", "targets:"]
    lines.append(common.targets_table(result["targets"]))
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------------------
def run(bundle: Path, plan: Plan, seed: int = 0) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    common.limit_threads(THREADS)
    import onnxruntime as ort
    import torch
    from peft import PeftModel
    from tokenizers import Tokenizer

    from agent.bundle import TOKENIZER_JSON, load_manifest
    from agent.engine import EngineConfig, InferenceEngine
    from agent.learner.model import load_base_model

    common.limit_threads(THREADS)
    t_start = time.perf_counter()
    machine = common.machine_info(THREADS)
    bundle = common.ensure_bundle(Path(bundle))
    manifest = load_manifest(bundle)
    gemm_samples = [_gemm(plan, "start")]
    work = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    engine = None
    try:
        a1, a2, train_info = _train_adapters(bundle, work, plan, seed)
        torch.set_num_threads(THREADS)
        log("opening engine (precision trial), merging the adapter; loading torch models")
        from tools.simulate import labeled_dataset

        # The daemon passes the plant's held-out texts: neither the training nor the agreement set.
        holdout = [r.text for r in labeled_dataset(plan.calibration_texts, seed=seed + 909)]
        engine = InferenceEngine.open(
            bundle,
            EngineConfig(intra_op_threads=THREADS),
            adapter_dir=a1,
            work_dir=work / "engine",
            calibration_texts=holdout,
        )
        t_merge = time.perf_counter()
        first_merge = engine.wait_merged(600)
        log(
            f"engine {engine.precision}, serving path {engine.serving_path} after {time.perf_counter() - t_merge:.1f}s:"
            f" {json.dumps(first_merge.get('verify'))}"
        )
        tok = Tokenizer.from_file(str(bundle / TOKENIZER_JSON))
        base = load_base_model(bundle)
        sdpa = load_base_model(bundle)
        sdpa.set_attn_implementation("sdpa")
        peft = PeftModel.from_pretrained(load_base_model(bundle), str(a1)).eval()
        sessions, run_options, handles = {}, {}, []
        for p in ("fp32", "int8"):
            if p in manifest.precisions:
                sessions[p] = ort.InferenceSession(
                    str(bundle / manifest.precisions[p].file),
                    _session_options(),
                    providers=["CPUExecutionProvider"],
                )
                run_options[p], handle = _adapter_run_options(a1, manifest, work, f"kernel-{p}")
                handles.append(handle)
        models = {
            "engine": engine,
            "base": base,
            "sdpa": sdpa,
            "peft": peft,
            "sessions": sessions,
            "run_options": run_options,
            "vocab_size": base.config.vocab_size,
            "intermediate_size": base.config.intermediate_size,
            "cls_id": tok.token_to_id("[CLS]"),
            "sep_id": tok.token_to_id("[SEP]"),
            "work": work,
        }
        log(f"kernel cases, {plan.runs} interleaved runs each; engine precision {engine.precision}")
        cases, spreads = _kernel_cases(models, plan, seed)
        gemm_samples.append(_gemm(plan, "after kernel cases"))
        log("agreement")
        agreement = _agreement(models, plan, seed)
        log("stream")
        stream = _stream(models, bundle, a1, plan, seed)
        log("swap under load")
        swap = _swap(models, a1, a2, plan, seed)
        log("merge switch under load")
        merge_switch = _merge_switch(models, a1, a2, plan, seed)
        profile = _profile(models, bundle, seed) if plan.profile else None
        del sessions, run_options, handles
        precision = engine.precision
        serving_path = engine.serving_path
        engine_stats = engine.stats()
    finally:
        if engine is not None:
            engine.close()
        shutil.rmtree(work, ignore_errors=True)
    gemm_samples.append(_gemm(plan, "end"))
    # A peak is a best case: the best of the three measurements (start, middle, end) per library.
    gemm = {k: max(g.get(k, math.nan) for g in gemm_samples) for k in gemm_samples[0]}
    flops = common.encoder_flops(
        32, 128, manifest.hidden_size, base.config.intermediate_size, manifest.num_layers
    )
    engine_gflops = common.gflops_per_s(flops, cases["b32s128"][ENGINE])
    fp32_gflops = common.gflops_per_s(flops, cases["b32s128"]["ort_fp32_adapter"])
    b1, b32 = cases["b1s128"], cases["b32s128"]
    machine.update(
        {
            "ort_providers": ort.get_available_providers(),
            "engine_provider": engine_stats.get("provider"),
            "torch_threads": torch.get_num_threads(),
            "loadavg_max_during_run": max(common.loadavg_seen(), default=None),
        }
    )
    result: dict[str, Any] = {
        "speedup_vs_torch_b1s128": common.ratio(b1[TORCH], b1[ENGINE]),
        "speedup_vs_torch_b32s128": common.ratio(b32[TORCH], b32[ENGINE]),
        "stream_speedup_vs_hf_pipeline": stream["stream_speedup_vs_hf_pipeline"],
        # The adapter as served (merged) against the bundle's graph without one.
        "lora_overhead_b1s128": common.ratio(b1[ENGINE], b1[f"ort_{precision}"]),
        "lora_overhead_b32s128": common.ratio(b32[ENGINE], b32[f"ort_{precision}"]),
        "lora_overhead_unmerged_b1s128": common.ratio(b1[f"ort_{precision}_adapter"], b1[f"ort_{precision}"]),
        "lora_overhead_unmerged_b32s128": common.ratio(
            b32[f"ort_{precision}_adapter"], b32[f"ort_{precision}"]
        ),
        "merged_speedup_b1s128": common.ratio(b1[f"ort_{precision}_adapter"], b1[ENGINE]),
        "merged_speedup_b32s128": common.ratio(b32[f"ort_{precision}_adapter"], b32[ENGINE]),
        "merge_build_s": merge_switch["merge_build_s"],
        "failed_requests_during_merge_switch": merge_switch["failed_requests_during_merge_switch"],
        "serving_path": serving_path,
        "stream_stages_ms": stream["stages_ms"],
        "stream_stage_us_per_text": stream["stage_us_per_text"],
        "fraction_of_gemm_peak_b32s128": common.ratio(engine_gflops, gemm["max"]),
        "fraction_of_int8_gemm_peak_b32s128": common.ratio(engine_gflops, gemm["ort_int8"])
        if precision == "int8"
        else None,
        "fraction_of_gemm_peak_ort_fp32_adapter_b32s128": common.ratio(fp32_gflops, gemm["max"]),
        "argmax_agreement_vs_torch_peft": agreement["agreement"],
        "swap_p50_ms": swap["swap_p50_ms"],
        "swap_p99_ms": swap["swap_p99_ms"],
        "failed_requests_during_swap": swap["failed_requests_during_swap"],
        "precision": precision,
        "gemm_peak_gflops": gemm["max"],
        "engine_gflops_b32s128": engine_gflops,
        "encoder_gflop_b32s128": flops / 1e9,
        "stream_texts_per_s": stream["stream_texts_per_s"],
        "hf_pipeline_texts_per_s": stream["hf_pipeline_texts_per_s"],
        "speedup_vs_torch_sdpa_b1s128": common.ratio(b1[SDPA], b1[ENGINE]),
        "speedup_vs_torch_sdpa_b32s128": common.ratio(b32[SDPA], b32[ENGINE]),
        "cases": cases,
        "case_spread": spreads,
        "runs": plan.runs,
        "quick": plan.is_quick,
        "gemm": gemm,
        "gemm_samples": gemm_samples,
        "agreement": agreement,
        "stream": stream,
        "swap": swap,
        "merge": {"first": first_merge, "switch_under_load": merge_switch},
        "training": train_info,
        "profile": profile,
        "machine": machine,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    result["targets"] = _targets(result)
    return result, spreads


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    common.pin_thread_env(THREADS)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    runs = args.runs if args.runs is not None else (3 if args.quick else 30)
    plan = Plan.quick(runs) if args.quick else Plan.full(runs)
    if args.profile is not None:
        plan = replace(plan, profile=args.profile)
    result, spreads = run(args.bundle, plan, args.seed)
    try:
        print(_report(result, spreads), flush=True)
    finally:  # a report bug must not lose a 20-minute run's figures
        if args.json:
            common.print_json_line(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
