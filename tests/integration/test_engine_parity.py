"""ORT graph vs torch (+peft) on a tiny random BERT: the adapter math and the base must match."""

from __future__ import annotations

import numpy as np
import pytest

from agent.engine import EngineConfig, InferenceEngine

TEXTS = [
    "ALM 4711 hydraulic pressure low HP-02",
    "replaced worn belt on packer 3, noisy bearing",
    "line=2 station=press4 temp_c=87.5 vib_mm_s=7.9",
    "ok",
]


def _torch_logits(model, engine, texts):
    import torch

    ids, mask = engine.tokenize(texts)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    return ids, mask, out


@pytest.fixture
def fp32_engine(tiny_bundle):
    with InferenceEngine.open(tiny_bundle, EngineConfig(precision="fp32", provider="cpu")) as engine:
        yield engine


def test_base_output_matches_torch_without_adapter(tiny_bundle, fp32_engine):
    from agent.learner.model import load_base_model

    ids, mask, ref = _torch_logits(load_base_model(tiny_bundle), fp32_engine, TEXTS)
    assert fp32_engine.adapter_version is None
    assert np.abs(fp32_engine.run_padded(ids, mask) - ref).max() <= 1e-4


def assert_adapter_matches_peft(bundle, engine, adapter, min_change: float) -> None:
    """The engine with ``adapter`` gives torch + peft's logits, and they differ from the base's."""
    from peft import PeftModel

    from agent.learner.model import load_base_model

    peft_model = PeftModel.from_pretrained(load_base_model(bundle), str(adapter)).eval()
    ids, mask, ref = _torch_logits(peft_model, engine, TEXTS)
    engine.deactivate_adapter()
    base = engine.run_padded(ids, mask)
    engine.activate_adapter(adapter)
    adapted = engine.run_padded(ids, mask)
    assert np.abs(adapted - ref).max() <= 1e-4
    # The adapter really changes the output (else parity above would prove nothing).
    assert np.abs(adapted - base).max() > min_change


def test_adapter_matches_torch_peft(tiny_bundle, random_adapter, fp32_engine):
    assert_adapter_matches_peft(tiny_bundle, fp32_engine, random_adapter, min_change=1e-2)


def test_deactivate_restores_bit_identical_base(random_adapter, fp32_engine):
    ids, mask = fp32_engine.tokenize(TEXTS)
    base = fp32_engine.run_padded(ids, mask)
    fp32_engine.activate_adapter(random_adapter)
    fp32_engine.deactivate_adapter()
    assert np.array_equal(fp32_engine.run_padded(ids, mask), base)


def test_padding_does_not_change_a_text_result(fp32_engine):
    alone = fp32_engine.run_padded(*fp32_engine.tokenize(TEXTS[3:]))
    padded = fp32_engine.run_padded(*fp32_engine.tokenize(TEXTS))[3:]
    assert np.abs(alone - padded).max() <= 1e-5


def test_int8_keeps_lora_inputs_and_applies_adapter(tiny_bundle, random_adapter):
    with InferenceEngine.open(tiny_bundle, EngineConfig(precision="int8", provider="cpu")) as engine:
        ids, mask = engine.tokenize(TEXTS)
        base = engine.run_padded(ids, mask)
        engine.activate_adapter(random_adapter)
        assert engine.precision == "int8"
        assert np.abs(engine.run_padded(ids, mask) - base).max() > 1e-2
