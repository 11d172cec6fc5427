"""The inference engine: tokenizer, ONNX Runtime session, micro-batching, cache and adapter hot swap.

No torch on this path. One worker thread owns batching; ONNX Runtime releases the GIL while it
runs, so MQTT and the store keep going. Requests take a snapshot of the active adapter when their
batch starts, so a swap never changes a request half way: in-flight batches finish on the adapter
they started with, the next batch uses the new one.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import tempfile
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from agent import providers as prov
from agent.adapters import AdapterError, OrtAdapter, read_adapter, write_ort_adapter
from agent.bundle import TOKENIZER_JSON, BundleManifest, load_manifest

log = logging.getLogger(__name__)

# Fixed texts for the per-box precision trial: short, like the plant's own stream.
CALIBRATION_TEXTS = [
    "ALM 4711 Hydraulic pressure low HP-02",
    "2026-11-25T08:14:03 PLC3 WARN conveyor C2 motor current 14.2A above limit",
    "replaced worn belt on packer 3, noisy bearing",
    "line=2 station=press4 temp_c=87.5 vib_mm_s=7.9 pressure_bar=181",
    "E-stop pressed at station 5, operator reset",
    "cooling fan F3 failed, cabinet temp rising",
    "pneumatic valve V12 sticking, slow cylinder return",
    "batch 4471 rejected: seal width out of tolerance",
    "line=1 station=oven2 temp_c=231.0 fan_rpm=0",
    "encoder signal lost on axis X2, drive fault 7310",
    "PLC1 INFO cycle complete 42.1s",
    "oil leak under hydraulic unit HU-1, topped up 2 l",
    "sensor PT-100 reading -999, wire broken?",
    "vision check fail rate 6% on label position",
    "motor M4 overheating, thermal relay tripped",
    "compressed air 4.1 bar below setpoint 6 bar",
]


@dataclass(frozen=True)
class EngineConfig:
    # Texts taken from the queue per cycle, sorted by length together, then cut into ORT runs of at
    # most max_batch_tokens padded tokens: short plant texts share big runs, long ones small runs.
    max_batch: int = 128
    max_batch_tokens: int = 2048
    max_wait_ms: float = 2.0  # only waited for under load: an idle box answers at once
    top_k: int = 3
    cache_size: int = 4096
    intra_op_threads: int | None = None  # default: physical cores
    precision: str = "auto"  # auto | fp32 | int8 | fp16
    provider: str = "auto"  # auto | cpu | cuda | tensorrt
    min_int8_agreement: float = 0.99


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    top_k: list[tuple[str, float]]
    adapter_version: str | None


@dataclass(frozen=True)
class _Active:
    """What a batch runs with; replaced as a whole on swap, never mutated."""

    version: str | None
    labels: list[str]
    run_options: ort.RunOptions
    handle: ort.LoraAdapter | None = None
    path: Path | None = None


@dataclass
class _Request:
    texts: list[str]
    future: Future
    enqueued: float = field(default_factory=time.perf_counter)


_STOP = object()


class InferenceEngine:
    def __init__(
        self,
        manifest: BundleManifest,
        bundle_dir: Path,
        session: ort.InferenceSession,
        plan: prov.ExecutionPlan,
        config: EngineConfig,
        work_dir: Path,
    ):
        self.manifest = manifest
        self.bundle_dir = bundle_dir
        self._session = session
        self._plan = plan
        self._config = config
        self._work_dir = work_dir
        self._tokenizer = _load_tokenizer(bundle_dir, manifest.max_length)
        self._pad_id = self._tokenizer.token_to_id("[PAD]") or 0
        self._active = _Active(None, list(manifest.labels), ort.RunOptions())
        self._swap_lock = threading.Lock()
        self._adapter_seq = itertools.count()
        self._cache: OrderedDict[tuple[str | None, str], Prediction] = OrderedDict()
        self._queue: queue.Queue = queue.Queue()
        self._latencies: deque[float] = deque(maxlen=4096)
        self._done_times: deque[float] = deque(maxlen=4096)
        self._counters = {
            "requests": 0,
            "texts": 0,
            "batches": 0,
            "cache_hits": 0,
            "cache_misses": 0,
            "errors": 0,
        }
        self._under_load = False
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="inference-batcher", daemon=True)
        self._worker.start()

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        bundle_dir: Path,
        config: EngineConfig | None = None,
        adapter_dir: Path | None = None,
        work_dir: Path | None = None,
        calibration_texts: list[str] | None = None,
    ) -> InferenceEngine:
        """Load a bundle, pick provider and precision for this box, optionally activate an adapter.

        ``calibration_texts``: the box's own texts (the daemon passes recent holdout samples) for
        the INT8-vs-fp32 trial; a handful of built-in plant texts otherwise.
        """
        config = config or EngineConfig()
        bundle_dir = Path(bundle_dir)
        manifest = load_manifest(bundle_dir)
        work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="edge-agent-adapters-"))
        work_dir.mkdir(parents=True, exist_ok=True)
        plan = prov.plan_execution(
            ort.get_available_providers(), config.provider, config.precision, set(manifest.precisions)
        )
        if plan.note:
            log.warning("execution: %s", plan.note)
        adapter = read_adapter(adapter_dir, manifest) if adapter_dir else None
        if plan.precision == "auto":
            plan = replace(
                plan,
                precision=_measure_cpu_precision(
                    bundle_dir, manifest, config, adapter, work_dir, calibration_texts
                ),
            )
        session, plan = _create_session(bundle_dir, manifest, plan, config)
        engine = cls(manifest, bundle_dir, session, plan, config, work_dir)
        if adapter is not None:
            engine._activate(adapter)
        log.info(
            "engine ready: bundle %s, %s on %s, adapter %s",
            manifest.name,
            plan.precision,
            plan.providers[0],
            engine.adapter_version,
        )
        return engine

    # ---- public API -----------------------------------------------------------------------
    @property
    def adapter_version(self) -> str | None:
        return self._active.version

    @property
    def labels(self) -> list[str]:
        return list(self._active.labels)

    @property
    def precision(self) -> str:
        return self._plan.precision

    @property
    def provider(self) -> str:
        return self._session.get_providers()[0]

    @property
    def config(self) -> EngineConfig:
        return self._config

    def submit(self, texts: list[str]) -> Future:
        """Queue texts for classification; the future resolves to one Prediction per text."""
        fut: Future = Future()
        if self._closed:
            fut.set_exception(RuntimeError("engine is closed"))
            return fut
        if not texts:
            fut.set_result([])
            return fut
        self._queue.put(_Request(list(texts), fut))
        return fut

    def predict(self, texts: list[str], timeout: float | None = 60.0) -> list[Prediction]:
        return self.submit(texts).result(timeout)

    def activate_adapter(self, adapter_dir: Path) -> str:
        """Check, convert and swap in an adapter; on any error the active adapter stays."""
        adapter = read_adapter(Path(adapter_dir), self.manifest)
        return self._activate(adapter)

    def deactivate_adapter(self) -> None:
        with self._swap_lock:
            self._active = _Active(None, list(self.manifest.labels), ort.RunOptions())

    def apply_config(self, config: EngineConfig) -> None:
        """Batching, top-k and cache apply live; precision, provider and threads need a restart."""
        if config.cache_size < len(self._cache):
            self._cache.clear()
        self._config = replace(
            config,
            precision=self._config.precision,
            provider=self._config.provider,
            intra_op_threads=self._config.intra_op_threads,
        )

    def run_padded(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits for an already tokenized batch, with the active adapter (benchmarks, parity tests)."""
        active = self._active
        return self._session.run(
            ["logits"], {"input_ids": input_ids, "attention_mask": attention_mask}, active.run_options
        )[0]

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Pad to the longest text in ``texts`` (not to max_length: plant texts are short)."""
        encs = self._tokenizer.encode_batch(texts)
        return self._pad([e.ids for e in encs])

    def stats(self) -> dict:
        lat = np.array(self._latencies) * 1000.0 if self._latencies else np.zeros(1)
        now = time.perf_counter()
        recent = [t for t in self._done_times if now - t <= 10.0]
        return {
            "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "throughput_per_s": len(recent) / 10.0,
            "queue_depth": self._queue.qsize(),
            "cache_entries": len(self._cache),
            **self._counters,
            "adapter_version": self.adapter_version,
            "precision": self.precision,
            "provider": self.provider,
        }

    def close(self) -> None:
        """Finish queued requests, then stop the worker."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._worker.join(timeout=30)

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- adapters -------------------------------------------------------------------------
    def _activate(self, adapter: OrtAdapter) -> str:
        path = self._work_dir / f"adapter-{next(self._adapter_seq)}.onnx_adapter"
        write_ort_adapter(adapter, path)
        handle = ort.LoraAdapter()
        handle.Load(str(path))
        options = ort.RunOptions()
        options.add_active_adapter(handle)
        labels = adapter.meta.labels or list(self.manifest.labels)
        # ORT checks adapter tensor names and shapes only when it runs: a one-token probe here
        # turns a mismatch into a refusal instead of failed requests after the swap.
        ids, mask = self._pad([[self._pad_id]])
        try:
            logits = self._session.run(["logits"], {"input_ids": ids, "attention_mask": mask}, options)[0]
        except Exception as e:  # noqa: BLE001 - ORT raises several unrelated exception types
            path.unlink(missing_ok=True)
            raise AdapterError(f"adapter {adapter.version} rejected by the runtime: {e}") from e
        if logits.shape[1] != len(labels) or not np.isfinite(logits).all():
            path.unlink(missing_ok=True)
            raise AdapterError(f"adapter {adapter.version}: probe output {logits.shape} is not usable")
        new = _Active(adapter.version, labels, options, handle, path)
        with self._swap_lock:
            old, self._active = self._active, new
        # Unlinking a memory-mapped file is safe: batches still holding the old snapshot keep it.
        if old.path is not None:
            old.path.unlink(missing_ok=True)
        log.info("adapter %s active (previous %s)", adapter.version, old.version)
        return adapter.version

    # ---- batching -------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            n = len(first.texts)
            stop = False
            cfg = self._config
            deadline = time.perf_counter() + cfg.max_wait_ms / 1000.0
            while n < cfg.max_batch:
                try:
                    req = self._queue.get_nowait()
                except queue.Empty:
                    # Waiting only pays off when requests are arriving faster than we run.
                    remaining = deadline - time.perf_counter()
                    if not self._under_load or remaining <= 0:
                        break
                    try:
                        req = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                if req is _STOP:
                    stop = True
                    break
                batch.append(req)
                n += len(req.texts)
            self._run_requests(batch)
            self._under_load = not self._queue.empty()
            if stop:
                self._drain_and_exit()
                return

    def _drain_and_exit(self) -> None:
        rest = []
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                break
            if req is not _STOP:
                rest.append(req)
        if rest:
            self._run_requests(rest)

    def _run_requests(self, batch: list[_Request]) -> None:
        active = self._active
        try:
            results = self._classify(list(dict.fromkeys(t for r in batch for t in r.texts)), active)
        except Exception as e:  # noqa: BLE001 - a failed batch must fail its futures, not the worker
            log.exception("inference batch failed")
            self._counters["errors"] += 1
            for r in batch:
                r.future.set_exception(e)
            return
        now = time.perf_counter()
        for r in batch:
            r.future.set_result([results[t] for t in r.texts])
            self._latencies.append(now - r.enqueued)
            self._done_times.append(now)
        self._counters["requests"] += len(batch)
        self._counters["batches"] += 1

    def _classify(self, texts: list[str], active: _Active) -> dict[str, Prediction]:
        cfg = self._config
        out: dict[str, Prediction] = {}
        misses = []
        for t in texts:
            hit = self._cache.get((active.version, t)) if cfg.cache_size else None
            if hit is not None:
                self._cache.move_to_end((active.version, t))
                out[t] = hit
            else:
                misses.append(t)
        self._counters["texts"] += len(texts)
        self._counters["cache_hits"] += len(texts) - len(misses)
        self._counters["cache_misses"] += len(misses)
        if not misses:
            return out
        encs = self._tokenizer.encode_batch(misses)
        # Length bucketing: sorted by length, each chunk is padded only to its own longest text.
        order = sorted(range(len(misses)), key=lambda i: len(encs[i].ids))
        for chunk in _chunks(order, [len(encs[i].ids) for i in order], cfg.max_batch, cfg.max_batch_tokens):
            ids, mask = self._pad([encs[i].ids for i in chunk])
            logits = self._session.run(
                ["logits"], {"input_ids": ids, "attention_mask": mask}, active.run_options
            )[0]
            for i, pred in zip(chunk, _top_k(logits, active.labels, cfg.top_k, active.version), strict=True):
                out[misses[i]] = pred
        if cfg.cache_size:
            for t in misses:
                self._cache[(active.version, t)] = out[t]
            while len(self._cache) > cfg.cache_size:
                self._cache.popitem(last=False)
        return out

    def _pad(self, id_lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        return pad_ids(id_lists, self._pad_id)


def pad_ids(id_lists: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token id lists to the longest one: (input_ids, attention_mask) as int64."""
    longest = max(len(x) for x in id_lists)
    ids = np.full((len(id_lists), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(id_lists), longest), dtype=np.int64)
    for row, x in enumerate(id_lists):
        ids[row, : len(x)] = x
        mask[row, : len(x)] = 1
    return ids, mask


def _chunks(order: list[int], lengths: list[int], max_texts: int, max_tokens: int) -> list[list[int]]:
    """Split length-sorted items into runs of at most ``max_texts`` texts and ``max_tokens`` padded
    tokens (the run is padded to its last, longest item). Short texts share bigger runs."""
    chunks: list[list[int]] = []
    current: list[int] = []
    for item, length in zip(order, lengths, strict=True):
        if current and (len(current) >= max_texts or (len(current) + 1) * length > max_tokens):
            chunks.append(current)
            current = []
        current.append(item)
    if current:
        chunks.append(current)
    return chunks


def _top_k(logits: np.ndarray, labels: list[str], k: int, version: str | None) -> list[Prediction]:
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    k = max(1, min(k, len(labels)))
    top = np.argsort(-probs, axis=1)[:, :k]
    preds = []
    for row, idx in enumerate(top):
        pairs = [(labels[j], round(float(probs[row, j]), 6)) for j in idx]
        preds.append(Prediction(pairs[0][0], pairs[0][1], pairs, version))
    return preds


def _load_tokenizer(bundle_dir: Path, max_length: int) -> Tokenizer:
    tok = Tokenizer.from_file(str(bundle_dir / TOKENIZER_JSON))
    tok.enable_truncation(max_length)
    tok.no_padding()
    return tok


def _session_options(config: EngineConfig) -> ort.SessionOptions:
    so = ort.SessionOptions()
    threads = config.intra_op_threads or _physical_cores()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # LoRA inputs shadow initializers on purpose; ORT warns about each one at load.
    so.log_severity_level = 3
    return so


def _physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _create_session(
    bundle_dir: Path, manifest: BundleManifest, plan: prov.ExecutionPlan, config: EngineConfig
) -> tuple[ort.InferenceSession, prov.ExecutionPlan]:
    path = bundle_dir / manifest.precisions[plan.precision].file
    so = _session_options(config)
    if plan.device == "cuda":
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            preload()
        try:
            return ort.InferenceSession(str(path), so, providers=plan.providers), plan
        except Exception as e:  # noqa: BLE001 - a broken CUDA install must not keep the box dark
            log.warning("GPU session failed (%s); falling back to CPU", e)
            plan = prov.plan_execution([prov.CPU], "cpu", "auto", set(manifest.precisions))
            if plan.precision == "auto":
                plan = replace(plan, precision="int8" if "int8" in manifest.precisions else "fp32")
            path = bundle_dir / manifest.precisions[plan.precision].file
    return ort.InferenceSession(str(path), so, providers=[prov.CPU]), plan


def _measure_cpu_precision(
    bundle_dir: Path,
    manifest: BundleManifest,
    config: EngineConfig,
    adapter: OrtAdapter | None,
    work_dir: Path,
    calibration_texts: list[str] | None = None,
) -> str:
    """Time fp32 and INT8 on this CPU and keep INT8 only if it is faster and agrees with fp32."""
    tok = _load_tokenizer(bundle_dir, manifest.max_length)
    texts = list(dict.fromkeys(calibration_texts or []))[:256] or CALIBRATION_TEXTS
    encs = tok.encode_batch(texts)
    # Agreement over every calibration text (in chunks); timing on a batch of 16 and a single text.
    agree_feeds = [
        dict(zip(("input_ids", "attention_mask"), pad_ids([e.ids for e in encs[i : i + 64]]), strict=True))
        for i in range(0, len(encs), 64)
    ]
    ids, mask = pad_ids([e.ids for e in encs[:16]])
    feeds_batch = {"input_ids": ids, "attention_mask": mask}
    feeds_one = {"input_ids": ids[:1, : int(mask[0].sum())], "attention_mask": mask[:1, : int(mask[0].sum())]}
    options = ort.RunOptions()
    adapter_path = None
    if adapter is not None:
        adapter_path = write_ort_adapter(adapter, work_dir / "precision-trial.onnx_adapter")
        handle = ort.LoraAdapter()
        handle.Load(str(adapter_path))
        options.add_active_adapter(handle)
    so = _session_options(config)
    trials: dict[str, prov.PrecisionTrial] = {}
    reference = None
    for name in ("fp32", "int8"):
        sess = ort.InferenceSession(
            str(bundle_dir / manifest.precisions[name].file), so, providers=[prov.CPU]
        )
        runs = [sess.run(None, f, options) for f in agree_feeds]
        logits = np.concatenate([r[0] for r in runs])
        pooled = np.concatenate([r[1] for r in runs])
        times = []
        for _ in range(12):
            t = time.perf_counter()
            sess.run(["logits"], feeds_one, options)
            sess.run(["logits"], feeds_batch, options)
            times.append(time.perf_counter() - t)
        if reference is None:
            reference = (logits, pooled)
        # With a trained head, agreement is top-1 agreement; the untrained base head has margins
        # too small to mean anything, so without an adapter the mean cosine of the pooled
        # embedding (what any head will read) stands in for it.
        if adapter is not None:
            agreement = float((logits.argmax(1) == reference[0].argmax(1)).mean())
        else:
            cos = (pooled * reference[1]).sum(1) / (
                np.linalg.norm(pooled, axis=1) * np.linalg.norm(reference[1], axis=1) + 1e-12
            )
            agreement = float(cos.mean())
        trials[name] = prov.PrecisionTrial(float(np.median(times)) * 1000.0, agreement)
        del sess
    if adapter_path is not None:
        adapter_path.unlink(missing_ok=True)
    chosen = prov.choose_cpu_precision(trials, config.min_int8_agreement)
    log.info(
        "precision trial on this CPU: %s -> %s",
        {k: (round(v.median_ms, 2), v.agreement) for k, v in trials.items()},
        chosen,
    )
    return chosen
