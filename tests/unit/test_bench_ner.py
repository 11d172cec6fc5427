"""The NER benchmark end to end on tiny token bundles: every JSON key, a positive speedup,
entities found, exact span agreement of the engine with torch + peft at fp32, and the online
learning part (gated rounds, CRF refit, offline full fine-tune) filling its keys; its pure
helpers (the split, the replay, pooled F1) against hand counts."""

from __future__ import annotations

import io
import json

import pytest

from tools.bench import common, ner, ner_learning

KEYS = (
    "texts",
    "engine_texts_per_s",
    "pipeline_texts_per_s",
    "ner_speedup_vs_hf_pipeline",
    "precision",
    "entities_found",
    "span_f1_agreement_vs_torch_peft",
    "span_f1_agreement_fp32",
    "span_f1_agreement_int8",
    "f1_drift_online",
    "crf_f1_drift",
    "crf_f1_drift_pre_only",
    "f1_offline_full_ft",
    "ner_recovery_ratio",
    "forgetting_pts",
    "learning",
    "machine",
    "seconds",
)


@pytest.fixture(scope="module")
def tiny_token_bundle(tmp_path_factory):
    from tests.tiny import make_tiny_bert

    root = tmp_path_factory.mktemp("bench-ner")
    return ner.ensure_ner_bundle(
        root / "bundle", model_path=make_tiny_bert(root / "hf-model"), precisions=("fp32",), max_length=48
    )


def test_bench_on_a_tiny_token_bundle(tiny_token_bundle):
    texts = ner.load_texts(40, seed=1)
    result = ner.run(
        tiny_token_bundle,
        texts,
        precision="auto",
        repeats=1,
        agreement_texts=40,
        crf_n=60,
        settle_s=0.0,
        skip_learning=True,
    )
    out = io.StringIO()
    common.print_json_line(result, out)
    parsed = json.loads(out.getvalue().splitlines()[-1])
    assert set(KEYS) <= set(parsed)
    assert parsed["texts"] == 40 and parsed["precision"] == "fp32"
    assert parsed["ner_speedup_vs_hf_pipeline"] > 0
    assert parsed["entities_found"] > 0
    # Same fp32 graph as torch + peft on the same windows, same decoder: the same spans exactly.
    assert parsed["span_f1_agreement_fp32"] == 1.0 == parsed["span_f1_agreement_vs_torch_peft"]
    assert parsed["agreement"]["torch_entities"] > 0
    assert parsed["span_f1_agreement_int8"] is None  # the bundle has no INT8 graph
    assert 0.0 <= parsed["crf_f1_drift_pre_only"] <= 1.0
    for key in ner.LEARNING_KEYS:
        assert parsed[key] is None
    assert parsed["learning"] == ner.LEARNING_NOTE and parsed["ner_learning"] is None
    assert isinstance(parsed["machine"]["cpu_flags"], list)
    assert parsed["machine"]["torch_threads"] == parsed["machine"]["threads"]
    assert "ner" in ner.report(result)


def test_cli_lists_the_benchmark():
    from tools.bench.__main__ import BENCHMARKS

    assert "ner" in BENCHMARKS


# ---- part (c): online learning ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_learning_bundle(tmp_path_factory):
    """A tiny BERT the learner can teach entities (``make_tiny_token_bert``), as the learner's tests use."""
    from tests.tiny import build_tiny_token_bundle

    return build_tiny_token_bundle(tmp_path_factory.mktemp("bench-ner-learning"))


