"""Each LoRA target's branch sits on the projection PEFT trains: ORT matches torch + peft per target."""

from __future__ import annotations

import numpy as np
import pytest

from agent.adapters import AdapterError, read_adapter
from agent.bundle import ALL_LORA_TARGETS, load_manifest
from agent.engine import EngineConfig, InferenceEngine
from tests.integration.test_engine_parity import TEXTS, _torch_logits
from tests.tiny import make_random_adapter


@pytest.fixture(scope="module")
def fp32_engine(tiny_bundle):
    with InferenceEngine.open(tiny_bundle, EngineConfig(precision="fp32", provider="cpu")) as engine:
        yield engine


def test_default_bundle_has_a_branch_for_every_target(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    assert manifest.lora.targets == list(ALL_LORA_TARGETS)
    for layer in range(manifest.num_layers):
        for branch in ("qkv", "attention_output", "intermediate", "output"):
            assert f"lora.{layer}.{branch}.A" in manifest.lora.graph_inputs
            assert f"lora.{layer}.{branch}.B" in manifest.lora.graph_inputs


@pytest.mark.parametrize("target", ALL_LORA_TARGETS)
def test_single_target_adapter_matches_torch_peft(tiny_bundle, fp32_engine, tmp_path, target):
    from peft import PeftModel

    from agent.learner.model import load_base_model

    # Head left as built, so any change in the output comes from this one branch.
    adapter = make_random_adapter(tiny_bundle, tmp_path / target, 3, target, head_std=0.0, targets=[target])
    converted = read_adapter(adapter, load_manifest(tiny_bundle)).arrays
    branch = target if target not in ("query", "key", "value") else "qkv"
    assert {k.split(".")[2] for k in converted if k.startswith("lora.")} == {branch}

    peft_model = PeftModel.from_pretrained(load_base_model(tiny_bundle), str(adapter)).eval()
    ids, mask, ref = _torch_logits(peft_model, fp32_engine, TEXTS)
    fp32_engine.deactivate_adapter()
    base = fp32_engine.run_padded(ids, mask)
    fp32_engine.activate_adapter(adapter)
    adapted = fp32_engine.run_padded(ids, mask)
    assert np.abs(adapted - ref).max() <= 1e-4
    assert np.abs(adapted - base).max() > 1e-3


def test_dense_target_refused_on_a_bundle_without_its_branch(tiny_bundle, tmp_path):
    # A bundle built before the dense branches existed lists only the packed q/k/v inputs.
    manifest = load_manifest(tiny_bundle)
    qkv_only = {k: v for k, v in manifest.lora.graph_inputs.items() if ".qkv." in k}
    old = manifest.model_copy(update={"lora": manifest.lora.model_copy(update={"graph_inputs": qkv_only})})
    adapter = make_random_adapter(tiny_bundle, tmp_path / "ffn", 4, "ffn", targets=["intermediate"])
    with pytest.raises(AdapterError, match="trains intermediate, but .* no LoRA branch"):
        read_adapter(adapter, old)
    qv = make_random_adapter(tiny_bundle, tmp_path / "qv", 5, "qv", targets=["query", "value"])
    assert set(read_adapter(qv, old).arrays) >= {"lora.0.qkv.A", "lora.0.qkv.B"}
