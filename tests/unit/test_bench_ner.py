"""The NER benchmark end to end on a tiny token bundle: every JSON key, a positive speedup,
entities found, and exact span agreement of the engine with torch + peft at fp32."""

from __future__ import annotations

import io
import json

import pytest

from tools.bench import common, ner

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
        tiny_token_bundle, texts, precision="auto", repeats=1, agreement_texts=40, crf_n=60, settle_s=0.0
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
    assert 0.0 <= parsed["crf_f1_drift"] <= 1.0
    for key in ner.LEARNING_KEYS:
        assert parsed[key] is None
    assert parsed["learning"] == ner.LEARNING_NOTE
    assert isinstance(parsed["machine"]["cpu_flags"], list)
    assert parsed["machine"]["torch_threads"] == parsed["machine"]["threads"]
    assert "ner" in ner.report(result)


def test_cli_lists_the_benchmark():
    from tools.bench.__main__ import BENCHMARKS

    assert "ner" in BENCHMARKS