def test_learning_part_fills_its_keys(tiny_learning_bundle):
    texts = ner.load_texts(20, seed=1)
    result = ner.run(
        tiny_learning_bundle,
        texts,
        agreement_texts=10,
        crf_n=60,
        learning_n=300,
        chunks=3,
        skip_throughput=True,
        offline_epochs=2,
    )
    out = io.StringIO()
    common.print_json_line(result, out)
    parsed = json.loads(out.getvalue().splitlines()[-1])
    assert set(KEYS) <= set(parsed)
    for key in ner.THROUGHPUT_KEYS:
        assert parsed[key] is None
    for key in ("f1_drift_online", "crf_f1_drift", "f1_offline_full_ft"):
        assert 0.0 <= parsed[key] <= 1.0, key
    # The CRF learns these work orders from a few hundred rows: it is no straw man.
    assert parsed["crf_f1_drift"] > 0.3
    assert parsed["ner_recovery_ratio"] >= 0.0 and -100.0 <= parsed["forgetting_pts"] <= 100.0
    learning = parsed["ner_learning"]
    assert learning["sizes"]["chunks"] == [40, 40, 40] and learning["sizes"]["post_test"] == 30
    rounds = learning["online"]["rounds"]
    assert [r["chunk"] for r in rounds] == [0, 1, 2]
    for r in rounds:
        assert 0.0 <= r["prequential_f1"] <= 1.0 and 0.0 <= r["crf_f1"] <= 1.0
        assert r["n_new"] >= 36 and r["n_replay"] == r["n_new"]  # replay_fraction 0.5
        assert isinstance(r["promoted"], bool) and r["promoted"] == (not r["reasons"])
        assert r["round_seconds"] >= r["seconds"] >= 0
    assert learning["online"]["promoted"] == sum(r["promoted"] for r in rounds)
    assert learning["offline"]["epochs_run"] == 2 and len(learning["offline"]["holdout_f1_per_epoch"]) == 2
    assert set(parsed["targets"]) == set(ner_learning.TARGETS)
    assert parsed["learning"].startswith("measured")
    report = ner.report(result)
    assert "crf_f1_drift" in report and "promoted" in report


def _orders(n_pre: int, n_post: int):
    from tools.workorders import WorkOrder

    return [
        WorkOrder(f"t{i}", ((0, 1, "ASSET"),), "site0", float(i), drifted=i >= n_pre)
        for i in range(n_pre + n_post)
    ]


def test_split_cuts_one_stream_in_time_order():
    split = ner_learning.split_stream(_orders(100, 100), n_chunks=4)
    assert split.sizes() == {
        "pre_train": 72,
        "pre_holdout": 8,
        "pre_test": 20,
        "chunks": [20, 20, 20, 20],
        "chunk_holdout": [2, 2, 2, 2],
        "post_test": 20,
    }
    index = [int(r.text[1:]) for r in split.pre_test + [r for c in split.chunks for r in c] + split.post_test]
    assert index == sorted(index) and index[0] == 80 and index[-1] == 199
    assert [int(r.text[1:]) for r in split.post_test] == list(range(180, 200))  # after every chunk
    with pytest.raises(ValueError, match="at least 2 chunks"):
        ner_learning.split_stream(_orders(10, 10), n_chunks=1)


def test_replay_is_uniform_and_sized_like_the_round():
    rows = [ner_learning.SpanRow(f"t{i}", ()) for i in range(100)]
    texts, spans, n_new, n_replay = ner_learning.span_training_set(rows[90:], rows[:90], 0.5, seed=0)
    assert (n_new, n_replay) == (10, 10) and len(texts) == len(spans) == 20
    assert set(texts) >= {f"t{i}" for i in range(90, 100)}
    _, _, _, n_all = ner_learning.span_training_set(rows[90:], rows[:5], 0.5, seed=0)
    assert n_all == 5  # fewer older rows than asked: all of them
    assert ner_learning.span_training_set(rows[90:], rows[:90], 0.0, seed=0)[3] == 0


def test_pooled_f1_pools_spans_not_chunk_scores():
    a, b = (0, 1, "ASSET"), (2, 3, "PART")
    gold = [[[a]], [[a, b], [a, b], [a, b]]]
    pred = [[[]], [[a, b], [a, b], []]]
    # Chunk 1 alone: 4 of 4 predicted right, 4 of 6 gold found: F1 0.8 (a mean over texts would differ).
    assert ner_learning.pooled_f1(gold, pred, skip_first=1) == pytest.approx(0.8)
    # With chunk 0: 4 of 4 predicted, 4 of 7 gold.
    assert ner_learning.pooled_f1(gold, pred) == pytest.approx(2 * (4 / 7) / (1 + 4 / 7))
