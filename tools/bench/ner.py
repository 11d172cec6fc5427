"""``python -m tools.bench ner``: entity extraction, the engine against Hugging Face's pipeline, on CPU.

What runs (CPU; the engine's intra-op threads are the physical cores, and torch gets the same count):

1. a token-classification bundle (``build/bundle-minilm-ner``: all-MiniLM-L6-v2, the entity labels of
   ``models/entities.json``, BIO, fp32 + INT8) is built when missing, and a random adapter
   (``tests.tiny.make_random_adapter``: random LoRA B, head perturbed by ``--head-std``) stands in
   for a trained one: it has to find entities for the decoding work to be measured, so a run that
   finds none fails;
2. throughput on ``--texts`` work orders (or the texts of ``--dataset``, span JSONL): the engine
   (``--precision``, adapter on the LoRA path, cache off; all texts submitted in requests of 64 at
   once, then awaited, as a burst queues up) against ``transformers.pipeline("token-classification",
   aggregation_strategy="first", batch_size=32)`` on the adapter merged into the weights with
   ``merge_and_unload`` (the fastest torch a team would serve; sdpa attention), tokenizer windows
   as the engine's (max_length and stride). One run each per round, in a seeded shuffled order
   with a settle pause (``common.run_interleaved``); texts/s from the median of ``--repeats``
   rounds; ``ner_speedup_vs_hf_pipeline`` = engine / pipeline;
3. agreement on ``--agreement-texts`` (500) texts: the engine's spans against torch + peft fp32
   (the unmerged ``PeftModel`` on each window alone, decoded by the same ``SpanExtractor``), span F1
   with torch as gold, per precision the bundle has;
4. the CRF baseline trained once: on the pre-drift half of ``workorder_dataset(--crf-n, drift=True)``,
   scored on the drifted half (``crf_f1_drift_pre_only``);
5. online entity learning under drift (``tools.bench.ner_learning``, its docstring has the protocol)
   on ``workorder_dataset(--learning-n, drift=True)`` in ``--chunks`` drifted chunks: the learner's
   gated LoRA rounds (``f1_drift_online``, pooled prequential entity F1 over the chunks after the
   first) against the CRF refit on everything seen before each chunk (``crf_f1_drift``), an offline
   full fine-tune on every train row (``f1_offline_full_ft``), ``ner_recovery_ratio`` and
   ``forgetting_pts``; per chunk under ``ner_learning``. ``--skip-learning`` leaves those keys null,
   ``--skip-throughput`` leaves the throughput keys null (part 1 is measured elsewhere too).

Output: a table on stdout; with ``--json`` the last stdout line is one JSON object (keys are a contract).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.bench import common, ner_learning
from tools.bench.common import log

DEFAULT_BUNDLE = Path("build/bundle-minilm-ner")
# The daemon calibrates on up to 256 holdout texts; these come after the measured ones (--texts).
CALIBRATION_TEXTS = 256
CALIBRATION_OFFSET = 20_000
ENTITIES_FILE = Path(__file__).resolve().parents[2] / "models" / "entities.json"
REQUEST_TEXTS = 64
HF_BATCH = 32
ENGINE = "engine"
PIPELINE = "hf_pipeline"
LEARNING_KEYS = ner_learning.LEARNING_KEYS
LEARNING_NOTE = "skipped (--skip-learning)"
THROUGHPUT_KEYS = (
    "engine_texts_per_s",
    "pipeline_texts_per_s",
    "ner_speedup_vs_hf_pipeline",
    "entities_found",
)


def entity_labels(path: Path = ENTITIES_FILE) -> list[str]:
    return list(json.loads(Path(path).read_text())["labels"])


def ensure_ner_bundle(
    bundle: Path,
    model_path: Path | None = None,
    precisions: tuple[str, ...] = ("fp32", "int8"),
    max_length: int = 128,
) -> Path:
    """A token-classification bundle for the entity labels at ``bundle``, built when missing."""
    from agent.bundle import MANIFEST, load_manifest

    bundle = Path(bundle)
    if not (bundle / MANIFEST).is_file():
        from agent.build import build_bundle

        log(f"bundle {bundle} missing: building it (token-classification, BIO, {', '.join(precisions)})")
        build_bundle(
            bundle,
            model_path=model_path,
            labels=entity_labels(),
            task="token-classification",
            tag_scheme="BIO",
            precisions=precisions,
            max_length=max_length,
        )
    manifest = load_manifest(bundle)
    if manifest.task != "token-classification":
        raise SystemExit(f"{bundle} is a {manifest.task} bundle; this benchmark needs token-classification")
    return bundle


def make_adapter(bundle: Path, out: Path, seed: int = 0, head_std: float = 2.0) -> Path:
    """A random LoRA adapter whose head is perturbed enough that the model tags entities."""
    from tests.tiny import make_random_adapter

    return make_random_adapter(bundle, out, seed, "bench-ner", head_std=head_std)


def load_texts(n: int, seed: int = 0, dataset: Path | None = None) -> list[str]:
    """``n`` work-order texts, or the first ``n`` texts of a span JSONL file."""
    if dataset is not None:
        from tools.replay import load_span_jsonl

        texts = [text for text, _ in load_span_jsonl(dataset)][:n]
        if not texts:
            raise SystemExit(f"{dataset}: no texts")
        return texts
    from tools.workorders import workorder_dataset

    return [wo.text for wo in workorder_dataset(n, seed=seed)]


def span_tuples(spans: Sequence[Any]) -> list[tuple[int, int, str]]:
    return [(s.start, s.end, s.label) for s in spans]


@functools.lru_cache(maxsize=4)
def calibration_texts(seed: int = 0, n: int = CALIBRATION_TEXTS) -> list[str]:
    """The plant's own texts the daemon hands its engine (recent holdout samples) for the precision
    trial and the merged INT8 check: work orders of the same sites as the measured texts (one
    dataset seed), past the measured ones."""
    from tools.workorders import workorder_dataset

    return [wo.text for wo in workorder_dataset(CALIBRATION_OFFSET + n, seed=seed)[CALIBRATION_OFFSET:]]


def _open_engine(bundle: Path, adapter: Path, precision: str, threads: int | None = None):
    from agent.engine import EngineConfig, InferenceEngine

    # The engine's default batching; cache off so that every pass really runs every text.
    config = EngineConfig(precision=precision, provider="cpu", cache_size=0, intra_op_threads=threads)
    engine = InferenceEngine.open(bundle, config, adapter_dir=adapter, calibration_texts=calibration_texts())
    # Measured as the box serves between promotions: on the merged session once it is built (or on
    # the LoRA path where the merge's check refused it; `serving_path` says which).
    engine.wait_merged(600)
    return engine


def _engine_spans(engine, texts: list[str]) -> list[tuple[Any, ...]]:
    futures = [engine.submit(texts[i : i + REQUEST_TEXTS]) for i in range(0, len(texts), REQUEST_TEXTS)]
    return [spans for f in futures for spans in f.result(timeout=1800)]


# ---- throughput -------------------------------------------------------------------------------------
def throughput(
    bundle: Path,
    adapter: Path,
    texts: list[str],
    precision: str = "auto",
    repeats: int = 3,
    seed: int = 0,
    settle_s: float = 0.06,
) -> dict[str, Any]:
    """The engine vs the HF token-classification pipeline on ``texts``, interleaved per round."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, pipeline

    from agent.bundle import load_manifest
    from agent.entity_serving import DEFAULT_STRIDE_FRACTION
    from agent.learner.model import load_base_model

    manifest = load_manifest(bundle)
    engine = _open_engine(bundle, adapter, precision)
    try:
        threads = int(engine.stats()["intra_op_threads"])
        common.limit_threads(threads)  # torch gets what the engine has
        # Merged (merge_and_unload), not the PeftModel: the LoRA folded into the weights is the
        # fastest torch a team would serve, so the speedup is not inflated by peft's extra matmuls.
        merged = PeftModel.from_pretrained(load_base_model(bundle), str(adapter)).merge_and_unload().eval()
        merged.set_attn_implementation("sdpa")  # transformers' default, faster than the eager of the bundle
        # Same windows as the engine: long texts cut at max_length with the engine's stride.
        tok = AutoTokenizer.from_pretrained(bundle / "tokenizer", model_max_length=manifest.max_length)
        stride = max(1, int(manifest.max_length * DEFAULT_STRIDE_FRACTION))
        pipe = pipeline(
            "token-classification",
            model=merged,
            tokenizer=tok,
            aggregation_strategy="first",
            device=-1,
            batch_size=HF_BATCH,
            stride=stride,
        )
        outputs: dict[str, list] = {}
        last_s: dict[str, float] = {}  # for the progress line of each round

        def run_engine() -> None:
            t0 = time.perf_counter()
            outputs[ENGINE] = _engine_spans(engine, texts)
            last_s[ENGINE] = time.perf_counter() - t0

        def run_pipeline() -> None:
            t0 = time.perf_counter()
            with torch.inference_mode():
                outputs[PIPELINE] = pipe(texts)
            last_s[PIPELINE] = time.perf_counter() - t0

        warm = texts[:REQUEST_TEXTS]
        _engine_spans(engine, warm)
        with torch.inference_mode():
            pipe(warm)
        samples = common.run_interleaved(
            {ENGINE: run_engine, PIPELINE: run_pipeline},
            repeats,
            warmup=0,
            settle_s=settle_s,
            seed=seed,
            on_round=lambda r: log(
                f"round {r + 1}/{repeats}: "
                + ", ".join(f"{k} {len(texts) / v:.0f} texts/s" for k, v in last_s.items())
            ),
        )
        stats = engine.stats()
        engine_precision = engine.precision
        serving_path = engine.serving_path
    finally:
        engine.close()
    engine_tps = len(texts) / (common.median(samples[ENGINE]) / 1000.0)
    pipe_tps = len(texts) / (common.median(samples[PIPELINE]) / 1000.0)
    engine_spans = [span_tuples(s) for s in outputs[ENGINE]]
    pipe_spans = [[(e["start"], e["end"], e["entity_group"]) for e in out] for out in outputs[PIPELINE]]
    from agent.entities import span_f1

    return {
        "texts": len(texts),
        "engine_texts_per_s": engine_tps,
        "pipeline_texts_per_s": pipe_tps,
        "ner_speedup_vs_hf_pipeline": common.ratio(engine_tps, pipe_tps),
        "engine_seconds": [round(ms / 1000.0, 3) for ms in samples[ENGINE]],
        "pipeline_seconds": [round(ms / 1000.0, 3) for ms in samples[PIPELINE]],
        "precision": engine_precision,
        "serving_path": serving_path,
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "entities_found": sum(len(s) for s in engine_spans),
        "pipeline_entities_found": sum(len(s) for s in pipe_spans),
        # Not a target: the pipeline runs the merged fp32 model, the engine its precision on the LoRA path.
        "span_f1_engine_vs_hf_pipeline": float(span_f1(pipe_spans, engine_spans)["f1"]),
        "engine_stage_ms": stats["stage_ms"],
        "engine_runs": stats["runs"],
        "engine_padded_tokens": stats["padded_tokens"],
        "engine_real_tokens": stats["real_tokens"],
        "mode": f"engine: requests of {REQUEST_TEXTS} submitted at once then awaited, cache off; "
        f"pipeline: batch_size {HF_BATCH}, merged model, sdpa",
    }


