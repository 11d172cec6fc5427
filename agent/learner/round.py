"""A training round as it runs in the learner process: data from SQLite, training, evaluation.

The daemon spawns ``run_round_process`` (multiprocessing "spawn": a fresh interpreter, so torch
never enters the serving process), at low priority with its own thread budget. The child reads the
database read-only, trains a candidate, evaluates candidate and active adapter on the holdout with
the *serving* runtime (ONNX Runtime, same precision as the engine), and writes a result JSON. The
daemon applies the promotion gate (``agent.learner.policy``) and swaps. Killing the child at any
point leaves the active adapter and the database untouched: it writes only into its own
candidate directory and result file, each renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.bundle import load_manifest
from agent.entities import SpanTuple
from agent.learner.policy import EvalReport, evaluate, evaluate_spans
from agent.ops.cgroup import prefer_oom_kill

if TYPE_CHECKING:
    from agent.linear import LinearModel

log = logging.getLogger(__name__)

TOKEN_TASK = "token-classification"


@dataclass(frozen=True)
class RoundSpec:
    db_path: str
    bundle_dir: str
    out_dir: str  # candidate adapter directory (written atomically)
    result_path: str
    version: str
    parent_dir: str | None = None  # active adapter: training continues from it
    anchor_dir: str | None = None  # fleet (global) adapter for the lambda pull; default: the parent
    precision: str = "fp32"  # what the engine serves: evaluation uses the same graph
    max_train_samples: int = 4000
    replay_fraction: float = 0.5  # share of the training set drawn from older samples
    since_sample_id: int = 0  # samples with a larger id are "new"
    val_fraction: float = 0.1
    epochs: int = 8
    lr: float = 1e-3
    batch_size: int = 16
    anchor_lambda: float = 1e-3
    distill_weight: float = 0.0
    time_budget_s: float | None = 600.0
    threads: int = 1
    nice: int = 10
    seed: int = 0
    pause_file: str | None = None  # present while the daemon wants the learner to yield
    cancel_file: str | None = None  # present when the round must stop
    frozen_a_seed: int | None = None  # the fleet's seed when it aggregates with A frozen (FFA-LoRA)
    # A candidate that was not trained here (the fleet's global adapter, already in out_dir): the
    # round only evaluates it, beside the active adapter, for the same gate.
    evaluate_only: bool = False
    # A round for a new base model: trains on bundle_dir, but the adapter it must beat serves on
    # another bundle (the one the box serves now): active_dir on active_bundle_dir.
    active_bundle_dir: str | None = None
    active_dir: str | None = None
    # The fast learner (agent.linear), refit each round on the newest train samples and saved in
    # the candidate's directory; the daemon's gate chooses what serves from its evaluation.
    linear: bool = True
    linear_max_samples: int = 20000
    linear_n_features: int = 1 << 17
    # A refresh of the active unit's fast learner between rounds (the unit copied into out_dir):
    # no training of the transformer, a new linear model on every sample so far, the same gate.
    linear_refresh: bool = False


@dataclass
class RoundResult:
    status: str  # "trained" | "cancelled" | "failed" | "no_data"
    version: str
    message: str = ""
    n_new: int = 0
    n_replay: int = 0
    max_sample_id: int = 0
    steps: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    candidate: dict[str, dict[str, Any]] = field(default_factory=dict)
    active: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per model of the candidate ("transformer", "linear", "combined"), its holdout slices; empty
    # without a linear model. ``candidate`` holds the transformer's until the gate chooses.
    candidate_models: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    linear: dict[str, Any] = field(default_factory=dict)  # fit time, samples, weight
    # What the reports' ``accuracy`` holds: "accuracy", or "entity_f1" for a token-classification
    # bundle (``agent.learner.policy.evaluate_spans``).
    metric: str = "accuracy"


def read_training_set(
    db_path: str, labels: list[str], since_id: int, max_samples: int, replay_fraction: float, seed: int
) -> tuple[list[str], list[str], int, int, int]:
    """New train-split samples plus a class-balanced replay of older ones.

    Replay draws equally per label from samples at or before ``since_id`` (a reservoir over the
    whole history, not just the last round), so rare classes are not forgotten.
    Returns texts, labels, number new, number replayed, the largest sample id seen.
    """
    rng = np.random.default_rng(seed)
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        known = set(labels)
        new = con.execute(
            "SELECT id, text, label FROM samples WHERE split='train' AND id > ? ORDER BY id DESC LIMIT ?",
            (since_id, max_samples),
        ).fetchall()
        max_id = con.execute("SELECT COALESCE(MAX(id), 0) FROM samples").fetchone()[0]
        n_replay = (
            int(len(new) * replay_fraction / max(1e-9, 1 - replay_fraction)) if replay_fraction < 1 else 0
        )
        replay: list[tuple[int, str, str]] = []
        if n_replay and since_id > 0:
            per_label = max(1, n_replay // max(1, len(labels)))
            for lab in labels:
                replay += con.execute(
                    "SELECT id, text, label FROM samples WHERE split='train' AND id <= ? AND label = ? "
                    "ORDER BY RANDOM() LIMIT ?",
                    (since_id, lab, per_label),
                ).fetchall()
    finally:
        con.close()
    rows = [r for r in new + replay if r[2] in known]
    order = rng.permutation(len(rows))
    texts = [rows[i][1] for i in order]
    labs = [rows[i][2] for i in order]
    return texts, labs, len(new), len(replay), int(max_id)


def read_span_training_set(
    db_path: str, since_id: int, max_samples: int, replay_fraction: float, seed: int
) -> tuple[list[str], list[list[SpanTuple]], int, int, int]:
    """``read_training_set`` for span samples (token classification): the new train-split span
    samples plus a uniform replay of older ones (a work order holds several entity labels, so
    there is no class to balance by). Returns texts, span lists, number new, number replayed, the
    largest sample id seen."""
    rng = np.random.default_rng(seed)
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        new = con.execute(
            "SELECT id, text, entities FROM samples WHERE split='train' AND entities IS NOT NULL AND id > ? "
            "ORDER BY id DESC LIMIT ?",
            (since_id, max_samples),
        ).fetchall()
        max_id = con.execute("SELECT COALESCE(MAX(id), 0) FROM samples").fetchone()[0]
        n_replay = (
            int(len(new) * replay_fraction / max(1e-9, 1 - replay_fraction)) if replay_fraction < 1 else 0
        )
        replay = (
            con.execute(
                "SELECT id, text, entities FROM samples WHERE split='train' AND entities IS NOT NULL "
                "AND id <= ? ORDER BY RANDOM() LIMIT ?",
                (since_id, n_replay),
            ).fetchall()
            if n_replay and since_id > 0
            else []
        )
    finally:
        con.close()
    rows = new + replay
    order = rng.permutation(len(rows))
    return (
        [rows[i][1] for i in order],
        [_spans(rows[i][2]) for i in order],
        len(new),
        len(replay),
        int(max_id),
    )


def _spans(stored: str) -> list[SpanTuple]:
    """A sample's ``entities`` column (JSON ``[[start, end, label], ...]``) as span tuples."""
    return [(int(s), int(e), str(lab)) for s, e, lab in json.loads(stored)]


