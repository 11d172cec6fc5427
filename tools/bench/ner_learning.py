"""Part (c) of ``python -m tools.bench ner``: online entity learning under drift, against a CRF refit
on everything seen and an offline full fine-tune.

The protocol mirrors the classification benchmark's (``tools.bench.learning``), on span samples:

* **Data.** One ``tools.workorders.workorder_dataset(n, seed, drift=True)`` (each dataset seed draws
  its own site vocabularies, so one dataset is split, seeds are never combined), in time order. The
  pre-drift half: its first 80 % is *stored* (split train/holdout as ``agent.store`` splits span
  samples: one stratum, ``holdout_fraction`` 0.1, in arrival order), its last 20 % is the
  *pre-drift test* part. The drifted half: its first 80 % is the stream, cut in order into
  ``chunks`` equal chunks (the store's split again: 10 % of each goes to the holdout), its last
  20 % is the *post-drift test* part, never trained on.
* **Base adapter**: one round from scratch on the pre-drift train rows, as the daemon's first round
  (no parent, 10 % of the shuffled set for early stopping). ``f1_before_drift``: on the pre-drift test.
* **Online rounds**, as the learner runs them, with the learner's defaults (``agent.config``
  ``LearningSettings``: lr, epochs, batch size, ``replay_fraction``, ``anchor_lambda``,
  ``distill_weight``, ``time_budget_s``): each chunk is first *predicted* by the adapter that serves
  (ONNX Runtime, ``precision``, as the box answers); then a round trains a candidate initialised from
  the serving adapter on the train rows it has not learned from (this chunk's, plus those of chunks
  whose candidate the gate refused, as the daemon's ``_active_data_through_id``) plus a uniform
  replay of the older train rows (``round.read_span_training_set``: n_new * f / (1 - f) rows), 10 %
  of the shuffled set for early stopping, the lambda pull and distillation toward the serving
  adapter (the anchor of a box without a fleet). ``agent.learner.round.evaluate_adapter`` scores
  candidate and serving adapter on the holdout slices as ``round.read_holdout`` cuts them (recent =
  holdout rows newer than the serving adapter's data, older = the rows before them), and
  ``policy.promotion_decision`` (default ``GatePolicy``) promotes the candidate or drops it.
* ``f1_drift_online``: entity micro F1 (``agent.entities.span_f1``: exact span and label) pooled
  over every text of the drifted chunks *after the first* (the first is predicted before any
  drifted label exists), spans pooled, not a mean of chunk F1s. ``f1_drift_no_learning``: the base
  adapter on the same texts.
* ``crf_f1_drift``: ``tools.bench.crf.CrfBaseline`` refit before each chunk on every labeled row seen
  so far (the stored part and the earlier chunks, holdout rows included: it has no gate to feed),
  prequential on the same chunks, pooled the same way: what a practitioner would run instead.
* ``f1_offline_full_ft``: all weights (``load_base_model``, AdamW lr 1e-4, linear warm-up/decay, up to
  4 epochs, the epoch with the best holdout F1 kept, as the classification benchmark's) on every
  train row (pre-drift and every chunk), the learner's token labels (``train._TokenExamples``), spans
  decoded from torch logits by the serving decoder (``SpanExtractor``); scored on the post-drift test.
* ``ner_recovery_ratio`` = the final served adapter's F1 on the post-drift test / ``f1_offline_full_ft``.
* ``forgetting_pts`` = 100 x (base adapter - final served adapter) F1 on the pre-drift test.

The default size (``n`` 2,000, 4 chunks of 200) takes about 10 minutes on a quiet 2-core box.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.entity_crf import CRF_CONFIG, CRF_MODEL
from agent.linear import SERVING
from tools.bench import common
from tools.bench.common import log
from tools.bench.learning import HoldoutSplitter, StreamSplit, points

Span = tuple[int, int, str]

LEARNING_KEYS = (
    "f1_drift_online",
    "crf_f1_drift",
    "f1_offline_full_ft",
    "ner_recovery_ratio",
    "forgetting_pts",
)
TARGETS = {  # metric -> (comparison, threshold), from the issue
    "f1_drift_online_minus_crf": (">=", 0.0),
    "ner_recovery_ratio": (">=", 0.95),
    "forgetting_pts": ("<=", 2.0),
}
THREADS = common.DEFAULT_THREADS
PRE_TEST_FRACTION = 0.2
POST_TEST_FRACTION = 0.2
VAL_FRACTION = 0.1  # RoundSpec.val_fraction
HOLDOUT_LIMIT = 4000  # round.read_holdout's default
SPAN_STRATUM = "entities"  # agent.store puts every span sample in one holdout stratum
OFFLINE_EPOCHS = 4
OFFLINE_LR = 1e-4
OFFLINE_BUDGET_S = 1500.0  # safety caps only: the figures must not depend on how busy the box is
BASE_BUDGET_S = 1200.0


@dataclass(frozen=True)
class SpanRow:
    text: str
    spans: tuple[Span, ...]


# The protocol's data in arrival order (``tools.bench.learning.StreamSplit``), of span rows.
NerSplit = StreamSplit[SpanRow]


# ---- pure helpers (unit-tested) -------------------------------------------------------------------
def split_stream(
    orders: Sequence[Any],
    n_chunks: int,
    pre_test_fraction: float = PRE_TEST_FRACTION,
    post_test_fraction: float = POST_TEST_FRACTION,
    holdout_fraction: float = 0.1,
) -> NerSplit:
    """Cut one drifting stream of work orders (``.text``, ``.entities``, ``.drifted``) by the protocol."""
    if n_chunks < 2:
        raise ValueError("at least 2 chunks: the headline pools the chunks after the first")
    rows = [(SpanRow(wo.text, tuple(wo.entities)), bool(wo.drifted)) for wo in orders]
    pre = [r for r, drifted in rows if not drifted]
    post = [r for r, drifted in rows if drifted]
    n_pre_test = int(round(len(pre) * pre_test_fraction))
    n_post_test = int(round(len(post) * post_test_fraction))
    stored, pre_test = pre[: len(pre) - n_pre_test], pre[len(pre) - n_pre_test :]
    stream, post_test = post[: len(post) - n_post_test], post[len(post) - n_post_test :]
    size = len(stream) // n_chunks
    if size < 1 or not stored:
        raise ValueError(f"{len(orders)} work orders are too few for {n_chunks} chunks")
    chunks = [stream[k * size : (k + 1) * size] for k in range(n_chunks)]
    splitter = HoldoutSplitter(holdout_fraction)  # one store: its counts run on across the drift
    stored_flags = [splitter.is_holdout(SPAN_STRATUM) for _ in stored]
    chunk_holdout = [[splitter.is_holdout(SPAN_STRATUM) for _ in c] for c in chunks]
    return StreamSplit(
        pre_train=[r for r, h in zip(stored, stored_flags, strict=True) if not h],
        pre_holdout=[r for r, h in zip(stored, stored_flags, strict=True) if h],
        pre_test=pre_test,
        chunks=chunks,
        chunk_holdout=chunk_holdout,
        post_test=post_test,
    )


def span_training_set(
    new: Sequence[SpanRow], older: Sequence[SpanRow], replay_fraction: float, seed: int
) -> tuple[list[str], list[list[Span]], int, int]:
    """``round.read_span_training_set`` on lists: every new row plus a uniform replay of older rows
    (``n_new * f / (1 - f)`` of them, all when there are fewer), shuffled. Returns texts, span lists,
    number new, number replayed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_replay = int(len(new) * replay_fraction / max(1e-9, 1 - replay_fraction)) if replay_fraction < 1 else 0
    replay = list(older)
    if len(replay) > n_replay:
        replay = [replay[i] for i in sorted(rng.choice(len(replay), n_replay, replace=False))]
    rows = list(new) + replay
    order = rng.permutation(len(rows))
    return [rows[i].text for i in order], [list(rows[i].spans) for i in order], len(new), len(replay)