# ---- agreement --------------------------------------------------------------------------------------
def torch_peft_spans(bundle: Path, adapter: Path, texts: list[str]) -> list[list[tuple[int, int, str]]]:
    """Reference spans: the unmerged PeftModel (fp32) on each window alone, the engine's decoder."""
    import torch
    from peft import PeftModel

    from agent.bundle import load_manifest
    from agent.entities import merge_windows
    from agent.entity_serving import SpanExtractor
    from agent.learner.model import load_base_model

    manifest = load_manifest(bundle)
    extractor = SpanExtractor(bundle, manifest)
    model = PeftModel.from_pretrained(load_base_model(bundle), str(adapter)).eval()
    out = []
    # Untimed, so one thread: batch-1 windows are many tiny ops, and with every core's thread in
    # each op's barrier, a core taken by another process stalls all of them (20x slower seen).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for text, encodings in zip(texts, extractor.encode(texts), strict=True):
                logits = []
                for enc in encodings:
                    ids = torch.tensor([enc.ids])
                    logits.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].numpy())
                # merge_windows is what SpanExtractor.decode runs, without its answer wrapper.
                spans = merge_windows(
                    text, list(zip(encodings, logits, strict=True)), extractor.scheme, extractor.strategy
                )
                out.append(span_tuples(spans))
    finally:
        torch.set_num_threads(threads)
    return out


