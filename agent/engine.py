"""The inference engine: tokenizer, ONNX Runtime session, micro-batching, cache and adapter hot swap.

No torch on this path. One worker thread owns batching; ONNX Runtime releases the GIL while it
runs, so MQTT and the store keep going. Requests take a snapshot of what serves (``_Active``) when
their batch starts, so a swap never changes a request half way: in-flight batches finish on the
adapter and session they started with, the next batch uses the new one.

Serving paths (``stats()["serving_path"]``):

* ``base``: the bundle's graph, no adapter;
* ``lora``: the bundle's graph with the adapter through its LoRA inputs (ORT's LoRA API). An
  activation serves this way at once;
* ``merged``: a session whose weights have the adapter folded in (``agent.merge``), built by a
  background thread after each activation, checked against the serving path on the plant's own
  texts and swapped in between batches. A newer activation cancels a build in progress. At most
  two model sessions are alive (the bundle's, which the next swap needs at once, and the merged
  one); the build waits for the previous merged session to be released before it makes its own.

While a learner round runs on the same cores (``set_background_load``), batches run on a second
session of the serving model with fewer intra-op threads (built in the background, freed after):
ONNX Runtime cannot change a session's thread count, and a 2-thread pool that shares a core with
the learner doubles the batch-1 p99 on a 2-core box (README, Operations).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from agent import providers as prov
from agent.adapters import AdapterError, OrtAdapter, read_adapter, write_ort_adapter
from agent.bundle import TOKENIZER_JSON, BundleManifest, load_manifest
from agent.entity_serving import Entities, SpanExtractor
from agent.linear import LinearModel, combine_log_probs

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
MAX_CALIBRATION_TEXTS = 256
# A merged fp32 session differs from the LoRA path only by float rounding of W + A·B.
MERGE_FP32_TOLERANCE = 1e-3
# Where the batcher's time goes: waiting for more requests to join a batch, cache lookups and
# de-duplication, tokenizer, padding, ONNX Runtime, top-k + Prediction objects + cache, futures.
STAGES = ("collect", "lookup", "tokenize", "pad", "run", "post", "reply")


@dataclass(frozen=True)
class EngineConfig:
    # Texts taken from the queue per cycle, sorted by length together, then cut into ORT runs of at
    # most max_batch_tokens padded tokens: short plant texts share big runs, long ones small runs.
    max_batch: int = 256
    max_batch_tokens: int = 2048
    max_wait_ms: float = 2.0  # only waited for under load: an idle box answers at once
    top_k: int = 3
    cache_size: int = 4096
    intra_op_threads: int | None = None  # default: physical cores
    precision: str = "auto"  # auto | fp32 | int8 | fp16
    provider: str = "auto"  # auto | cpu | cuda | tensorrt
    min_int8_agreement: float = 0.99
    # Fold an activated adapter into the weights in the background and serve the merged session.
    merge_adapters: bool = True
    # A build starts this long after the activation: an adapter swapped again within it costs
    # nothing (rollbacks, benchmarks that swap back and forth).
    merge_delay_s: float = 0.5
    # Intra-op threads while a learner round runs beside the engine (set_background_load);
    # default: one fewer than intra_op_threads, at least one.
    background_threads: int | None = None
    # Token-classification bundles: how word pieces merge into entities (agent.entities.STRATEGIES).
    entity_aggregation: str = "first"


@dataclass(frozen=True, slots=True)
class Prediction:
    label: str
    score: float
    top_k: list[tuple[str, float]]
    adapter_version: str | None
    model: str = "transformer"  # which answered: "transformer" | "linear" | "combined"


@dataclass(frozen=True)
class _Active:
    """What a batch runs with; replaced as a whole on swap, never mutated."""

    version: str | None
    labels: list[str]
    run_options: ort.RunOptions
    session: ort.InferenceSession
    path: str  # "base" | "lora" | "merged"
    generation: int
    handle: ort.LoraAdapter | None = None
    adapter_file: Path | None = None
    model_file: Path | None = None  # where the merged model is on disk (lean copies load it)
    lean: ort.InferenceSession | None = None  # fewer threads, while a learner round runs
    linear: LinearModel | None = None  # the fast learner from the adapter's directory
    model: str = "transformer"  # what answers: "transformer" | "linear" | "combined" | "crf"
    weights_digest: str = ""  # the LoRA weights' (OrtAdapter.weights_digest)
    crf: Any = None  # a token unit's fast entity learner (agent.entity_crf.EntityCrf)

    @property
    def runner(self) -> ort.InferenceSession:
        return self.lean if self.lean is not None else self.session


@dataclass
class _Request:
    texts: list[str]
    future: Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class _MergeJob:
    generation: int
    adapter: OrtAdapter
    queued: float = field(default_factory=time.monotonic)


class _Cancelled(Exception):
    pass


_STOP = object()

# (adapter version, text) -> the answer: a Prediction, or the spans of a token-classification bundle.
_Cache = OrderedDict[tuple[str | None, str], Any]


class InferenceEngine:
    def __init__(
        self,
        manifest: BundleManifest,
        bundle_dir: Path,
        session: ort.InferenceSession,
        plan: prov.ExecutionPlan,
        config: EngineConfig,
        work_dir: Path,
        calibration_texts: list[str] | None = None,
        owns_work_dir: bool = False,
    ):
        self.manifest = manifest
        self.bundle_dir = bundle_dir
        self._plan = plan
        self._config = config
        self._work_dir = work_dir
        self._owns_work_dir = owns_work_dir
        self._threads = config.intra_op_threads or _physical_cores()
        self._lean_threads = max(1, config.background_threads or self._threads - 1)
        self._tokenizer = _load_tokenizer(bundle_dir, manifest.max_length)
        self._pad_id = self._tokenizer.token_to_id("[PAD]") or 0
        self._calibration = _calibration_set(calibration_texts)
        # Model sessions alive (the bundle's, a merged one, a calibration pass) and lean copies.
        self._sessions: weakref.WeakSet[ort.InferenceSession] = weakref.WeakSet()
        self._lean_sessions: weakref.WeakSet[ort.InferenceSession] = weakref.WeakSet()
        self._sessions.add(session)
        self._base_session = session
        self._generation = itertools.count(1)
        self._active = _Active(None, list(manifest.labels), ort.RunOptions(), session, "base", 0)
        self._swap_lock = threading.Lock()
        self._adapter_seq = itertools.count()
        self._cache: _Cache = OrderedDict()
        self._queue: queue.Queue = queue.Queue()
        self._latencies: deque[float] = deque(maxlen=4096)
        self._done_times: deque[float] = deque(maxlen=4096)
        self._counters = {
            "requests": 0,
            "texts": 0,
            "batches": 0,
            "runs": 0,
            "cache_hits": 0,
            "cache_misses": 0,
            "duplicates_in_batch": 0,
            "real_tokens": 0,
            "padded_tokens": 0,
            "errors": 0,
        }
        # Token-classification bundles answer spans (agent.entity_serving) instead of labels.
        self._extractor = (
            SpanExtractor(bundle_dir, manifest, config.entity_aggregation)
            if manifest.task == "token-classification"
            else None
        )
        # Merged sessions are built for CPU (fp32 or INT8); a GPU box serves the LoRA path. Their
        # checks compare the top tag of every real token of a token-classification bundle, as they
        # compare the label of every text of a classifier (``_real_rows``).
        self._can_merge = plan.device == "cpu"
        for stale in itertools.chain(work_dir.glob("merged-*.onnx"), work_dir.glob(".merged-*.tmp")):
            stale.unlink(missing_ok=True)  # left by a process that did not close
        self._stage_s = dict.fromkeys(STAGES, 0.0)
        self._queue_wait_s = 0.0  # summed over requests: enqueue to the start of their batch
        self._merge: dict[str, Any] = {"state": self._idle_merge_state()}
        self._merge_counts = {"builds": 0, "switched": 0, "cancelled": 0, "failed": 0}
        self._merge_done = threading.Condition()
        self._background = False
        self._under_load = False
        self._closed = False
        # The builder thread: merged sessions and lean copies, one at a time, never on the batcher.
        self._jobs = threading.Condition()
        self._merge_job: _MergeJob | None = None
        self._building_options: ort.SessionOptions | None = None
        self._builder = threading.Thread(target=self._build_loop, name="inference-builder", daemon=True)
        self._builder.start()
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
        the INT8-vs-fp32 trial and for calibrating and checking merged sessions; a handful of
        built-in plant texts otherwise.
        """
        config = config or EngineConfig()
        bundle_dir = Path(bundle_dir)
        manifest = load_manifest(bundle_dir)
        owns = work_dir is None
        work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="edge-agent-adapters-"))
        work_dir.mkdir(parents=True, exist_ok=True)
        plan = prov.plan_execution(
            ort.get_available_providers(), config.provider, config.precision, set(manifest.precisions)
        )
        if plan.note:
            log.warning("execution: %s", plan.note)
        adapter = read_adapter(adapter_dir, manifest) if adapter_dir else None
        # With an adapter to merge, INT8's agreement is judged on the merged INT8 session that will
        # serve (below), not on the bundle's INT8 graph with the adapter through its LoRA inputs.
        merged_trial = adapter is not None and config.merge_adapters and plan.device == "cpu"
        auto = plan.precision == "auto"
        if auto:
            plan = replace(
                plan,
                precision=_measure_cpu_precision(
                    bundle_dir,
                    manifest,
                    config,
                    None if merged_trial else adapter,
                    work_dir,
                    calibration_texts,
                    # A token head without its adapter has no signal to agree on (near-tied tags,
                    # no pooled vector): the merged INT8 session's check below decides instead.
                    defer_agreement=merged_trial and manifest.task == "token-classification",
                ),
            )
        session, plan = _create_session(bundle_dir, manifest, plan, config)
        engine = cls(manifest, bundle_dir, session, plan, config, work_dir, calibration_texts, owns)
        if adapter is not None and merged_trial and auto and plan.precision == "int8":
            # Merge now, in this thread: the engine starts on the merged session, and INT8 stays
            # only if that session agrees with the merged fp32 graph on the box's texts.
            gen = engine._activate(adapter, queue_merge=False)
            engine._run_merge(_MergeJob(gen, adapter))
            state = engine._merge
            agreement = (state.get("verify") or {}).get("agreement_vs_fp32", 0.0)
            if state.get("state") != "serving" or agreement < config.min_int8_agreement:
                log.info(
                    "precision trial: merged INT8 agrees %.3f with fp32 on this box's texts (< %.2f): fp32",
                    agreement,
                    config.min_int8_agreement,
                )
                engine.close()
                return cls.open(
                    bundle_dir, replace(config, precision="fp32"), adapter_dir, work_dir, calibration_texts
                )
            log.info(
                "precision trial: merged INT8 agrees %.3f with fp32 on this box's texts: int8", agreement
            )
        elif adapter is not None:
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
        return self._base_session.get_providers()[0]

    @property
    def config(self) -> EngineConfig:
        return self._config

    @property
    def serving_model(self) -> str:
        """What answers: ``transformer``, ``linear`` or ``combined`` (the gate's choice per box)."""
        return self._active.model

    @property
    def linear_model(self) -> LinearModel | None:
        """The fast learner that came with the active adapter, whatever serves."""
        return self._active.linear

    @property
    def serving_path(self) -> str:
        """``base``, ``lora`` (adapter through the LoRA inputs) or ``merged`` (adapter folded in)."""
        return self._active.path

    @property
    def serving_model_file(self) -> Path:
        """The ONNX file the serving session was made from: the merged model while merged."""
        active = self._active
        if active.path == "merged" and active.model_file is not None:
            return active.model_file
        return self.bundle_dir / self.manifest.precisions[self.precision].file

    def submit(self, texts: list[str]) -> Future:
        """Queue texts for classification; the future resolves to one Prediction per text."""
        fut: Future = Future()
        if self._closed:
            fut.set_exception(RuntimeError("engine is closed"))
            return fut
        if not texts:
            fut.set_result([])
            return fut
        self._queue.put(_Request(texts if isinstance(texts, list) else list(texts), fut))
        return fut

    def predict(self, texts: list[str], timeout: float | None = 60.0) -> list[Prediction]:
        return self.submit(texts).result(timeout)

    def activate_adapter(self, adapter_dir: Path) -> str:
        """Check, convert and swap in an adapter; on any error the active adapter stays."""
        adapter = read_adapter(Path(adapter_dir), self.manifest)
        self._activate(adapter)
        return adapter.version

    def deactivate_adapter(self) -> None:
        gen = next(self._generation)
        new = _Active(None, list(self.manifest.labels), ort.RunOptions(), self._base_session, "base", gen)
        self._swap(new)
        with self._jobs:
            self._merge_job = None
            self._cancel_building()
            self._jobs.notify_all()
        self._set_merge({"state": self._idle_merge_state()})

    def wait_merged(self, timeout: float = 120.0) -> dict[str, Any]:
        """Wait until no merge is pending or building (tests, benchmarks); the merge state."""
        deadline = time.monotonic() + timeout
        with self._merge_done:
            while self._merge.get("state") in ("queued", "building"):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._merge_done.wait(left)
            return dict(self._merge)

    def set_background_load(self, busy: bool) -> None:
        """A learner round starts (True) or ends (False) on this box's cores.

        While busy, batches run on a copy of the serving session with ``background_threads``
        intra-op threads (built in the background; until it is ready the full session serves),
        so the engine's pool does not wait on a core the learner holds. Back to full threads at
        once when it ends.
        """
        if busy == self._background:
            return
        self._background = busy
        log.info(
            "background load %s: serving with %d intra-op threads",
            "on" if busy else "off",
            self._lean_threads if busy else self._threads,
        )
        if not busy:
            with self._swap_lock:
                if self._active.lean is not None:
                    self._active = replace(self._active, lean=None)
        with self._jobs:
            self._jobs.notify_all()

    def apply_config(self, config: EngineConfig) -> None:
        """Batching, top-k, cache and merging apply live; precision, provider and threads need a restart."""
        if config.cache_size < len(self._cache):
            self._cache.clear()
        self._config = replace(
            config,
            precision=self._config.precision,
            provider=self._config.provider,
            intra_op_threads=self._config.intra_op_threads,
            background_threads=self._config.background_threads,
        )

    def run_padded(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits for an already tokenized batch on what serves now (benchmarks, parity tests)."""
        active = self._active
        return active.runner.run(
            ["logits"], {"input_ids": input_ids, "attention_mask": attention_mask}, active.run_options
        )[0]

    def transformer_logits(self, texts: list[str]) -> np.ndarray:
        """The transformer's logits in input order, batched as serving batches them (the learner's
        evaluation of transformer, linear and combined from one pass)."""
        active = self._active
        ids = [e.ids for e in self._tokenizer.encode_batch_fast(texts)]
        lengths = [len(x) for x in ids]
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        out = np.zeros((len(texts), len(active.labels)), np.float32)
        cfg = self._config
        for chunk in _chunks(order, [lengths[i] for i in order], cfg.max_batch, cfg.max_batch_tokens):
            batch_ids, mask = self._pad([ids[i] for i in chunk])
            out[chunk] = active.runner.run(
                ["logits"], {"input_ids": batch_ids, "attention_mask": mask}, active.run_options
            )[0]
        return out

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Pad to the longest text in ``texts`` (not to max_length: plant texts are short)."""
        encs = self._tokenizer.encode_batch_fast(texts)
        return self._pad([e.ids for e in encs])

    def stats(self) -> dict:
        lat = np.array(self._latencies) * 1000.0 if self._latencies else np.zeros(1)
        now = time.perf_counter()
        recent = [t for t in self._done_times if now - t <= 10.0]
        active = self._active
        return {
            "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "throughput_per_s": len(recent) / 10.0,
            "queue_depth": self._queue.qsize(),
            "cache_entries": len(self._cache),
            **self._counters,
            "stage_ms": {k: round(v * 1000.0, 3) for k, v in self._stage_s.items()},
            "queue_wait_ms_total": round(self._queue_wait_s * 1000.0, 3),
            "adapter_version": active.version,
            "serving_path": active.path,
            "serving_model": active.model,
            "merge": {**self._merge, **self._merge_counts},
            "sessions_alive": len(self._sessions),
            "lean_sessions_alive": len(self._lean_sessions),
            "intra_op_threads": self._lean_threads if active.lean is not None else self._threads,
            "background_load": self._background,
            "precision": self.precision,
            "provider": self.provider,
        }

    def close(self) -> None:
        """Finish queued requests, then stop the worker and the builder."""
        if self._closed:
            return
        self._closed = True
        with self._jobs:
            self._merge_job = None
            self._cancel_building()
            self._jobs.notify_all()
        self._queue.put(_STOP)
        self._worker.join(timeout=30)
        self._builder.join(timeout=30)
        if self._active.model_file is not None:
            self._active.model_file.unlink(missing_ok=True)
        if self._owns_work_dir:
            shutil.rmtree(self._work_dir, ignore_errors=True)

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- adapters -------------------------------------------------------------------------
    def _activate(self, adapter: OrtAdapter, queue_merge: bool = True) -> int:
        if self._swap_fast_learner(adapter):
            return self._active.generation
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
            logits = self._base_session.run(["logits"], {"input_ids": ids, "attention_mask": mask}, options)[
                0
            ]
        except Exception as e:  # noqa: BLE001 - ORT raises several unrelated exception types
            path.unlink(missing_ok=True)
            raise AdapterError(f"adapter {adapter.version} rejected by the runtime: {e}") from e
        if logits.shape[-1] != len(labels) or not np.isfinite(logits).all():
            path.unlink(missing_ok=True)
            raise AdapterError(f"adapter {adapter.version}: probe output {logits.shape} is not usable")
        if adapter.linear is not None and adapter.linear.labels != labels:
            path.unlink(missing_ok=True)
            raise AdapterError(f"adapter {adapter.version}: linear model labels differ from the adapter's")
        gen = next(self._generation)
        new = _Active(
            adapter.version,
            labels,
            options,
            self._base_session,
            "lora",
            gen,
            handle,
            path,
            linear=adapter.linear,
            model=adapter.serving,
            weights_digest=adapter.weights_digest,
            crf=adapter.crf,
        )
        old = self._swap(new)
        with self._jobs:
            # A build for an older adapter stops at its next check (or its session load aborts).
            self._cancel_building()
            if queue_merge and self._can_merge and self._config.merge_adapters and not self._closed:
                self._merge_job = _MergeJob(gen, adapter)
                self._set_merge({"state": "queued", "version": adapter.version})
            self._jobs.notify_all()
        log.info("adapter %s active, %s answers (previous %s)", adapter.version, adapter.serving, old.version)
        return gen

    def _swap_fast_learner(self, adapter: OrtAdapter) -> bool:
        """A unit with the serving LoRA weights and only a new fast learner (a linear refresh):
        the sessions, merged or not, and any build for them stay; the linear model, what answers
        and the version (the cache's key) change at once. False when the weights differ."""
        labels = adapter.meta.labels or list(self.manifest.labels)
        if adapter.linear is not None and adapter.linear.labels != labels:
            raise AdapterError(f"adapter {adapter.version}: linear model labels differ from the adapter's")
        with self._swap_lock:
            current = self._active
            if (
                not adapter.weights_digest
                or current.weights_digest != adapter.weights_digest
                or current.labels != labels
                or current.path == "base"
            ):
                return False
            self._active = replace(
                current,
                version=adapter.version,
                linear=adapter.linear,
                model=adapter.serving,
                crf=adapter.crf,
            )
        if adapter.version == current.version:  # answers are cached per version
            self._cache.clear()
        log.info(
            "adapter %s active: same LoRA weights as %s, new fast learner, %s answers",
            adapter.version,
            current.version,
            adapter.serving,
        )
        return True

    def _swap(self, new: _Active) -> _Active:
        with self._swap_lock:
            old, self._active = self._active, new
        # Unlinking memory-mapped files is safe: batches still holding the old snapshot keep them.
        if old.adapter_file is not None and old.adapter_file != new.adapter_file:
            old.adapter_file.unlink(missing_ok=True)
        if old.model_file is not None and old.model_file != new.model_file:
            old.model_file.unlink(missing_ok=True)
        return old

    def _idle_merge_state(self) -> str:
        return "idle" if self._can_merge and self._config.merge_adapters else "disabled"

    def _set_merge(self, state: dict[str, Any]) -> None:
        with self._merge_done:
            self._merge = state
            self._merge_done.notify_all()

    def _cancel_building(self) -> None:
        """Abort a session load in progress (called with ``_jobs`` held)."""
        if self._building_options is not None:
            self._building_options.set_load_cancellation_flag(True)

    # ---- the builder thread: merged sessions and lean copies --------------------------------
    def _build_loop(self) -> None:
        while True:
            with self._jobs:
                while not self._closed and self._merge_job is None and not self._lean_wanted():
                    self._jobs.wait()
                if self._closed:
                    return
                job = self._merge_job
                if job is not None:
                    wait = job.queued + self._config.merge_delay_s - time.monotonic()
                    if wait > 0:
                        self._jobs.wait(wait)
                        continue
                    self._merge_job = None
            try:
                if job is not None:
                    self._run_merge(job)
                elif self._lean_wanted():
                    self._build_lean()
            except Exception:  # noqa: BLE001 - the builder must survive anything; serving goes on
                log.exception("inference builder failed")

    def _lean_wanted(self) -> bool:
        return (
            self._background
            and self._plan.device == "cpu"
            and self._active.lean is None
            and self._lean_threads < self._threads
        )

    def _new_session(
        self, model: str | bytes, threads: int, generation: int | None = None, lean: bool = False
    ) -> ort.InferenceSession:
        """A CPU session made by the builder; its load aborts when a newer activation comes."""
        so = _session_options(self._config, threads)
        with self._jobs:
            if generation is not None and self._active_generation_changed(generation):
                raise _Cancelled()
            self._building_options = so
        try:
            sess = ort.InferenceSession(model, so, providers=self._base_session.get_providers())
        except Exception as e:
            if type(e).__name__ == "ModelLoadCanceled":
                raise _Cancelled() from e
            raise
        finally:
            with self._jobs:
                self._building_options = None
        (self._lean_sessions if lean else self._sessions).add(sess)
        return sess

    def _active_generation_changed(self, generation: int) -> bool:
        return self._closed or self._active.generation != generation or self._merge_job is not None

    def _build_lean(self) -> None:
        active = self._active
        source: str | None = None
        if active.path == "merged" and active.model_file is not None:
            source = str(active.model_file)
        elif active.session is self._base_session:
            source = str(self.bundle_dir / self.manifest.precisions[self.precision].file)
        if source is None:
            return
        t0 = time.perf_counter()
        try:
            lean = self._new_session(source, self._lean_threads, active.generation, lean=True)
        except _Cancelled:
            return
        with self._swap_lock:
            if (
                self._background
                and self._active.generation == active.generation
                and self._active.session is active.session
            ):
                self._active = replace(self._active, lean=lean)
                log.info(
                    "serving on %d intra-op threads while the learner runs (copy built in %.1fs)",
                    self._lean_threads,
                    time.perf_counter() - t0,
                )

    def _run_merge(self, job: _MergeJob) -> None:
        t0 = time.perf_counter()
        version = job.adapter.version
        self._set_merge({"state": "building", "version": version})
        self._merge_counts["builds"] += 1
        try:
            result = self._build_merged(job, t0)
        except _Cancelled:
            self._merge_counts["cancelled"] += 1
            log.info("merge of adapter %s cancelled: a newer adapter was activated", version)
            with self._jobs:
                pending = self._merge_job
            state = {"state": "cancelled", "version": version, "build_s": round(time.perf_counter() - t0, 3)}
            self._set_merge(
                {"state": "queued", "version": pending.adapter.version, "previous": state}
                if pending
                else state
            )
            return
        except Exception as e:  # noqa: BLE001 - a failed merge keeps the LoRA path serving
            self._merge_counts["failed"] += 1
            log.warning("merge of adapter %s failed (%s); serving it through the LoRA inputs", version, e)
            self._set_merge(
                {
                    "state": "failed",
                    "version": version,
                    "error": str(e)[:500],
                    "build_s": round(time.perf_counter() - t0, 3),
                }
            )
            return
        self._set_merge(result)

    def _build_merged(self, job: _MergeJob, t0: float) -> dict[str, Any]:
        import onnx

        from agent import merge

        gen = job.generation

        def cancel() -> bool:
            return self._active_generation_changed(gen)

        def check() -> None:
            if cancel():
                raise _Cancelled()

        # The previous merged session is no longer served; in-flight batches release it.
        self._wait_sessions_below(2, check)
        fp32 = onnx.load(str(self.bundle_dir / self.manifest.precisions["fp32"].file))
        check()
        try:
            merged = merge.fold_adapter(fp32, job.adapter.arrays, cancel)
        except merge.MergeCancelled as e:
            raise _Cancelled() from e
        check()
        # A token head's check reads word ids, which only the full encode gives.
        encode = (
            self._tokenizer.encode_batch_fast if self._extractor is None else self._tokenizer.encode_batch
        )
        feeds = [self._feed(encode(chunk)) for chunk in self._calibration]
        reference: np.ndarray | None = None
        quantization: dict[str, Any] | None = None
        precision = self.precision if self.precision in ("fp32", "int8") else "fp32"
        sess: ort.InferenceSession | None = None
        model_file = self._work_dir / f"merged-{gen}.onnx"
        try:
            if precision == "int8":
                reference, absmax = self._calibrate(merged, feeds, gen, check)
                sess, quantization = self._choose_int8(
                    merged, absmax, feeds, reference, model_file, gen, check
                )
            else:
                self._save_model(merged.model, model_file)
            del merged, fp32
            check()
            if sess is None:
                sess = self._new_session(str(model_file), self._threads, gen)
            check()
            verdict = self._verify_merged(sess, feeds, reference, precision, gen)
        except BaseException:
            model_file.unlink(missing_ok=True)
            raise
        build_s = time.perf_counter() - t0
        result: dict[str, Any] = {
            "version": job.adapter.version,
            "precision": precision,
            "build_s": round(build_s, 3),
            "verify": verdict,
        }
        if quantization is not None:
            result["quantization"] = quantization
        if not verdict["ok"]:
            model_file.unlink(missing_ok=True)
            self._merge_counts["failed"] += 1
            log.warning(
                "merged session for adapter %s disagrees (%s); serving it through the LoRA inputs",
                job.adapter.version,
                verdict,
            )
            return {**result, "state": "failed", "error": verdict["reason"]}
        with self._swap_lock:
            current = self._active
            if current.generation != gen or self._closed:
                switched = False
            else:
                self._active = replace(
                    current,
                    session=sess,
                    run_options=ort.RunOptions(),
                    path="merged",
                    model_file=model_file,
                    lean=None,
                )
                switched = True
        if not switched:
            model_file.unlink(missing_ok=True)
            raise _Cancelled()
        with self._jobs:
            self._jobs.notify_all()  # a lean copy of the merged session, if a round is running
        self._merge_counts["switched"] += 1
        log.info(
            "adapter %s now served merged (%s, built and checked in %.1fs: %s)",
            job.adapter.version,
            precision,
            build_s,
            verdict,
        )
        return {**result, "state": "serving"}

    @staticmethod
    def _save_model(model: Any, path: Path) -> None:
        import onnx

        tmp = path.with_name(f".{path.name}.tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, path)

    def _calibrate(
        self, merged: Any, feeds: list[_Feed], gen: int, check: Callable[[], None]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One fp32 pass of the merged graph on the plant's texts: the fp32 logits INT8 must agree
        with, and each projection input's per-channel range for the smoothing."""
        from agent import merge

        names = merge.calibration_outputs(merged)
        calib = self._new_session(
            merge.with_extra_outputs(merged.model, names).SerializeToString(), self._lean_threads, gen
        )
        absmax: dict[str, np.ndarray] = {}
        refs = []
        for ids, mask, read in feeds:
            check()
            outs = calib.run(["logits", *names], {"input_ids": ids, "attention_mask": mask})
            refs.append(_real_rows(outs[0], read))
            for name, value in zip(names, outs[1:], strict=True):
                am = merge.channel_absmax(value, mask)
                absmax[name] = np.maximum(absmax[name], am) if name in absmax else am
        return np.concatenate(refs), absmax

    def _choose_int8(
        self,
        merged: Any,
        absmax: dict[str, np.ndarray],
        feeds: list[_Feed],
        reference: np.ndarray,
        model_file: Path,
        gen: int,
        check: Callable[[], None],
    ) -> tuple[ort.InferenceSession | None, dict[str, Any]]:
        """Quantize with each of ``merge.INT8_RECIPES`` and keep the one closest to fp32 on the
        plant's texts (mean absolute logit difference, then top-1 agreement). One candidate session at a time:
        with the bundle's, never more than two; the last candidate's is reused when it wins."""
        import onnx

        from agent import merge

        ref_top = reference.argmax(1)
        trials: list[dict[str, Any]] = []
        best: tuple[tuple[float, float], int] | None = None
        sess: ort.InferenceSession | None = None
        for k, recipe in enumerate(merge.INT8_RECIPES):
            check()
            model = onnx.ModelProto()
            model.CopyFrom(merged.model)
            candidate = merge.MergedGraph(model, merged.projections, merged.folded)
            try:
                info = merge.quantize_int8(candidate, recipe, absmax, self._cancel_check(check))
            except merge.MergeCancelled as e:
                raise _Cancelled() from e
            path = model_file.with_name(f"{model_file.stem}-{k}.onnx")
            self._save_model(model, path)
            del model, candidate
            sess = None  # the previous candidate's session goes before this one is made
            try:
                sess = self._new_session(str(path), self._threads, gen)
                logits = np.concatenate(
                    [
                        _real_rows(sess.run(["logits"], {"input_ids": i, "attention_mask": m})[0], r)
                        for i, m, r in feeds
                    ]
                )
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            agreement = float((logits.argmax(1) == ref_top).mean())
            error = float(np.abs(logits - reference).mean())
            trials.append(
                {
                    **recipe.describe(),
                    "agreement_vs_fp32": round(agreement, 4),
                    "mean_abs_logit_diff_vs_fp32": round(error, 5),
                    "quantized": len(info["quantized"]),
                    "smoothed": len(info["smoothed"]),
                }
            )
            # The mean logit error decides: on a few hundred texts top-1 agreement moves by whole
            # near-ties and mostly ties between recipes.
            score = (-error, agreement)
            if best is None or score > best[0]:
                if best is not None:
                    model_file.with_name(f"{model_file.stem}-{best[1]}.onnx").unlink(missing_ok=True)
                best = (score, k)
            else:
                path.unlink(missing_ok=True)
        assert best is not None
        chosen = best[1]
        os.replace(model_file.with_name(f"{model_file.stem}-{chosen}.onnx"), model_file)
        keep = sess if chosen == len(merge.INT8_RECIPES) - 1 else None
        return keep, {"chosen": trials[chosen], "trials": trials}

    @staticmethod
    def _cancel_check(check: Callable[[], None]) -> Callable[[], bool]:
        def cancelled() -> bool:
            try:
                check()
            except _Cancelled:
                return True
            return False

        return cancelled

    def _wait_sessions_below(self, limit: int, check: Callable[[], None], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self._sessions) >= limit and time.monotonic() < deadline:
            check()
            time.sleep(0.01)

    def _verify_merged(
        self,
        sess: ort.InferenceSession,
        feeds: list[_Feed],
        fp32_reference: np.ndarray | None,
        precision: str,
        gen: int,
    ) -> dict[str, Any]:
        """The merged session against the path serving now, on the plant's texts.

        fp32: the same logits up to float rounding. INT8: top-1 agreement with the merged fp32
        graph at least ``min_int8_agreement``, or at least that of the INT8 LoRA path serving now.
        """
        active = self._active
        if active.generation != gen:
            raise _Cancelled()
        merged, serving = [], []
        for ids, mask, read in feeds:
            feed = {"input_ids": ids, "attention_mask": mask}
            merged.append(_real_rows(sess.run(["logits"], feed)[0], read))
            serving.append(_real_rows(active.session.run(["logits"], feed, active.run_options)[0], read))
        m, s = np.concatenate(merged), np.concatenate(serving)
        if not np.isfinite(m).all():
            return {"ok": False, "reason": "merged logits are not finite", "rows": len(m)}
        vs_serving = float((m.argmax(1) == s.argmax(1)).mean())
        out: dict[str, Any] = {
            "rows": len(m),  # texts, or the real tokens of a token-classification bundle's texts
            "agreement_vs_lora_path": round(vs_serving, 4),
            "max_abs_logit_diff_vs_lora_path": float(np.abs(m - s).max()),
        }
        if fp32_reference is None:
            ok = out["max_abs_logit_diff_vs_lora_path"] <= MERGE_FP32_TOLERANCE
            out.update(ok=ok, reason="" if ok else f"logits differ by more than {MERGE_FP32_TOLERANCE}")
            return out
        vs_fp32 = float((m.argmax(1) == fp32_reference.argmax(1)).mean())
        lora_vs_fp32 = float((s.argmax(1) == fp32_reference.argmax(1)).mean())
        out.update(
            agreement_vs_fp32=round(vs_fp32, 4),
            lora_path_agreement_vs_fp32=round(lora_vs_fp32, 4),
            max_abs_logit_diff_vs_fp32=float(np.abs(m - fp32_reference).max()),
        )
        ok = vs_fp32 >= min(self._config.min_int8_agreement, lora_vs_fp32)
        out.update(
            ok=ok,
            reason=""
            if ok
            else f"INT8 agreement with fp32 {vs_fp32:.3f} below {self._config.min_int8_agreement} and the LoRA path's {lora_vs_fp32:.3f}",
        )
        return out

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
            t0 = time.perf_counter()
            deadline = t0 + cfg.max_wait_ms / 1000.0
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
            self._stage_s["collect"] += time.perf_counter() - t0
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
        start = time.perf_counter()
        self._queue_wait_s += sum(start - r.enqueued for r in batch)
        texts = [t for r in batch for t in r.texts]
        unique = list(dict.fromkeys(texts))
        self._counters["duplicates_in_batch"] += len(texts) - len(unique)
        try:
            results = (
                self._classify(unique, active) if self._extractor is None else self._extract(unique, active)
            )
        except Exception as e:  # noqa: BLE001 - a failed batch must fail its futures, not the worker
            log.exception("inference batch failed")
            self._counters["errors"] += 1
            for r in batch:
                r.future.set_exception(e)
            return
        t1 = time.perf_counter()
        for r in batch:
            r.future.set_result([results[t] for t in r.texts])
            self._latencies.append(t1 - r.enqueued)
        self._done_times.extend(itertools.repeat(t1, len(batch)))
        self._counters["requests"] += len(batch)
        self._counters["batches"] += 1
        self._stage_s["reply"] += time.perf_counter() - t1

    def _lookup(
        self, texts: list[str], version: str | None
    ) -> tuple[dict[str, Any], list[str], _Cache | None]:
        """Cached answers for this adapter version, the texts to run, and the cache (None: off)."""
        t_lookup = time.perf_counter()
        out: dict[str, Any] = {}
        misses = []
        cache = self._cache if self._config.cache_size else None
        if cache is not None:
            for t in texts:
                hit = cache.get((version, t))
                if hit is not None:
                    cache.move_to_end((version, t))
                    out[t] = hit
                else:
                    misses.append(t)
        else:
            misses = texts
        self._counters["texts"] += len(texts)
        self._counters["cache_hits"] += len(texts) - len(misses)
        self._counters["cache_misses"] += len(misses)
        self._stage_s["lookup"] += time.perf_counter() - t_lookup
        return out, misses, cache

    def _extract(self, texts: list[str], active: _Active) -> dict[str, Entities]:
        """Entity spans per text (token-classification bundles), batched like ``_classify``."""
        extractor = self._extractor
        assert extractor is not None
        cfg, stage, version = self._config, self._stage_s, active.version
        out, misses, cache = self._lookup(texts, version)
        if not misses:
            return out
        t0 = time.perf_counter()
        if active.model == "crf" and active.crf is not None:
            # The gate chose the unit's CRF for this box (agent.entity_crf): no transformer pass.
            for text, spans in zip(misses, active.crf.predict(misses), strict=True):
                out[text] = Entities(spans, version, "crf")
            stage["run"] += time.perf_counter() - t0
            self._cache_misses(cache, misses, version, out)
            return out
        encodings = extractor.encode(misses)
        # Every window of every text is one row; rows are length-bucketed like classification's.
        rows = [(i, w) for i, wins in enumerate(encodings) for w in range(len(wins))]
        lengths = [len(encodings[i][w].ids) for i, w in rows]
        t1 = time.perf_counter()
        stage["tokenize"] += t1 - t0
        logits: list[list[np.ndarray | None]] = [[None] * len(wins) for wins in encodings]
        order = sorted(range(len(rows)), key=lengths.__getitem__)
        runner = active.runner
        for chunk in _chunks(order, [lengths[k] for k in order], cfg.max_batch, cfg.max_batch_tokens):
            ta = time.perf_counter()
            batch_ids, mask = self._pad([encodings[rows[k][0]][rows[k][1]].ids for k in chunk])
            tb = time.perf_counter()
            result = runner.run(
                ["logits"], {"input_ids": batch_ids, "attention_mask": mask}, active.run_options
            )[0]
            tc = time.perf_counter()
            for row, k in enumerate(chunk):
                i, w = rows[k]
                logits[i][w] = result[row, : lengths[k]]
            stage["pad"] += tb - ta
            stage["run"] += tc - tb
            self._counters["runs"] += 1
            self._counters["padded_tokens"] += batch_ids.size
        td = time.perf_counter()
        combined = active.model == "combined" and active.crf is not None
        for i, text in enumerate(misses):
            if combined:  # the transformer's tag probabilities with the unit's CRF (agent.entity_crf)
                out[text] = extractor.decode_combined(text, encodings[i], logits[i], active.crf, version)  # type: ignore[arg-type]
            else:
                out[text] = extractor.decode(text, encodings[i], logits[i], version)  # type: ignore[arg-type]
        stage["post"] += time.perf_counter() - td
        self._counters["real_tokens"] += sum(lengths)
        self._cache_misses(cache, misses, version, out)
        return out

    def _classify(self, texts: list[str], active: _Active) -> dict[str, Prediction]:
        cfg = self._config
        version = active.version
        out, misses, cache = self._lookup(texts, version)
        stage = self._stage_s
        t0 = time.perf_counter()
        if not misses:
            return out
        model, linear = active.model, active.linear
        if linear is None:
            model = "transformer"
        if model == "linear":
            # The transformer does not run at all: the fast learner answers alone.
            lp = linear.log_proba(misses)  # type: ignore[union-attr]
            t1 = time.perf_counter()
            stage["tokenize"] += t1 - t0
            for t, pred in zip(misses, _top_k(lp, active.labels, cfg.top_k, version, model), strict=True):
                out[t] = pred
            stage["post"] += time.perf_counter() - t1
            self._cache_misses(cache, misses, version, out)
            return out
        # The batch is vectorised once for the linear model; each ORT run takes its rows.
        linear_lp = linear.log_proba(misses) if model == "combined" and linear is not None else None
        weight = linear.config.weight if linear is not None else 0.0
        # No offsets, no padding: the ids are all the model needs.
        ids = [e.ids for e in self._tokenizer.encode_batch_fast(misses)]
        lengths = [len(x) for x in ids]
        t1 = time.perf_counter()
        stage["tokenize"] += t1 - t0
        # Length bucketing: sorted by length, each run is padded only to its own longest text.
        order = sorted(range(len(misses)), key=lengths.__getitem__)
        runner = active.runner
        labels = active.labels
        for chunk in _chunks(order, [lengths[i] for i in order], cfg.max_batch, cfg.max_batch_tokens):
            ta = time.perf_counter()
            batch_ids, mask = self._pad([ids[i] for i in chunk])
            tb = time.perf_counter()
            logits = runner.run(
                ["logits"], {"input_ids": batch_ids, "attention_mask": mask}, active.run_options
            )[0]
            tc = time.perf_counter()
            if linear_lp is not None:
                logits = combine_log_probs(logits, linear_lp[chunk], weight)
            for i, pred in zip(chunk, _top_k(logits, labels, cfg.top_k, version, model), strict=True):
                out[misses[i]] = pred
            stage["pad"] += tb - ta
            stage["run"] += tc - tb
            stage["post"] += time.perf_counter() - tc
            self._counters["runs"] += 1
            self._counters["padded_tokens"] += batch_ids.size
        self._counters["real_tokens"] += sum(lengths)
        self._cache_misses(cache, misses, version, out)
        return out

    def _cache_misses(
        self, cache: _Cache | None, misses: list[str], version: str | None, out: dict[str, Any]
    ) -> None:
        if cache is None:
            return
        t2 = time.perf_counter()
        for t in misses:
            cache[(version, t)] = out[t]
        while len(cache) > self._config.cache_size:
            cache.popitem(last=False)
        self._stage_s["post"] += time.perf_counter() - t2

    def _feed(self, encodings: list[Any]) -> _Feed:
        ids, mask = self._pad([e.ids for e in encodings])
        return ids, mask, read_mask(encodings, ids.shape[1]) if self._extractor is not None else mask

    def _pad(self, id_lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        return pad_ids(id_lists, self._pad_id)


# A merge check's batch: input ids, attention mask, and which tokens' rows answers are read from.
_Feed = tuple[np.ndarray, np.ndarray, np.ndarray]


def _real_rows(logits: np.ndarray, read: np.ndarray) -> np.ndarray:
    """One row of logits per prediction: per text ([texts, labels] as it is), or per token the
    decoder reads of a per-token head ([texts, tokens, tags] at ``read``), so that the merge's
    checks compare top-1 of rows for both task kinds."""
    return logits if logits.ndim == 2 else logits[read.astype(bool)]


def read_mask(encodings: list[Any], width: int) -> np.ndarray:
    """[texts, width] True at each word's first piece: the tokens whose tags the span decoder reads
    ("first", the default aggregation). Specials, continuation pieces and padding are never read,
    and near-tied tags there flip under INT8 without changing an answer (agreement 0.989 per token
    against a span F1 of 0.999 on the NER benchmark's adapter)."""
    out = np.zeros((len(encodings), width), dtype=bool)
    for row, e in enumerate(encodings):
        previous = None
        for i, word in enumerate(e.word_ids):
            if word is not None and word != previous and not e.special_tokens_mask[i]:
                out[row, i] = True
            previous = word
    return out


def pad_ids(id_lists: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token id lists to the longest one: (input_ids, attention_mask) as int64."""
    lengths = np.fromiter((len(x) for x in id_lists), dtype=np.int64, count=len(id_lists))
    longest = int(lengths.max())
    mask = (np.arange(longest)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.full((len(id_lists), longest), pad_id, dtype=np.int64)
    ids[mask.astype(bool)] = np.fromiter(
        itertools.chain.from_iterable(id_lists), dtype=np.int64, count=int(lengths.sum())
    )
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


def _top_k(
    logits: np.ndarray, labels: list[str], k: int, version: str | None, model: str = "transformer"
) -> list[Prediction]:
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    k = max(1, min(k, len(labels)))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    # One conversion to Python for the whole run instead of one float() per value.
    scores = np.round(np.take_along_axis(probs, top, axis=1).astype(np.float64), 6).tolist()
    preds = []
    for idx, sc in zip(top.tolist(), scores, strict=True):
        pairs = [(labels[j], s) for j, s in zip(idx, sc, strict=True)]
        preds.append(Prediction(pairs[0][0], pairs[0][1], pairs, version, model))
    return preds


def _calibration_set(texts: list[str] | None, chunk: int = 64) -> list[list[str]]:
    unique = list(dict.fromkeys(texts or []))[:MAX_CALIBRATION_TEXTS] or CALIBRATION_TEXTS
    return [unique[i : i + chunk] for i in range(0, len(unique), chunk)]


def _load_tokenizer(bundle_dir: Path, max_length: int) -> Tokenizer:
    tok = Tokenizer.from_file(str(bundle_dir / TOKENIZER_JSON))
    tok.enable_truncation(max_length)
    tok.no_padding()
    return tok


def _session_options(config: EngineConfig, threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or config.intra_op_threads or _physical_cores()
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


def _sequence_agreement(
    runs: list[list[np.ndarray]], trained_head: bool, reference: tuple[np.ndarray, np.ndarray] | None
) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
    """Agreement of one precision's (logits, pooled) runs with the first precision's (the reference)."""
    logits = np.concatenate([r[0] for r in runs])
    pooled = np.concatenate([r[1] for r in runs])
    if reference is None:
        reference = (logits, pooled)
    # With a trained head, agreement is top-1 agreement; the untrained base head has margins
    # too small to mean anything, so without an adapter the mean cosine of the pooled
    # embedding (what any head will read) stands in for it.
    if trained_head:
        return float((logits.argmax(1) == reference[0].argmax(1)).mean()), reference
    cos = (pooled * reference[1]).sum(1) / (
        np.linalg.norm(pooled, axis=1) * np.linalg.norm(reference[1], axis=1) + 1e-12
    )
    return float(cos.mean()), reference


def _measure_cpu_precision(
    bundle_dir: Path,
    manifest: BundleManifest,
    config: EngineConfig,
    adapter: OrtAdapter | None,
    work_dir: Path,
    calibration_texts: list[str] | None = None,
    defer_agreement: bool = False,
) -> str:
    """Time fp32 and INT8 on this CPU and keep INT8 only if it is faster and agrees with fp32
    (with ``defer_agreement``, faster is enough: the caller checks agreement on what will serve)."""
    tok = _load_tokenizer(bundle_dir, manifest.max_length)
    texts = [t for chunk in _calibration_set(calibration_texts) for t in chunk]
    per_token = manifest.task == "token-classification"
    # A token head's agreement reads word ids, which only the full encode gives.
    encs = tok.encode_batch(texts) if per_token else tok.encode_batch_fast(texts)
    # Agreement over every calibration text (in chunks); timing on a batch of 16 and a single text.
    agree_feeds = [
        dict(zip(("input_ids", "attention_mask"), pad_ids([e.ids for e in encs[i : i + 64]]), strict=True))
        for i in range(0, len(encs), 64)
    ]
    read_masks = [
        read_mask(encs[i : i + 64], f["input_ids"].shape[1])
        for i, f in zip(range(0, len(encs), 64), agree_feeds, strict=True)
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
        times = []
        for _ in range(12):
            t = time.perf_counter()
            sess.run(["logits"], feeds_one, options)
            sess.run(["logits"], feeds_batch, options)
            times.append(time.perf_counter() - t)
        if per_token:
            # Per real token (chunks differ in length). With a trained head, tag agreement. The
            # untrained base head's tags are near ties that INT8 flips (0.6 agreement measured), and
            # a token head has no pooled vector to fall back on: the mean cosine of the per-token
            # logits (a random projection of what any head reads) stands in, as the pooled
            # embedding's does for a classifier. An adapter merged afterwards is checked on its
            # tags anyway (the merged INT8 session against the merged fp32 graph, in ``open``).
            logits = np.concatenate([r[0][m] for r, m in zip(runs, read_masks, strict=True)])
            if reference is None:
                reference = (logits, logits)
            if adapter is not None:
                agreement = float((logits.argmax(-1) == reference[0].argmax(-1)).mean())
            else:
                cos = (logits * reference[0]).sum(1) / (
                    np.linalg.norm(logits, axis=1) * np.linalg.norm(reference[0], axis=1) + 1e-12
                )
                agreement = float(cos.mean())
        else:
            agreement, reference = _sequence_agreement(runs, adapter is not None, reference)
        trials[name] = prov.PrecisionTrial(float(np.median(times)) * 1000.0, agreement)
        del sess
    if adapter_path is not None:
        adapter_path.unlink(missing_ok=True)
    chosen = prov.choose_cpu_precision(trials, 0.0 if defer_agreement else config.min_int8_agreement)
    log.info(
        "precision trial on this CPU: %s -> %s",
        {k: (round(v.median_ms, 2), v.agreement) for k, v in trials.items()},
        chosen,
    )
    return chosen
