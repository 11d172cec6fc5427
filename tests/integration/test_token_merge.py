"""A token-classification bundle's adapter folded into its weights: the merged session serves the
same spans as the LoRA path (fp32), and its checks compare every real token's tag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.engine import EngineConfig, InferenceEngine
from tools.workorders import workorder_dataset

ENTITY_LABELS = json.loads((Path(__file__).parents[2] / "models" / "entities.json").read_text())["labels"]
TEXTS = [wo.text for wo in workorder_dataset(40, seed=5)]
LONG = " ; ".join(TEXTS[:6])  # several windows of the 48-token model


@pytest.fixture(scope="module")
def token_bundle_and_adapter(tmp_path_factory):
    from tests.tiny import build_tiny_token_bundle, make_random_adapter

    root = tmp_path_factory.mktemp("tiny-token-merge")
    bundle = build_tiny_token_bundle(root, precisions=("fp32", "int8"))
    adapter = make_random_adapter(bundle, root / "adapter", seed=7, version="t1", b_std=0.5, head_std=2.0)
    return bundle, adapter


def _open(bundle: Path, adapter: Path | None, precision: str, merge: bool) -> InferenceEngine:
    config = EngineConfig(precision=precision, provider="cpu", cache_size=0, merge_adapters=merge)
    return InferenceEngine.open(bundle, config, adapter_dir=adapter, calibration_texts=TEXTS)


def test_merged_token_session_serves_the_lora_paths_spans(token_bundle_and_adapter):
    bundle, adapter = token_bundle_and_adapter
    with _open(bundle, adapter, "fp32", merge=False) as lora:
        expected = lora.predict([*TEXTS, LONG])
        assert lora.serving_path == "lora"
    with _open(bundle, adapter, "fp32", merge=True) as engine:
        state = engine.wait_merged(120)
        assert state["state"] == "serving", state
        assert engine.serving_path == "merged"
        verify = state["verify"]
        # Rows are the real tokens of the calibration texts, not the texts.
        assert verify["rows"] > 5 * len(TEXTS) and verify["max_abs_logit_diff_vs_lora_path"] <= 1e-4
        got = engine.predict([*TEXTS, LONG])
    assert sum(len(s) for s in expected) > 20
    # Each answer names the adapter that found it (the daemon publishes that, not the engine's now).
    assert {a.adapter_version for a in [*expected, *got]} == {"t1"}
    for want, have in zip(expected, got, strict=True):
        assert [(s.start, s.end, s.label) for s in have] == [(s.start, s.end, s.label) for s in want]
        assert [s.score for s in have] == pytest.approx([s.score for s in want], abs=1e-4)


def test_merged_int8_token_session_is_checked_per_token(token_bundle_and_adapter):
    bundle, adapter = token_bundle_and_adapter
    with _open(bundle, adapter, "int8", merge=True) as engine:
        state = engine.wait_merged(180)
        verify = state.get("verify") or {}
        # Served merged or refused, the decision was taken on per-token tag agreement.
        assert state["state"] in ("serving", "failed"), state
        assert verify["rows"] > 5 * len(TEXTS) and 0.0 <= verify["agreement_vs_fp32"] <= 1.0
        assert (state["state"] == "serving") == verify["ok"]
        assert engine.serving_path == ("merged" if verify["ok"] else "lora")
        spans = engine.predict(TEXTS)
    assert len(spans) == len(TEXTS)