def agreement(bundle: Path, adapter: Path, texts: list[str], threads: int | None = None) -> dict[str, Any]:
    """Span F1 of the engine at each of the bundle's CPU precisions, torch + peft fp32 as gold."""
    from agent.bundle import load_manifest
    from agent.entities import span_f1

    gold = torch_peft_spans(bundle, adapter, texts)
    result: dict[str, Any] = {"texts": len(texts), "torch_entities": sum(len(g) for g in gold)}
    for precision in ("fp32", "int8"):
        if precision not in load_manifest(bundle).precisions:
            result[f"span_f1_agreement_{precision}"] = None
            continue
        engine = _open_engine(bundle, adapter, precision, threads)
        try:
            pred = [span_tuples(s) for s in _engine_spans(engine, texts)]
        finally:
            engine.close()
        scores = span_f1(gold, pred)
        result[f"span_f1_agreement_{precision}"] = float(scores["f1"])
        result[f"exact_texts_{precision}"] = sum(g == p for g, p in zip(gold, pred, strict=True)) / len(texts)
    return result


# ---- CRF baseline under drift ---------------------------------------------------------------------
def crf_drift(n: int = 4000, seed: int = 0, sites: int = 3) -> dict[str, Any]:
    """The CRF trained on the pre-drift half of a drifting work-order stream, scored on the drifted half."""
    from tools.bench.crf import CrfBaseline, entity_f1
    from tools.workorders import workorder_dataset

    data = workorder_dataset(n, seed=seed, sites=sites, drift=True)
    pre = [wo for wo in data if not wo.drifted]
    post = [wo for wo in data if wo.drifted]
    t0 = time.perf_counter()
    crf = CrfBaseline().fit((wo.text, wo.entities) for wo in pre)
    fit_s = time.perf_counter() - t0
    pred = crf.predict(wo.text for wo in post)
    return {
        "crf_f1_drift_pre_only": entity_f1([wo.entities for wo in post], pred),
        "n_train": len(pre),
        "n_test": len(post),
        "fit_s": round(fit_s, 2),
    }


