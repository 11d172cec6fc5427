"""The learner on span samples: char spans to token labels on the serving windows, real torch
training of LoRA + the per-token head, evaluated as the box answers (ONNX Runtime spans, entity F1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.entities import SpanTuple, TagScheme, token_labels
from agent.entity_serving import window_tokenizer
from agent.learner.policy import GatePolicy, evaluate_spans, promotion_decision
from agent.learner.round import evaluate_adapter
from agent.learner.train import TrainConfig, train_adapter
from tools.workorders import workorder_dataset

ENTITY_LABELS = json.loads((Path(__file__).parents[2] / "models" / "entities.json").read_text())["labels"]


@pytest.fixture(scope="module")
def token_bundle(tmp_path_factory):
    from tests.tiny import build_tiny_token_bundle

    return build_tiny_token_bundle(tmp_path_factory.mktemp("tiny-token-learner"))


def spans_of(orders) -> list[list[SpanTuple]]:
    return [list(wo.entities) for wo in orders]


def test_training_labels_are_the_serving_windows_tags(token_bundle):
    """Every window of a long text is a training example; its first-piece tags decode back to the
    spans that window covers."""
    from agent.bundle import load_manifest
    from agent.learner.train import _TokenExamples

    manifest = load_manifest(token_bundle)
    orders = workorder_dataset(5, seed=1)
    long_text = " ; ".join(wo.text for wo in orders)
    offset, long_spans = 0, []
    for wo in orders:
        long_spans += [(start + offset, end + offset, label) for start, end, label in wo.entities]
        offset += len(wo.text) + 3
    examples = _TokenExamples(token_bundle, manifest, [long_text], [long_spans])
    windows = window_tokenizer(token_bundle, manifest).encode(long_text)
    assert len(examples) == 1 + len(windows.overflowing) > 1
    scheme = TagScheme(ENTITY_LABELS, "BIO")
    first = token_labels(windows, long_spans, scheme)
    assert examples.rows[0] == (windows.ids, first)
    tagged = [scheme.tags[t] for t in first if t not in (-100, 0)]
    assert tagged and all(t[2:] in ENTITY_LABELS for t in tagged)
    with pytest.raises(ValueError, match="entity labels not in the bundle"):
        _TokenExamples(token_bundle, manifest, ["pump P-1 leaking"], [[(0, 4, "WIDGET")]])


def test_a_round_on_span_samples_raises_entity_f1_and_the_gate_promotes_it(token_bundle, tmp_path):
    # One site mix: each dataset seed draws its own site vocabularies.
    data = workorder_dataset(720, seed=0)
    train, holdout = data[:600], data[600:]
    slices = {"older": [(wo.text, s) for wo, s in zip(holdout, spans_of(holdout), strict=True)]}
    base = evaluate_adapter(str(token_bundle), None, "fp32", slices)["older"]
    result = train_adapter(
        token_bundle,
        [wo.text for wo in train],
        spans_of(train),
        tmp_path / "cand",
        "v1",
        TrainConfig(epochs=8, lr=1e-2, batch_size=16, seed=0, anchor_lambda=1e-3),
        val=([wo.text for wo in holdout[:40]], spans_of(holdout[:40])),
    )
    assert result.steps > 0 and result.best_val_accuracy is not None
    cand = evaluate_adapter(str(token_bundle), str(tmp_path / "cand"), "fp32", slices)["older"]
    assert cand.accuracy > base.accuracy + 0.15, (base.accuracy, cand.accuracy)
    assert set(cand.per_class) <= set(ENTITY_LABELS) and sum(cand.per_class_count.values()) > 100
    assert promotion_decision({"older": cand}, {"older": base}, GatePolicy()).promote
    # The gate refuses the base model against the trained one: F1 per label is what it compares.
    refused = promotion_decision({"older": base}, {"older": cand}, GatePolicy())
    assert not refused.promote and any("class" in r for r in refused.reasons)

    # Continuing from the candidate with distillation toward it: the loss path for per-token
    # teacher logits runs and the F1 it had is kept.
    more = workorder_dataset(920, seed=0)[720:]
    train_adapter(
        token_bundle,
        [wo.text for wo in more],
        spans_of(more),
        tmp_path / "cand2",
        "v2",
        TrainConfig(epochs=2, lr=1e-3, seed=0, anchor_lambda=1e-3, distill_weight=1.0),
        init_adapter=tmp_path / "cand",
        parent="v1",
    )
    again = evaluate_adapter(str(token_bundle), str(tmp_path / "cand2"), "fp32", slices)["older"]
    assert again.accuracy >= cand.accuracy - 0.05


def test_span_report_follows_seqeval():
    gold = [[(0, 4, "ASSET"), (10, 14, "PART")], [(0, 3, "ASSET")]]
    pred = [[(0, 4, "ASSET"), (10, 13, "PART")], [(0, 3, "ACTION")]]
    report = evaluate_spans(pred, gold)
    # 1 of 3 predicted right, 1 of 3 gold found: micro F1 1/3; ACTION has no gold, so no class entry.
    assert report.accuracy == pytest.approx(1 / 3) and report.count == 2
    assert report.per_class == {"ASSET": pytest.approx(2 / 3), "PART": 0.0}
    assert report.per_class_count == {"ASSET": 2, "PART": 1}


def test_a_round_from_sqlite_scores_the_transformer_and_the_crf_and_the_engine_serves_the_choice(
    token_bundle, tmp_path
):
    """The learner's own path: span samples from a real SQLite file (as the daemon stores them), a
    round in-process, the unit's CRF refit and scored beside the transformer; the engine serves the
    model the gate writes into ``serving.json``."""
    from agent.engine import EngineConfig, InferenceEngine
    from agent.learner.policy import serving_choice
    from agent.learner.round import RoundSpec, report_from_dict, run_round
    from agent.linear import write_serving
    from agent.messages import canonical_spans
    from agent.store import ENTITY_SAMPLE_LABEL, NewSample, Store

    db = tmp_path / "db.sqlite"
    orders = workorder_dataset(400, seed=0)
    store = Store(db).open()
    store.write(
        [
            NewSample(f"id:s{i}", wo.text, ENTITY_SAMPLE_LABEL, entities=canonical_spans(wo.entities))
            for i, wo in enumerate(orders)
        ],
        holdout_fraction=0.2,
    )
    store.close()
    out = tmp_path / "cand"
    result = run_round(
        RoundSpec(
            db_path=str(db),
            bundle_dir=str(token_bundle),
            out_dir=str(out),
            result_path=str(tmp_path / "result.json"),
            version="v1",
            epochs=2,
            lr=1e-2,
        )
    )
    assert result.status == "trained" and result.metric == "entity_f1", result.message
    assert result.linear["model"] == "crf" and result.linear["samples"] == 320
    assert set(result.candidate_models) == {"transformer", "crf", "combined"}
    assert result.candidate == result.candidate_models["transformer"]
    reports = {m: {k: report_from_dict(v) for k, v in r.items()} for m, r in result.candidate_models.items()}
    # The CRF on hand-made features learns these work orders better than a tiny random BERT does,
    # and their combination keeps most of the CRF's lead.
    assert reports["crf"]["all"].accuracy > reports["transformer"]["all"].accuracy + 0.2
    assert reports["combined"]["all"].accuracy > reports["transformer"]["all"].accuracy + 0.1
    assert reports["crf"]["all"].count == 80
    choice = serving_choice(reports, GatePolicy())
    assert choice.model in ("crf", "combined"), choice.reasons
    assert not (out / "serving.json").exists()  # the round leaves the choice to the gate

    from agent.entity_crf import read_crf

    crf = read_crf(out, ENTITY_LABELS)
    assert crf is not None and crf.config.version == "v1"
    texts = [wo.text for wo in orders[:20]]
    config = EngineConfig(precision="fp32", provider="cpu", cache_size=0)
    for model in ("crf", "combined"):
        write_serving(out, model, [])
        with InferenceEngine.open(token_bundle, config, adapter_dir=out) as engine:
            assert engine.serving_model == model
            served = engine.predict(texts)
        assert {(a.model, a.adapter_version) for a in served} == {(model, "v1")}
        for text, spans in zip(texts, served, strict=True):
            assert all(text[s.start : s.end] == s.text and 0 < s.score <= 1 for s in spans)
        if model == "crf":
            assert [list(a) for a in served] == [list(s) for s in crf.predict(texts)]
