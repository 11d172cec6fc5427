"""A token-classification bundle: same fused graph with LoRA inputs, a per-token overridable head,
logits equal to torch's, and the spans decoded from them equal to those decoded from torch's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from agent.bundle import TOKENIZER_JSON, check_bundle, load_manifest
from agent.entities import TagScheme, decode
from agent.lora_graph import HEAD_BIAS, HEAD_WEIGHT
from tools.workorders import workorder_dataset

ENTITY_LABELS = json.loads((Path(__file__).parents[2] / "models" / "entities.json").read_text())["labels"]
TEXTS = [wo.text for wo in workorder_dataset(30, seed=3)]


@pytest.fixture(scope="module")
def token_bundle(tmp_path_factory):
    from agent.build import build_bundle
    from tests.tiny import make_tiny_bert

    root = tmp_path_factory.mktemp("tiny-token")
    out = root / "bundle"
    build_bundle(
        out,
        model_path=make_tiny_bert(root / "hf-model"),
        labels=ENTITY_LABELS,
        precisions=("fp32", "int8"),
        task="token-classification",
        tag_scheme="BILOU",
    )
    return out


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


def test_the_classification_engine_refuses_a_token_bundle_with_a_sentence(token_bundle):
    from agent.bundle import BundleError
    from agent.engine import EngineConfig, InferenceEngine

    with pytest.raises(BundleError, match="token-classification bundle"):
        InferenceEngine.open(token_bundle, EngineConfig(precision="fp32", provider="cpu"))