def val_split(texts: list[str], spans: list[list[Span]]):
    """``run_round``'s split: the first 10 % of the (shuffled) set for early stopping when it has >= 50 rows."""
    n_val = int(len(texts) * VAL_FRACTION) if len(texts) >= 50 else 0
    val = (texts[:n_val], spans[:n_val]) if n_val else None
    return texts[n_val:], spans[n_val:], val


def pooled_f1(
    gold_chunks: Sequence[Sequence[Sequence[Span]]],
    pred_chunks: Sequence[Sequence[Sequence[Span]]],
    skip_first: int = 0,
) -> float:
    """Entity micro F1 over every text of chunks ``skip_first..`` together (NaN without a text)."""
    from agent.entities import span_f1

    gold = [g for chunk in gold_chunks[skip_first:] for g in chunk]
    pred = [p for chunk in pred_chunks[skip_first:] for p in chunk]
    return float(span_f1(gold, pred)["f1"]) if gold else math.nan


def f1_of(rows: Sequence[SpanRow], pred: Sequence[Sequence[Span]]) -> float:
    from agent.entities import span_f1

    return float(span_f1([list(r.spans) for r in rows], pred)["f1"]) if rows else math.nan


def holdout_slices(
    older: Sequence[SpanRow], new: Sequence[SpanRow], limit: int = HOLDOUT_LIMIT
) -> tuple[list[SpanRow], list[SpanRow]]:
    """``round.read_holdout`` on lists (``learning.holdout_slices`` for span rows): recent = the
    holdout rows newer than the serving adapter's data, older = the newest ``limit`` rows before
    them; without new rows the newest quarter stands in for recent."""
    older = list(older)[-limit:]
    if new and older:
        return older, list(new)
    rows = (older + list(new))[-limit:]
    cut = len(rows) - max(1, len(rows) // 4)
    return rows[:cut], rows[cut:]


def targets(result: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, (op, thr) in TARGETS.items():
        value = result.get(key)
        ok = None
        if isinstance(value, int | float) and not math.isnan(value):
            ok = value >= thr if op == ">=" else value <= thr
        out[key] = {"value": value, "target": f"{op} {thr}", "met": ok}
    return out


# ---- the serving runtime --------------------------------------------------------------------------
class SpanPredictor:
    """Spans as the box answers them: one engine (ONNX Runtime, no cache, no merged session), the
    adapter to score swapped in."""

    def __init__(self, bundle: Path, adapter: Path, precision: str = "fp32", threads: int = THREADS):
        from agent.engine import EngineConfig, InferenceEngine

        config = EngineConfig(
            precision=precision, provider="cpu", cache_size=0, intra_op_threads=threads, merge_adapters=False
        )
        self.engine = InferenceEngine.open(bundle, config, adapter_dir=adapter)
        self.current = adapter

    def spans(self, adapter: Path, texts: list[str]) -> list[list[Span]]:
        if not texts:
            return []
        if adapter != self.current:
            self.engine.activate_adapter(adapter)
            self.current = adapter
        answers: list[Any] = self.engine.predict(texts, timeout=1800)  # spans per text for entities
        return [[(s.start, s.end, s.label) for s in a] for a in answers]

    def close(self) -> None:
        self.engine.close()


# ---- the learner ----------------------------------------------------------------------------------
def choose_serving(
    bundle: Path,
    cand: Path,
    fast_rows: Sequence[SpanRow],
    slices: dict[str, list[tuple[str, Any]]],
    precision: str,
) -> tuple[str, dict[str, Any], list[str]]:
    """What the product's round and gate do with a trained candidate: its CRF refit on the train
    rows so far (``fast_rows``, as ``round.fit_crf_from_db`` takes SQLite's), the transformer and
    the CRF scored on the holdout slices (``round._keep_crf``), the gate's choice written into
    ``serving.json``. Returns the choice, its reports, and why."""
    from agent.entity_crf import fit_crf
    from agent.learner.policy import GatePolicy, serving_choice
    from agent.learner.round import RoundResult, RoundSpec, _keep_crf, report_from_dict
    from agent.linear import write_serving

    crf = fit_crf([r.text for r in fast_rows], [list(r.spans) for r in fast_rows], entity_labels())
    spec = RoundSpec("", str(bundle), str(cand), "", cand.name, precision=precision)
    result = RoundResult("trained", cand.name)
    _keep_crf(result, spec, crf, {**slices, "all": slices["older"] + slices["recent"]})
    models = {m: {k: report_from_dict(v) for k, v in r.items()} for m, r in result.candidate_models.items()}
    choice = serving_choice(models, GatePolicy())
    write_serving(cand, choice.model, choice.reasons)
    return choice.model, models[choice.model], choice.reasons


def entity_labels() -> list[str]:
    from tools.workorders import ENTITY_LABELS

    return list(ENTITY_LABELS)


def learner_settings():
    """The daemon's learning defaults (``agent.config``), the ones a box runs with."""
    from agent.config import LearningSettings

    return LearningSettings()


def train_config(seed: int, threads: int, budget_s: float | None = None):
    from agent.learner.train import TrainConfig

    s = learner_settings()
    return TrainConfig(
        epochs=s.epochs,
        lr=s.learning_rate,
        batch_size=s.batch_size,
        seed=seed,
        threads=threads,
        time_budget_s=budget_s if budget_s is not None else s.time_budget_s,
        anchor_lambda=s.anchor_lambda,
        distill_weight=s.distill_weight,
    )


def _train_record(res: Any) -> dict[str, Any]:
    return {
        "steps": res.steps,
        "epochs_run": res.epochs_run,
        "seconds": round(res.seconds, 1),
        "stopped": res.stopped,
        "val_accuracy": res.best_val_accuracy,
    }


def train_base(
    bundle: Path,
    split: NerSplit,
    work: Path,
    seed: int,
    threads: int,
    fast_learner: bool = True,
    precision: str = "fp32",
) -> tuple[Path, dict[str, Any]]:
    """The daemon's first round: no parent, every pre-drift train row, shuffled, 10 % for early stopping."""
    from agent.learner.train import train_adapter

    texts, spans, _, _ = span_training_set(split.pre_train, [], 0.0, seed)
    tr_texts, tr_spans, val = val_split(texts, spans)
    out = work / "base"
    log(f"base adapter: {len(tr_texts)} texts (+{len(val[0]) if val else 0} val)")
    res = train_adapter(
        bundle, tr_texts, tr_spans, out, "bench-ner-base", train_config(seed, threads, BASE_BUDGET_S), val=val
    )
    log(f"base adapter: {res.steps} steps, {res.epochs_run} epochs in {res.seconds:.0f}s ({res.stopped})")
    info: dict[str, Any] = {"texts": len(tr_texts), **_train_record(res)}
    if fast_learner:
        older, recent = holdout_slices(split.pre_holdout, [])
        slices = {
            "older": [(r.text, list(r.spans)) for r in older],
            "recent": [(r.text, list(r.spans)) for r in recent],
        }
        info["serving"], _, info["serving_reasons"] = choose_serving(
            bundle, out, split.pre_train, slices, precision
        )
        log(f"base unit serves its {info['serving']}")
    return out, info


def run_online(
    bundle: Path,
    split: NerSplit,
    predictor: SpanPredictor,
    base_dir: Path,
    work: Path,
    seed: int,
    threads: int,
    precision: str = "fp32",
    fast_learner: bool = True,
) -> dict[str, Any]:
    """Prequential online learning over the chunks: predict with what serves, then a gated round.
    ``fast_learner``: each round also refits the unit's CRF and the gate chooses what serves, as
    the product does (``learning.fast_learner``); off, the transformer alone serves."""
    from agent.learner.policy import GatePolicy, promotion_decision
    from agent.learner.round import evaluate_adapter
    from agent.learner.train import train_adapter

    s = learner_settings()
    gate = GatePolicy()
    active = base_dir
    older_train = list(split.pre_train)  # what the serving adapter has learned from
    holdout = list(split.pre_holdout)
    pending_train: list[SpanRow] = []  # rows of refused rounds: still new to the serving adapter
    pending_holdout: list[SpanRow] = []
    online: list[list[list[Span]]] = []
    no_learning: list[list[list[Span]]] = []
    rounds: list[dict[str, Any]] = []
    for k, chunk in enumerate(split.chunks):
        texts = [r.text for r in chunk]
        online.append(predictor.spans(active, texts))
        no_learning.append(predictor.spans(base_dir, texts))
        t0 = time.perf_counter()
        new = pending_train + split.chunk_train(k)
        new_holdout = pending_holdout + split.chunk_holdout_rows(k)
        all_texts, all_spans, n_new, n_replay = span_training_set(
            new, older_train, s.replay_fraction, seed + 1000 + k
        )
        tr_texts, tr_spans, val = val_split(all_texts, all_spans)
        cand = work / f"r{k}"
        # No anchor_adapter: a box without a fleet anchors the pull and the distillation to the
        # adapter the round starts from, the serving one.
        res = train_adapter(
            bundle,
            tr_texts,
            tr_spans,
            cand,
            f"bench-ner-r{k}",
            train_config(seed + k, threads),
            init_adapter=active,
            parent=active.name,
            val=val,
        )
        older, recent = holdout_slices(holdout, new_holdout)
        slices = {
            "older": [(r.text, list(r.spans)) for r in older],
            "recent": [(r.text, list(r.spans)) for r in recent],
        }
        serving, serving_reasons = "transformer", []
        if fast_learner:
            # The CRF is refit on every train row so far, as the product's round refits it from SQLite.
            serving, chosen, serving_reasons = choose_serving(
                bundle, cand, older_train + new, slices, precision
            )
            cand_rep = {k: v for k, v in chosen.items() if k in slices}
        else:
            cand_rep = evaluate_adapter(str(bundle), str(cand), precision, slices)
        act_rep = evaluate_adapter(str(bundle), str(active), precision, slices)
        decision = promotion_decision(cand_rep, act_rep, gate)
        round_s = time.perf_counter() - t0
        chunk_f1 = f1_of(chunk, online[-1])
        rounds.append(
            {
                "chunk": k,
                "texts": len(chunk),
                "prequential_f1": chunk_f1,
                "no_learning_f1": f1_of(chunk, no_learning[-1]),
                "served": active.name,
                "n_new": n_new,
                "n_replay": n_replay,
                **_train_record(res),
                "round_seconds": round(round_s, 1),
                "candidate": {n: round(r.accuracy, 4) for n, r in cand_rep.items()},
                "active": {n: round(r.accuracy, 4) for n, r in act_rep.items()},
                "holdout_rows": {"older": len(older), "recent": len(recent)},
                "promoted": decision.promote,
                "reasons": decision.reasons,
                "serving": serving,
                "serving_reasons": serving_reasons,
            }
        )
        log(
            f"chunk {k}: prequential F1 {chunk_f1:.3f} ({active.name}); round {res.steps} steps "
            f"{res.seconds:.0f}s ({res.stopped}); candidate older/recent {cand_rep['older'].accuracy:.3f}/"
            f"{cand_rep['recent'].accuracy:.3f} vs {act_rep['older'].accuracy:.3f}/{act_rep['recent'].accuracy:.3f}"
            f" -> {'promoted' if decision.promote else 'refused: ' + '; '.join(decision.reasons)[:160]}"
            f", serves its {serving}"
        )
        if decision.promote:
            active = cand
            older_train += new
            holdout += new_holdout
            pending_train, pending_holdout = [], []
        else:
            pending_train, pending_holdout = new, new_holdout
    gold = [[list(r.spans) for r in c] for c in split.chunks]
    return {
        "f1_drift_online": pooled_f1(gold, online, 1),
        "f1_drift_online_all_chunks": pooled_f1(gold, online, 0),
        "f1_drift_no_learning": pooled_f1(gold, no_learning, 1),
        "final_adapter": active,
        "promoted": sum(r["promoted"] for r in rounds),
        "rounds": rounds,
        "round_seconds_median": common.median([r["round_seconds"] for r in rounds]),
    }


# ---- the CRF baseline -----------------------------------------------------------------------------
def crf_prequential(split: NerSplit) -> dict[str, Any]:
    """The CRF refit on every labeled row seen before each chunk, scored on the chunk (and at the end
    on both test parts); beside it, the CRF of the stored part alone on the same chunks."""
    from tools.bench.crf import CrfBaseline

    seen = split.pre_train + split.pre_holdout
    pred: list[list[list[Span]]] = []
    fixed: list[list[list[Span]]] = []
    fit_s: list[float] = []
    first = None
    for chunk in split.chunks:
        t0 = time.perf_counter()
        crf = CrfBaseline().fit((r.text, r.spans) for r in seen)
        fit_s.append(round(time.perf_counter() - t0, 2))
        if first is None:
            first = crf
        texts = [r.text for r in chunk]
        pred.append(crf.predict(texts))
        fixed.append(first.predict(texts))
        seen = seen + chunk
    final = CrfBaseline().fit((r.text, r.spans) for r in seen)
    gold = [[list(r.spans) for r in c] for c in split.chunks]
    return {
        "crf_f1_drift": pooled_f1(gold, pred, 1),
        "crf_f1_drift_all_chunks": pooled_f1(gold, pred, 0),
        "crf_f1_drift_no_refit": pooled_f1(gold, fixed, 1),
        "chunk_f1": [f1_of(c, p) for c, p in zip(split.chunks, pred, strict=True)],
        "f1_post_test": f1_of(split.post_test, final.predict([r.text for r in split.post_test])),
        "f1_pre_test": f1_of(split.pre_test, final.predict([r.text for r in split.pre_test])),
        "fit_seconds": fit_s,
    }


# ---- the offline upper bound ----------------------------------------------------------------------
def offline_full_finetune(
    bundle: Path,
    split: NerSplit,
    seed: int,
    threads: int,
    epochs: int = OFFLINE_EPOCHS,
    lr: float = OFFLINE_LR,
    budget_s: float = OFFLINE_BUDGET_S,
) -> dict[str, Any]:
    """All weights on every train row, best epoch on the holdout's entity F1; torch fp32."""
    import numpy as np
    import torch

    from agent.bundle import load_manifest
    from agent.entities import merge_windows
    from agent.entity_serving import SpanExtractor, window_tokenizer
    from agent.learner.model import load_base_model
    from agent.learner.train import _TokenExamples

    manifest = load_manifest(bundle)
    rows, val = split.all_train(), split.all_holdout()
    examples = _TokenExamples(bundle, manifest, [r.text for r in rows], [list(r.spans) for r in rows])
    extractor = SpanExtractor(bundle, manifest)
    pad_id = window_tokenizer(bundle, manifest).token_to_id("[PAD]") or 0
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    model = load_base_model(bundle)
    bs = learner_settings().batch_size
    steps_per_epoch = math.ceil(len(examples) / bs)
    total = steps_per_epoch * epochs
    warm = max(1, int(0.06 * total))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
    )
    rng = np.random.default_rng(seed)

    def predict(texts: list[str]) -> list[list[Span]]:
        """torch logits per serving window, decoded by the engine's decoder."""
        model.eval()
        encoded = extractor.encode(texts)
        windows = [(t, w) for t, encs in enumerate(encoded) for w in encs]
        logits: list[list[np.ndarray]] = [[] for _ in texts]
        with torch.no_grad():
            for b in range(0, len(windows), 64):
                part = windows[b : b + 64]
                width = max(len(w.ids) for _, w in part)
                ids = np.full((len(part), width), pad_id, dtype=np.int64)
                mask = np.zeros((len(part), width), dtype=np.int64)
                for i, (_, w) in enumerate(part):
                    ids[i, : len(w.ids)], mask[i, : len(w.ids)] = w.ids, 1
                out = model(
                    input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
                ).logits.numpy()
                for i, (t, w) in enumerate(part):
                    logits[t].append(out[i, : len(w.ids)])
        model.train()
        return [
            [
                (s.start, s.end, s.label)
                for s in merge_windows(
                    text, list(zip(encs, lg, strict=True)), extractor.scheme, extractor.strategy
                )
            ]
            for text, encs, lg in zip(texts, encoded, logits, strict=True)
        ]

    log(
        f"offline full fine-tune: {len(rows)} texts ({len(examples)} windows), up to {epochs} epochs, lr {lr}"
    )
    start = time.perf_counter()
    best, best_state, steps, epochs_run, stopped = -1.0, None, 0, 0, "epochs"
    holdout_f1: list[float] = []
    model.train()
    for epoch in range(1, epochs + 1):
        epochs_run = epoch
        order = rng.permutation(len(examples))
        for b in range(0, len(order), bs):
            batch, y = examples.batch(order[b : b + bs])
            loss = model(**batch, labels=y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
            if time.perf_counter() - start > budget_s:
                stopped = "time_budget"
                break
        f1 = f1_of(val, predict([r.text for r in val])) if val else 0.0
        holdout_f1.append(round(f1, 4))
        log(
            f"offline full fine-tune: epoch {epoch}, {steps} steps, {time.perf_counter() - start:.0f}s, holdout F1 {f1:.3f}"
        )
        if f1 > best:
            best, best_state = f1, {k: v.detach().clone() for k, v in model.state_dict().items()}
        if stopped != "epochs":
            break
    seconds = time.perf_counter() - start
    if best_state is not None:
        model.load_state_dict(best_state)
    return {
        "f1_post_test": f1_of(split.post_test, predict([r.text for r in split.post_test])),
        "f1_pre_test": f1_of(split.pre_test, predict([r.text for r in split.pre_test])),
        "holdout_f1_per_epoch": holdout_f1,
        "texts": len(rows),
        "windows": len(examples),
        "steps": steps,
        "epochs_run": epochs_run,
        "stopped": stopped,
        "seconds": round(seconds, 1),
        "lr": lr,
    }


# ---- the whole part -------------------------------------------------------------------------------
def run_learning(
    bundle: Path,
    n: int = 2000,
    chunks: int = 4,
    seed: int = 0,
    threads: int = THREADS,
    precision: str = "fp32",
    offline_epochs: int = OFFLINE_EPOCHS,
    keep_adapter: Path | None = None,
    fast_learner: bool = True,
) -> dict[str, Any]:
    """Part (c): the learning keys (``LEARNING_KEYS``) and what they come from. ``keep_adapter``:
    where to copy the final served adapter (the run's work directory is removed)."""
    import torch

    from tools.workorders import workorder_dataset

    t_start = time.perf_counter()
    split = split_stream(workorder_dataset(n, seed=seed, drift=True), chunks)
    s = learner_settings()
    log(
        f"NER learning: {split.sizes()}; learner defaults lr {s.learning_rate}, {s.epochs} epochs, "
        f"batch {s.batch_size}, replay {s.replay_fraction}, lambda {s.anchor_lambda}, distill {s.distill_weight}"
    )
    torch_threads = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="bench-ner-learning-"))
    try:
        base_dir, base = train_base(bundle, split, work, seed, threads, fast_learner, precision)
        predictor = SpanPredictor(bundle, base_dir, precision, threads)
        try:
            base["f1_pre_test"] = f1_of(
                split.pre_test, predictor.spans(base_dir, [r.text for r in split.pre_test])
            )
            base["f1_post_test"] = f1_of(
                split.post_test, predictor.spans(base_dir, [r.text for r in split.post_test])
            )
            online = run_online(
                bundle, split, predictor, base_dir, work, seed, threads, precision, fast_learner
            )
            final = online.pop("final_adapter")
            online["final_adapter"] = final.name
            if keep_adapter is not None:
                # Parts (a) and (b) compare the transformer with torch: the copy drops the unit's
                # CRF and the gate's choice, so the engine serves its transformer.
                shutil.copytree(final, keep_adapter)
                for name in (SERVING, CRF_MODEL, CRF_CONFIG):
                    (keep_adapter / name).unlink(missing_ok=True)
            online["f1_post_test"] = f1_of(
                split.post_test, predictor.spans(final, [r.text for r in split.post_test])
            )
            online["f1_pre_test"] = f1_of(
                split.pre_test, predictor.spans(final, [r.text for r in split.pre_test])
            )
        finally:
            predictor.close()
        log("CRF refit before each chunk")
        crf = crf_prequential(split)
        offline = offline_full_finetune(bundle, split, seed, threads, epochs=offline_epochs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        torch.set_num_threads(torch_threads)
    for r, crf_f1 in zip(online["rounds"], crf["chunk_f1"], strict=True):
        r["crf_f1"] = crf_f1
    result: dict[str, Any] = {
        "f1_drift_online": online["f1_drift_online"],
        "crf_f1_drift": crf["crf_f1_drift"],
        "f1_offline_full_ft": offline["f1_post_test"],
        "ner_recovery_ratio": common.ratio(online["f1_post_test"], offline["f1_post_test"]),
        "forgetting_pts": points(base["f1_pre_test"], online["f1_pre_test"]),
        "f1_before_drift": base["f1_pre_test"],
        "f1_drift_no_learning": online["f1_drift_no_learning"],
        "f1_drift_online_minus_crf": online["f1_drift_online"] - crf["crf_f1_drift"],
        "f1_post_test_online": online["f1_post_test"],
        "f1_pre_test_online": online["f1_pre_test"],
        "sizes": split.sizes(),
        "n": n,
        "seed": seed,
        "precision": precision,
        "fast_learner": fast_learner,
        "served_per_chunk": [r["serving"] for r in online["rounds"]],
        "settings": {
            "lr": s.learning_rate,
            "epochs": s.epochs,
            "batch_size": s.batch_size,
            "replay_fraction": s.replay_fraction,
            "anchor_lambda": s.anchor_lambda,
            "distill_weight": s.distill_weight,
            "threads": threads,
        },
        "base": base,
        "online": online,
        "crf": crf,
        "offline": offline,
    }
    result["targets"] = targets(result)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    return result


def chunk_table(result: dict[str, Any]) -> str:
    rows = [
        [
            r["chunk"],
            r["texts"],
            common.fmt_num(r["prequential_f1"], 3),
            common.fmt_num(r["crf_f1"], 3),
            common.fmt_num(r["no_learning_f1"], 3),
            f"{r['candidate'].get('older', math.nan):.3f}/{r['candidate'].get('recent', math.nan):.3f}",
            f"{r['active'].get('older', math.nan):.3f}/{r['active'].get('recent', math.nan):.3f}",
            "yes" if r["promoted"] else "no: " + "; ".join(r["reasons"])[:60],
            common.fmt_num(r["round_seconds"], 0),
        ]
        for r in result["online"]["rounds"]
    ]
    return common.format_table(
        [
            "chunk",
            "texts",
            "F1 online",
            "F1 CRF",
            "F1 base",
            "cand old/rec",
            "serving old/rec",
            "promoted",
            "round s",
        ],
        rows,
        align="rrrrrllll",
    )
