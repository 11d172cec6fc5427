"""Each LoRA target's branch sits on the projection PEFT trains: ORT matches torch + peft per target."""

from __future__ import annotations

import numpy as np
import pytest

from agent.adapters import AdapterError, read_adapter
from agent.bundle import ALL_LORA_TARGETS, load_manifest
from agent.engine import EngineConfig, InferenceEngine
from tests.integration.test_engine_parity import TEXTS, assert_adapter_matches_peft
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
    # Head left as built, so any change in the output comes from this one branch.
    adapter = make_random_adapter(tiny_bundle, tmp_path / target, 3, target, head_std=0.0, targets=[target])
    converted = read_adapter(adapter, load_manifest(tiny_bundle)).arrays
    branch = target if target not in ("query", "key", "value") else "qkv"
    assert {k.split(".")[2] for k in converted if k.startswith("lora.")} == {branch}
    assert_adapter_matches_peft(tiny_bundle, fp32_engine, adapter, min_change=1e-3)


def test_query_value_bundle_has_no_dense_branches_and_refuses_dense_adapters(tiny_bundle, tmp_path):
    from agent.build import build_bundle
    from agent.bundle import LoraSpec
    from tests.tiny import TINY_LABELS

    qv_bundle = tmp_path / "qv-bundle"
    build_bundle(
        qv_bundle,
        model_path=tiny_bundle.parent / "hf-model",
        labels=TINY_LABELS,
        lora=LoraSpec(targets=["query", "value"]),
        precisions=("fp32",),
    )
    manifest = load_manifest(qv_bundle)
    assert manifest.base_hash == load_manifest(tiny_bundle).base_hash
    assert {k.split(".")[2] for k in manifest.lora.graph_inputs} == {"qkv"}
    # An adapter trained for every projection (on the default bundle, same base) is refused here.
    dense = make_random_adapter(tiny_bundle, tmp_path / "ffn", 4, "ffn", targets=["intermediate"])
    with pytest.raises(AdapterError, match="trains intermediate, but .* no LoRA branch"):
        read_adapter(dense, manifest)
    # A query/value adapter runs on it like on the default bundle.
    qv = make_random_adapter(qv_bundle, tmp_path / "qv", 5, "qv")
    with InferenceEngine.open(qv_bundle, EngineConfig(precision="fp32", provider="cpu")) as engine:
        ids, mask = engine.tokenize(TEXTS)
        base = engine.run_padded(ids, mask)
        engine.activate_adapter(qv)
        assert np.abs(engine.run_padded(ids, mask) - base).max() > 1e-3
