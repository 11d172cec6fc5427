"""A token-classification bundle: same fused graph with LoRA inputs, a per-token overridable head,
logits equal to torch's, and the spans decoded from them equal to those decoded from torch's."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from agent.bundle import TOKENIZER_JSON, check_bundle, load_manifest
from agent.entities import TagScheme, decode
from agent.lora_graph import HEAD_BIAS, HEAD_WEIGHT
from tests.integration.conftest import ENTITY_LABELS
from tools.workorders import workorder_dataset

TEXTS = [wo.text for wo in workorder_dataset(30, seed=3)]


def torch_model(bundle):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_config(AutoConfig.from_pretrained(bundle / "hf"))
    model.load_state_dict(load_file(str(bundle / "base.safetensors")))
    return model.eval()


def test_manifest_names_the_task_and_its_tags(token_bundle):
    m = load_manifest(token_bundle)
    assert m.task == "token-classification" and m.entities is not None
    assert (m.entities.scheme, m.entities.labels) == ("BILOU", ENTITY_LABELS)
    assert m.labels == list(TagScheme(ENTITY_LABELS, "BILOU").tags) and m.labels[0] == "O"
    assert m.outputs == ["logits"] and check_bundle(token_bundle) == []


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_per_token_logits_and_spans_match_torch(token_bundle, precision):
    import torch

    m = load_manifest(token_bundle)
    scheme = TagScheme(m.entities.labels, m.entities.scheme)
    tokenizer = Tokenizer.from_file(str(token_bundle / TOKENIZER_JSON))
    tokenizer.no_padding()
    session = ort.InferenceSession(
        str(token_bundle / m.precisions[precision].file), providers=["CPUExecutionProvider"]
    )
    model = torch_model(token_bundle)
    # The head is a graph input: feed a sharper copy so the random model predicts entities.
    with torch.no_grad():
        model.classifier.weight.mul_(8.0)
    head = {
        HEAD_WEIGHT: model.classifier.weight.detach().numpy(),
        HEAD_BIAS: model.classifier.bias.detach().numpy(),
    }
    spans_found = 0
    for text in TEXTS:
        enc = tokenizer.encode(text)
        ids = np.array([enc.ids], np.int64)
        mask = np.ones_like(ids)
        (logits,) = session.run(["logits"], {"input_ids": ids, "attention_mask": mask, **head})
        assert logits.shape == (1, len(enc.ids), len(m.labels))
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        if precision == "fp32":
            np.testing.assert_allclose(logits, ref, atol=1e-4)
            ours, theirs = decode(text, enc, logits[0], scheme), decode(text, enc, ref[0], scheme)
            assert [(s.label, s.start, s.end, s.text) for s in ours] == [
                (s.label, s.start, s.end, s.text) for s in theirs
            ]
            spans_found += len(ours)
        else:
            # INT8 base matmuls, fp32 head: the tags agree on nearly every token.
            assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    if precision == "fp32":
        assert spans_found > len(TEXTS)  # not trivially empty


@pytest.fixture(scope="module")
def token_adapter(token_bundle, tmp_path_factory):
    from tests.tiny import make_random_adapter

    return make_random_adapter(
        token_bundle, tmp_path_factory.mktemp("ner-adapter") / "a1", 5, "ner-1", head_std=2.0
    )


def peft_window_logits(bundle, adapter, encodings) -> list[np.ndarray]:
    """torch + peft logits of each window on its own (no padding, no batching)."""
    import torch
    from peft import PeftModel

    from agent.learner.model import load_base_model

    model = PeftModel.from_pretrained(load_base_model(bundle), str(adapter)).eval()
    out = []
    with torch.no_grad():
        for enc in encodings:
            ids = torch.tensor([enc.ids])
            out.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].numpy())
    return out


def test_engine_spans_equal_torch_peft_spans_with_an_adapter(token_bundle, token_adapter):
    """Through the engine's batching (length-sorted, padded runs), LoRA path, long texts in
    windows with stride: the same spans as torch + peft on each window, merged the same way."""
    from agent.engine import EngineConfig, InferenceEngine
    from agent.entity_serving import SpanExtractor

    m = load_manifest(token_bundle)
    long_texts = [" ; ".join(TEXTS[i : i + 6]) for i in range(0, 24, 6)]  # several windows each
    texts = TEXTS + long_texts
    extractor = SpanExtractor(token_bundle, m)
    assert all(len(extractor.encode([t])[0]) >= 2 for t in long_texts)
    config = EngineConfig(precision="fp32", provider="cpu", cache_size=0)
    with InferenceEngine.open(token_bundle, config, adapter_dir=token_adapter) as engine:
        assert engine.serving_path == "lora" and engine.adapter_version == "ner-1"
        served = engine.predict(texts)
        engine.deactivate_adapter()
        base_engine_spans = engine.predict(texts)
    found = 0
    for text, spans in zip(texts, served, strict=True):
        encodings = extractor.encode([text])[0]
        expected = extractor.decode(
            text, encodings, peft_window_logits(token_bundle, token_adapter, encodings)
        )
        assert [(s.label, s.start, s.end, s.text) for s in spans] == [
            (s.label, s.start, s.end, s.text) for s in expected
        ], text
        for got, want in zip(spans, expected, strict=True):
            assert got.score == pytest.approx(want.score, abs=1e-4)
            assert text[got.start : got.end] == got.text
        found += len(spans)
    assert found > len(texts)
    # The adapter changes the answers (its head is perturbed): the swap is seen in the spans.
    assert base_engine_spans != served


def test_engine_precision_trial_on_a_token_bundle_picks_a_precision(token_bundle):
    from agent.engine import EngineConfig, InferenceEngine

    with InferenceEngine.open(token_bundle, EngineConfig(precision="auto", provider="cpu")) as engine:
        assert engine.precision in ("fp32", "int8")
        (spans,) = engine.predict([TEXTS[0]])
        assert isinstance(spans, tuple)