# ---- the whole run ----------------------------------------------------------------------------------
def _serving_precision(bundle: Path, adapter: Path, precision: str) -> tuple[str, int]:
    """What the engine serves at ``precision`` and its intra-op threads, without the throughput runs."""
    engine = _open_engine(bundle, adapter, precision)
    try:
        return engine.precision, int(engine.stats()["intra_op_threads"])
    finally:
        engine.close()


def run(
    bundle: Path,
    texts: list[str],
    precision: str = "auto",
    repeats: int = 3,
    agreement_texts: int = 500,
    crf_n: int = 4000,
    seed: int = 0,
    head_std: float = 2.0,
    settle_s: float = 0.06,
    learning_n: int = 2000,
    chunks: int = 4,
    skip_learning: bool = False,
    fast_learner: bool = True,
    skip_throughput: bool = False,
    offline_epochs: int = ner_learning.OFFLINE_EPOCHS,
) -> dict[str, Any]:
    """Every measurement on a token-classification ``bundle``; the JSON object."""
    t_start = time.perf_counter()
    machine = common.machine_info()
    work = Path(tempfile.mkdtemp(prefix="bench-ner-"))
    tp: dict[str, Any] | None = None
    learning: dict[str, Any] | None = None
    try:
        if not skip_learning:
            # First, so that (a) and (b) measure the adapter the box ends up serving: a trained
            # adapter's tags are confident where a random one's are near ties (INT8 flips those).
            learning = ner_learning.run_learning(
                bundle,
                learning_n,
                chunks,
                seed,
                offline_epochs=offline_epochs,
                keep_adapter=work / "trained",
                fast_learner=fast_learner,
            )
            adapter, adapter_kind = work / "trained", "trained online (part c's final adapter)"
        else:
            adapter = make_adapter(bundle, work / "adapter", seed=seed, head_std=head_std)
            adapter_kind = f"random (head_std {head_std})"
        if skip_throughput:
            served, threads = _serving_precision(bundle, adapter, precision)
            common.limit_threads(threads)
        else:
            log(f"throughput: {len(texts)} texts, {repeats} interleaved rounds, precision {precision}")
            tp = throughput(bundle, adapter, texts, precision, repeats, seed, settle_s)
            served, threads = tp["precision"], tp["threads"]
            log(
                f"engine {tp['engine_texts_per_s']:.0f} texts/s ({tp['precision']}), pipeline "
                f"{tp['pipeline_texts_per_s']:.0f} texts/s, {tp['entities_found']} entities"
            )
        agree_texts = texts[:agreement_texts]
        log(f"agreement on {len(agree_texts)} texts vs torch + peft fp32")
        agree = agreement(bundle, adapter, agree_texts, threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"CRF baseline under drift, trained once ({crf_n} work orders)")
    crf = crf_drift(crf_n, seed)
    import torch

    machine.update(
        {
            "threads": threads,
            "torch_threads": torch.get_num_threads(),
            "loadavg_max_during_run": max(common.loadavg_seen(), default=None),
        }
    )
    result: dict[str, Any] = {
        "texts": len(texts),
        **{k: (tp[k] if tp else None) for k in THROUGHPUT_KEYS},
        "precision": served,
        "span_f1_agreement_vs_torch_peft": agree.get(f"span_f1_agreement_{served}"),
        "span_f1_agreement_fp32": agree["span_f1_agreement_fp32"],
        "span_f1_agreement_int8": agree["span_f1_agreement_int8"],
        **{k: (learning[k] if learning else None) for k in LEARNING_KEYS},
        "crf_f1_drift_pre_only": crf["crf_f1_drift_pre_only"],
        "learning": LEARNING_NOTE if learning is None else _learning_note(learning),
        "throughput": tp,
        "agreement": agree,
        "crf": crf,
        "ner_learning": learning,
        "targets": learning["targets"] if learning else None,
        "repeats": repeats,
        "adapter": adapter_kind,
        "head_std": head_std,
        "machine": machine,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    return result


def _learning_note(learning: dict[str, Any]) -> str:
    sizes = learning["sizes"]
    return (
        f"measured: {len(sizes['chunks'])} drifted chunks of {sizes['chunks'][0]}, "
        f"{learning['online']['promoted']} rounds promoted, {learning['seconds']:.0f}s"
    )


def report(result: dict[str, Any]) -> str:
    rows = [
        ["engine texts/s", common.fmt_num(result["engine_texts_per_s"], 0)],
        ["HF pipeline texts/s", common.fmt_num(result["pipeline_texts_per_s"], 0)],
        ["ner_speedup_vs_hf_pipeline", common.fmt_num(result["ner_speedup_vs_hf_pipeline"], 2)],
        ["precision", result["precision"]],
        ["entities_found", result["entities_found"]],
        ["span_f1_agreement_vs_torch_peft", common.fmt_num(result["span_f1_agreement_vs_torch_peft"], 4)],
        ["span_f1_agreement_fp32", common.fmt_num(result["span_f1_agreement_fp32"], 4)],
        ["span_f1_agreement_int8", common.fmt_num(result["span_f1_agreement_int8"], 4)],
        ["crf_f1_drift_pre_only", common.fmt_num(result["crf_f1_drift_pre_only"], 4)],
        *[[k, common.fmt_num(result[k], 4)] for k in LEARNING_KEYS],
        ["online learning", result["learning"]],
    ]
    out = common.format_table(["metric", "value"], rows, align="lr")
    learning = result.get("ner_learning")
    if learning:
        out += (
            "\n\n" + ner_learning.chunk_table(learning) + "\n\n" + common.targets_table(learning["targets"])
        )
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench ner", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="token bundle (built if missing)")
    p.add_argument("--texts", type=int, default=5000, help="texts for the throughput runs")
    p.add_argument(
        "--dataset", type=Path, default=None, help="span JSONL whose texts replace the work orders"
    )
    p.add_argument("--precision", choices=("auto", "fp32", "int8"), default="auto", help="the engine's")
    p.add_argument("--repeats", type=int, default=3, help="interleaved throughput rounds (median)")
    p.add_argument("--agreement-texts", type=int, default=500)
    p.add_argument("--crf-n", type=int, default=4000, help="work orders of the CRF drift baseline")
    p.add_argument("--head-std", type=float, default=2.0, help="the random adapter's head perturbation")
    p.add_argument("--learning-n", type=int, default=2000, help="work orders of the online learning part")
    p.add_argument("--chunks", type=int, default=4, help="drifted chunks of the online learning part")
    p.add_argument(
        "--offline-epochs",
        type=int,
        default=ner_learning.OFFLINE_EPOCHS,
        help="of the offline full fine-tune",
    )
    p.add_argument("--skip-learning", action="store_true", help="leave the learning keys null")
    p.add_argument(
        "--no-fast-learner",
        action="store_true",
        help="part (c) without the unit's CRF (learning.fast_learner off): the transformer alone serves",
    )
    p.add_argument("--skip-throughput", action="store_true", help="leave the throughput keys null")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    bundle = ensure_ner_bundle(args.bundle)
    texts = load_texts(args.texts, args.seed, args.dataset)
    result = run(
        bundle,
        texts,
        precision=args.precision,
        repeats=args.repeats,
        agreement_texts=args.agreement_texts,
        crf_n=args.crf_n,
        seed=args.seed,
        head_std=args.head_std,
        learning_n=args.learning_n,
        chunks=args.chunks,
        skip_learning=args.skip_learning,
        fast_learner=not args.no_fast_learner,
        skip_throughput=args.skip_throughput,
        offline_epochs=args.offline_epochs,
    )
    try:
        print(report(result), flush=True)
    finally:  # a report bug must not lose the figures
        if args.json:
            common.print_json_line(result)
    if result["throughput"] is not None and not result["entities_found"]:
        log(
            f"the engine found no entities: the throughput excludes decoding; raise --head-std ({args.head_std})"
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