def read_holdout(
    db_path: str, labels: list[str], since_id: int, limit: int = 4000, task: str = "sequence-classification"
) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """Holdout rows as (older, recent): recent = arrived after the active adapter's data
    (``id > since_id``), i.e. what the candidate is meant to fix; older = what it must not forget.
    Without a split point (first round) the newest quarter stands in for recent. A row is (text,
    label), or (text, its spans) for a token-classification bundle's span samples."""
    rows: list[tuple[int, str, Any]]
    if task == TOKEN_TASK:
        rows = [(i, t, _spans(e)) for i, t, e in _newest_samples(db_path, "holdout", limit, "entities")]
    else:
        known = set(labels)
        rows = [r for r in _newest_samples(db_path, "holdout", limit) if r[2] in known]
    older = [(t, lab) for i, t, lab in rows if i <= since_id]
    recent = [(t, lab) for i, t, lab in rows if i > since_id]
    if not older or not recent:
        cut = len(rows) - max(1, len(rows) // 4)
        older, recent = [(t, lab) for _, t, lab in rows[:cut]], [(t, lab) for _, t, lab in rows[cut:]]
    return older, recent


def _newest_samples(
    db_path: str, split: str, limit: int, target: str = "label"
) -> list[tuple[int, str, str]]:
    """The newest ``limit`` (id, text, label) rows of ``split``, oldest first (read-only); with
    ``target="entities"`` the span samples' (id, text, entities JSON)."""
    column = {"label": "label", "entities": "entities"}[target]
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute(
            f"SELECT id, text, {column} FROM samples WHERE split = ? AND {column} IS NOT NULL "
            "ORDER BY id DESC LIMIT ?",
            (split, limit),
        ).fetchall()
    finally:
        con.close()
    return rows[::-1]


def read_linear_training_set(
    db_path: str, labels: list[str], limit: int, exclude: set[str] | None = None
) -> tuple[list[str], list[str]]:
    """The newest ``limit`` train-split samples with a known label, oldest first, for the fast
    learner: it refits from scratch on the whole recent history (like the TF-IDF baseline), which
    takes seconds, so it needs no replay. Texts in ``exclude`` are left out."""
    rows = _linear_rows(db_path, labels, limit, exclude)
    return [t for _, t, _ in rows], [lab for _, _, lab in rows]


def _linear_rows(
    db_path: str, labels: list[str], limit: int, exclude: set[str] | None
) -> list[tuple[int, str, str]]:
    known, exclude = set(labels), exclude or set()
    return [
        (i, t, lab)
        for i, t, lab in _newest_samples(db_path, "train", limit)
        if lab in known and t not in exclude
    ]


def fit_linear_from_db(
    db_path: str, labels: list[str], limit: int, exclude: set[str] | None = None, n_features: int = 1 << 17
) -> tuple[LinearModel | None, dict[str, Any]]:
    """The fast learner refit from SQLite; None (and why) when the samples hold fewer than two
    classes. The info holds ``max_sample_id``, the newest sample it saw (the refresh trigger counts
    from there)."""
    from agent.linear import LinearConfig, fit_linear

    t0 = time.perf_counter()
    rows = _linear_rows(db_path, labels, limit, exclude)
    texts, labs = [t for _, t, _ in rows], [lab for _, _, lab in rows]
    max_id = max((i for i, _, _ in rows), default=0)
    try:
        model = fit_linear(texts, labs, labels, LinearConfig(list(labels), n_features=n_features))
    except ValueError as e:
        return None, {"skipped": str(e), "samples": len(texts), "max_sample_id": max_id}
    seconds = time.perf_counter() - t0
    log.info("linear model fit on %d samples in %.2fs", len(texts), seconds)
    return model, {"samples": len(texts), "fit_seconds": round(seconds, 3), "max_sample_id": max_id}


def evaluate_models(
    bundle_dir: str,
    adapter_dir: str,
    precision: str,
    slices: dict[str, list[tuple[str, str]]],
    linear: LinearModel,
) -> tuple[dict[str, dict[str, EvalReport]], float]:
    """Transformer, linear and combined on each slice with the serving runtime (see
    ``evaluate_models_on``), on an engine opened for ``adapter_dir``."""
    from agent.engine import InferenceEngine

    with InferenceEngine.open(
        Path(bundle_dir), _eval_config(precision), adapter_dir=Path(adapter_dir)
    ) as engine:
        return evaluate_models_on(engine, slices, linear)


def evaluate_models_on(
    engine: Any, slices: dict[str, list[tuple[str, str]]], linear: LinearModel
) -> tuple[dict[str, dict[str, EvalReport]], float]:
    """Transformer (what ``engine`` has active), linear and combined on the holdout slices from
    one transformer pass, the combination weight fitted on the holdout (cross-fitted, see
    ``model_reports``). Returns the reports per model and the weight."""
    if engine.labels != linear.labels:
        raise ValueError(f"adapter labels {engine.labels} differ from the linear model's {linear.labels}")
    return model_reports(transformer_logits_of(engine, slices), slices, linear)


def _eval_config(precision: str) -> Any:
    """The learner's evaluation engine: the serving graph on one thread, every text run (no cache)
    and no merged session (one pass over the holdout does not repay its build: ~0.4 GB of RSS
    and seconds of CPU beside the daemon)."""
    from agent.engine import EngineConfig

    return EngineConfig(
        precision=precision, provider="cpu", cache_size=0, intra_op_threads=1, merge_adapters=False
    )


def transformer_logits_of(engine: Any, slices: dict[str, list[tuple[str, str]]]) -> np.ndarray:
    """The transformer's logits on the holdout (``slices["all"]``: older, then recent)."""
    rows = slices.get("all") or []
    n = len(engine.labels)
    return engine.transformer_logits([t for t, _ in rows]) if rows else np.zeros((0, n), np.float32)


def model_reports(
    logits: np.ndarray,
    slices: dict[str, list[tuple[str, str]]],
    linear: LinearModel,
    weight: float | None = None,
) -> tuple[dict[str, dict[str, EvalReport]], float]:
    """Per model (transformer, linear, combined), its report on each slice, from the transformer's
    logits on ``slices["all"]`` (= older + recent, in that order); and the combination weight.

    ``weight`` None: the weight is fitted on these holdout rows, neither model trained on, and
    *cross-fitted* for the combination's own reports: each row is combined at the weight fitted on
    the other half of the rows (alternate rows), so that its accuracy here is out of sample like
    the other two models'. What serves is the weight fitted on all of them. (The round's
    validation rows, used before, had picked the transformer's best epoch: it looked better there
    than it was, and the weight swung from 0.0 to 0.6 between rounds on 40 rows.)"""
    from agent.linear import combine_log_probs, crossfit_weight

    labels = linear.labels
    rows, n_older = _holdout_rows(slices)
    out: dict[str, dict[str, EvalReport]] = {"transformer": {}, "linear": {}, "combined": {}}
    if not rows:
        return out, linear.config.weight if weight is None else weight
    texts, truth = [t for t, _ in rows], [lab for _, lab in rows]
    index = {lab: i for i, lab in enumerate(labels)}
    lin = linear.log_proba(texts)
    if weight is None:
        weight, per_row = crossfit_weight(logits, lin, np.array([index[t] for t in truth]))
    else:
        per_row = np.full(len(rows), weight)
    comb = combine_log_probs(logits, lin, per_row[:, None])
    for model, z in (("transformer", logits), ("linear", lin), ("combined", comb)):
        out[model] = _slice_reports([labels[i] for i in z.argmax(axis=1)], truth, n_older)
    return out, float(weight)


def _holdout_rows(slices: dict[str, list[tuple[str, str]]]) -> tuple[list[tuple[str, str]], int]:
    """The holdout's rows (``slices["all"]``, which must be older then recent) and how many are older."""
    rows = slices.get("all") or []
    older, recent = slices.get("older") or [], slices.get("recent") or []
    if rows != older + recent:
        raise ValueError("slices['all'] must be slices['older'] + slices['recent']")
    return rows, len(older)


def _slice_reports(preds: list[str], truth: list[str], n_older: int) -> dict[str, EvalReport]:
    """Reports on the older, recent and all slices from one pass over the holdout."""
    n = len(truth)
    cuts = (("older", 0, n_older), ("recent", n_older, n), ("all", 0, n))
    return {name: evaluate(preds[lo:hi], truth[lo:hi]) for name, lo, hi in cuts if hi > lo}


def evaluate_adapter(
    bundle_dir: str, adapter_dir: str | None, precision: str, slices: dict[str, list[tuple[str, Any]]]
) -> dict[str, EvalReport]:
    """The task's score per slice with the serving runtime (ONNX Runtime), as the box would answer:
    accuracy of labels, or entity-level micro F1 of spans (exact span and label, per label beside
    it) for a token-classification bundle."""
    from agent.engine import InferenceEngine

    # Each distinct text once: the holdout's "all" slice repeats older + recent, and plant text repeats.
    texts = list(dict.fromkeys(t for rows in slices.values() for t, _ in rows))
    if not texts:
        return {}
    adapter = Path(adapter_dir) if adapter_dir else None
    with InferenceEngine.open(Path(bundle_dir), _eval_config(precision), adapter_dir=adapter) as engine:
        answers: list[Any] = engine.predict(texts, timeout=600)  # spans per text for entities
        if engine.manifest.task == TOKEN_TASK:
            spans_of = {
                t: [(s.start, s.end, s.label) for s in a] for t, a in zip(texts, answers, strict=True)
            }
            return {
                name: evaluate_spans([spans_of[t] for t, _ in rows], [gold for _, gold in rows])
                for name, rows in slices.items()
                if rows
            }
        label_of = {t: p.label for t, p in zip(texts, answers, strict=True)}
    return {
        name: evaluate([label_of[t] for t, _ in rows], [lab for _, lab in rows])
        for name, rows in slices.items()
        if rows
    }


def run_round(spec: RoundSpec) -> RoundResult:
    manifest = load_manifest(Path(spec.bundle_dir))
    metric = "entity_f1" if manifest.task == TOKEN_TASK else "accuracy"
    if manifest.task == TOKEN_TASK and spec.linear_refresh:
        # A token bundle's fast learner (the CRF) is refit with each round, not between rounds.
        return RoundResult("no_data", spec.version, message="an entity unit's CRF is refit with its round")
    result = _run_round(spec, manifest.labels, manifest.task)
    result.metric = metric
    return result


def _run_round(spec: RoundSpec, labels: list[str], task: str) -> RoundResult:
    if spec.linear_refresh:  # no torch: the refresh's child is ONNX Runtime and scikit-learn only
        return run_linear_refresh(spec, labels)
    from agent.learner.train import TrainConfig, TrainingCancelled, train_adapter

    if spec.evaluate_only:
        result = RoundResult("trained", spec.version, max_sample_id=0)
        # The fleet's adapter is judged with the box's own fast learner beside it, refit here: the
        # box keeps serving linear or combined where that is better, whatever the fleet sends.
        linear = _fit_fast_learner(spec, labels, task, result)
        _evaluate(spec, labels, result, linear)
        return result
    texts: list[str]
    labs: list[Any]
    if task == TOKEN_TASK:
        texts, labs, n_new, n_replay, max_id = read_span_training_set(  # type: ignore[assignment]
            spec.db_path, spec.since_sample_id, spec.max_train_samples, spec.replay_fraction, spec.seed
        )
    else:
        texts, labs, n_new, n_replay, max_id = read_training_set(  # type: ignore[assignment]
            spec.db_path,
            labels,
            spec.since_sample_id,
            spec.max_train_samples,
            spec.replay_fraction,
            spec.seed,
        )
    result = RoundResult("no_data", spec.version, n_new=n_new, n_replay=n_replay, max_sample_id=max_id)
    if n_new == 0:
        result.message = "no new labeled samples"
        return result
    n_val = int(len(texts) * spec.val_fraction) if len(texts) >= 50 else 0
    val = (texts[:n_val], labs[:n_val]) if n_val else None
    cancel = Path(spec.cancel_file) if spec.cancel_file else None
    pause = Path(spec.pause_file) if spec.pause_file else None

    def wait_if_paused() -> None:
        # Inference has priority: while the daemon is busy it drops a pause file and we yield
        # between steps (bounded, so a stuck file cannot stall a round forever).
        waited = 0.0
        while pause is not None and pause.exists() and waited < 30.0:
            time.sleep(0.05)
            waited += 0.05

    try:
        tr = train_adapter(
            Path(spec.bundle_dir),
            texts[n_val:],
            labs[n_val:],
            Path(spec.out_dir),
            spec.version,
            TrainConfig(
                epochs=spec.epochs,
                lr=spec.lr,
                batch_size=spec.batch_size,
                seed=spec.seed,
                threads=spec.threads,
                time_budget_s=spec.time_budget_s,
                anchor_lambda=spec.anchor_lambda,
                distill_weight=spec.distill_weight,
            ),
            init_adapter=Path(spec.parent_dir) if spec.parent_dir else None,
            parent=Path(spec.parent_dir).name if spec.parent_dir else None,
            anchor_adapter=Path(spec.anchor_dir) if spec.anchor_dir else None,
            val=val,
            should_stop=(lambda: cancel.exists()) if cancel is not None else None,
            wait_if_paused=wait_if_paused,
            frozen_a_seed=spec.frozen_a_seed,
        )
    except TrainingCancelled as e:
        result.status, result.message = "cancelled", str(e)
        return result
    log.info(
        "round %s: trained %d steps in %.1fs; peak RSS %.0f MB",
        spec.version,
        tr.steps,
        tr.seconds,
        _peak_rss_mb(),
    )
    # Every train sample, the round's validation rows too: the combination weight is fitted on
    # the holdout (model_reports), not on them.
    linear = _fit_fast_learner(spec, labels, task, result)
    _evaluate(spec, labels, result, linear)
    result.status, result.steps, result.seconds = "trained", tr.steps, tr.seconds
    return result


def _fit_fast_learner(spec: RoundSpec, labels: list[str], task: str, result: RoundResult) -> Any:
    """The unit's fast learner refit from SQLite, when ``spec.linear``: the linear model of a
    classifier, or a token bundle's CRF (``agent.entity_crf``); None when off or not fittable."""
    if not spec.linear:
        return None
    if task == TOKEN_TASK:
        crf, result.linear = fit_crf_from_db(spec.db_path, spec.bundle_dir, spec.linear_max_samples)
        return crf
    linear, result.linear = fit_linear_from_db(
        spec.db_path, labels, spec.linear_max_samples, None, spec.linear_n_features
    )
    return linear


def fit_crf_from_db(db_path: str, bundle_dir: str, limit: int) -> tuple[Any, dict[str, Any]]:
    """The CRF refit on the newest ``limit`` train-split span samples (seconds); None (and why)
    without any."""
    from agent.entity_crf import fit_crf

    manifest = load_manifest(Path(bundle_dir))
    assert manifest.entities is not None
    rows = [(i, t, _spans(e)) for i, t, e in _newest_samples(db_path, "train", limit, "entities")]
    max_id = max((i for i, _, _ in rows), default=0)
    t0 = time.perf_counter()
    try:
        crf = fit_crf([t for _, t, _ in rows], [s for _, _, s in rows], manifest.entities.labels)
    except ValueError as e:
        return None, {"skipped": str(e), "samples": len(rows), "max_sample_id": max_id, "model": "crf"}
    seconds = time.perf_counter() - t0
    log.info("CRF fit on %d span samples in %.2fs", len(rows), seconds)
    return crf, {
        "samples": len(rows),
        "fit_seconds": round(seconds, 3),
        "max_sample_id": max_id,
        "model": "crf",
    }


def run_linear_refresh(spec: RoundSpec, labels: list[str]) -> RoundResult:
    """A new fast learner for the active unit (copied into ``out_dir``) without training the
    transformer: the linear model refit on every train sample so far; the unit's transformer, the
    new linear model and their combination (its weight fitted on the holdout, ``model_reports``)
    evaluated on the holdout slices beside what the unit serves now (``active``, at its own
    weight), from one transformer pass.
    Seconds: the drifted stream's new words reach the box's answers between rounds."""
    from agent.adapters import read_meta, write_meta
    from agent.engine import InferenceEngine
    from agent.linear import read_linear, read_serving

    out = Path(spec.out_dir)
    result = RoundResult("no_data", spec.version)
    current = read_linear(out, labels)
    if current is None:
        result.message = "the active adapter has no linear model to refresh"
        return result
    serving = read_serving(out)
    linear, result.linear = fit_linear_from_db(
        spec.db_path, labels, spec.linear_max_samples, None, spec.linear_n_features
    )
    if linear is None:
        result.message = str(result.linear.get("skipped"))
        return result
    older, recent = read_holdout(spec.db_path, labels, spec.since_sample_id)
    slices = {"older": older, "recent": recent, "all": older + recent}
    with InferenceEngine.open(Path(spec.bundle_dir), _eval_config(spec.precision), adapter_dir=out) as engine:
        logits = transformer_logits_of(engine, slices)
    models, weight = model_reports(logits, slices, linear)
    _keep_linear(result, out, linear, spec.version, models, weight)
    # The unit is a new version (predictions, the cache and the registry name it); its LoRA
    # weights stay those of the version it refreshes, named in ``parent``.
    meta = read_meta(out)
    write_meta(out, replace(meta, version=spec.version, parent=meta.version))
    now = model_reports(logits, slices, current, current.config.weight)[0][serving]
    result.active = {k: asdict(v) for k, v in now.items()}
    result.linear["torch_imported"] = "torch" in sys.modules  # a refresh must stay light
    result.status = "trained"
    log.info(
        "refresh %s: linear model on %d samples, evaluated on %d holdout rows",
        spec.version,
        result.linear.get("samples", 0),
        len(older) + len(recent),
    )
    return result


def _keep_linear(
    result: RoundResult,
    out_dir: Path,
    linear: LinearModel,
    version: str,
    models: dict[str, dict[str, EvalReport]],
    weight: float,
) -> None:
    """The candidate's linear model saved in its directory with its weight and holdout figures, and
    the three models' reports in the result (``candidate`` the transformer's until the gate chooses)."""
    from agent.linear import save_linear

    linear.config.weight, linear.config.version = weight, version
    linear.config.metrics = {m: {k: r.accuracy for k, r in reports.items()} for m, reports in models.items()}
    save_linear(out_dir, linear)
    result.linear["weight"] = weight
    result.candidate_models = {m: {k: asdict(v) for k, v in r.items()} for m, r in models.items()}
    result.candidate = result.candidate_models["transformer"]


def _keep_crf(
    result: RoundResult, spec: RoundSpec, crf: Any, slices: dict[str, list[tuple[str, Any]]]
) -> None:
    """A token candidate's transformer, CRF and their combination scored on the holdout slices
    (entity F1), the CRF saved in its directory; ``candidate`` the transformer's until the gate
    chooses."""
    from agent.entity_crf import save_crf
    from agent.linear import SERVING, write_serving

    out = Path(spec.out_dir)
    transformer = evaluate_adapter(spec.bundle_dir, spec.out_dir, spec.precision, slices)
    texts = list(dict.fromkeys(t for rows in slices.values() for t, _ in rows))
    spans_of = dict(zip(texts, crf.predict_tuples(texts), strict=True))
    crf_reports = {
        name: evaluate_spans([spans_of[t] for t, _ in rows], [gold for _, gold in rows])
        for name, rows in slices.items()
        if rows
    }
    crf.config.version = spec.version
    save_crf(out, crf)
    # The combination as the engine serves it (agent.entity_crf.EntityCrf.combine): the candidate
    # opened with serving.json saying so; the gate writes its own choice afterwards.
    write_serving(out, "combined", ["scoring the combination"])
    try:
        combined = evaluate_adapter(spec.bundle_dir, spec.out_dir, spec.precision, slices)
    finally:
        (out / SERVING).unlink(missing_ok=True)
    models = {"transformer": transformer, "crf": crf_reports, "combined": combined}
    crf.config.metrics = {m: {k: r.accuracy for k, r in reports.items()} for m, reports in models.items()}
    save_crf(out, crf, config_only=True)  # the metrics, now all three
    result.candidate_models = {m: {k: asdict(v) for k, v in r.items()} for m, r in models.items()}
    result.candidate = result.candidate_models["transformer"]


def _evaluate(
    spec: RoundSpec,
    labels: list[str],
    result: RoundResult,
    fast: Any = None,
) -> None:
    """Candidate (in ``out_dir``) and active adapter on the holdout slices the gate compares.
    With a fast learner (``_fit_fast_learner``): the candidate's models (a classifier's three, a
    token unit's transformer and CRF), and the fast learner saved beside the adapter."""
    task = load_manifest(Path(spec.bundle_dir)).task
    older, recent = read_holdout(spec.db_path, labels, spec.since_sample_id, task=task)
    slices = {"older": older, "recent": recent, "all": older + recent}
    if fast is not None and task == TOKEN_TASK:
        _keep_crf(result, spec, fast, slices)
    elif fast is not None:
        linear: LinearModel = fast
        models, weight = evaluate_models(spec.bundle_dir, spec.out_dir, spec.precision, slices, linear)
        _keep_linear(result, Path(spec.out_dir), linear, spec.version, models, weight)
    else:
        result.candidate = {
            k: asdict(v)
            for k, v in evaluate_adapter(spec.bundle_dir, spec.out_dir, spec.precision, slices).items()
        }
    active_bundle, active = (
        (spec.active_bundle_dir, spec.active_dir)
        if spec.active_bundle_dir
        else (spec.bundle_dir, spec.parent_dir)
    )
    result.active = {
        k: asdict(v) for k, v in evaluate_adapter(active_bundle, active, spec.precision, slices).items()
    }
    log.info(
        "round %s: evaluated on %d holdout rows; peak RSS %.0f MB",
        spec.version,
        len(older) + len(recent),
        _peak_rss_mb(),
    )


def _peak_rss_mb() -> float:
    """This process's own peak RSS. Not ``ru_maxrss``: Linux carries it across exec, so a spawned
    child would report its parent's RSS at fork time (the daemon's, or a benchmark's 1.7 GB)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    import resource  # not Linux: the best figure there is

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _lower_priority(nice: int) -> None:
    """Run only on CPU time inference leaves over: SCHED_IDLE where Linux offers it, plus ``nice``.

    Under a saturated CPU nice 10 still gets ~10 % of a core from inference; SCHED_IDLE gets none
    while a normal task wants it. What it does not fix (measured, README): on a 2-core box the
    engine's 2-thread ONNX Runtime pool shares a core with the learner, and batch-1 p99 during a
    round rose 1.8x; with ``engine.intra_op_threads = 1`` it rose 1.1x.
    """
    os.nice(nice)
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as e:
            log.warning("SCHED_IDLE refused (%s): the learner runs at nice %d only", e, nice)


def _die_with_parent() -> None:
    """A daemon killed with -9 (or OOM-killed) cannot stop its learner: without this the orphan
    trains on for minutes beside the restarted daemon and its next learner. Linux delivers SIGKILL
    to us when the parent dies (``PR_SET_PDEATHSIG``); the check after it covers a parent that died
    before the call."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = 1, SIGKILL = 9
    if os.getppid() != parent or parent == 1:
        os._exit(1)


def run_round_process(spec_json: str) -> None:
    """Entry point of the spawned learner process."""
    spec = RoundSpec(**json.loads(spec_json))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s learner: %(message)s")
    _die_with_parent()
    prefer_oom_kill(500)  # out of memory, the kernel takes the learner, not the daemon
    _lower_priority(spec.nice)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(spec.threads)
    start = time.perf_counter()
    try:
        result = run_round(spec)
    except Exception as e:  # noqa: BLE001 - the parent must get a result, whatever broke
        log.exception("round %s failed", spec.version)
        result = RoundResult("failed", spec.version, message=f"{type(e).__name__}: {e}")
    result.seconds = result.seconds or time.perf_counter() - start
    result.peak_rss_mb = _peak_rss_mb()
    tmp = Path(spec.result_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(result)))
    os.replace(tmp, spec.result_path)


def report_from_dict(d: dict[str, Any]) -> EvalReport:
    return EvalReport(
        d["accuracy"], dict(d["per_class"]), int(d["count"]), dict(d.get("per_class_count", {}))
    )
