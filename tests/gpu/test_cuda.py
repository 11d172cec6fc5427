"""FP16 on CUDA: run only where onnxruntime-gpu sees a GPU (never in CI)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from agent.engine import EngineConfig, InferenceEngine

pytestmark = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs CUDA (onnxruntime-gpu and a GPU)",
)


def test_fp16_cuda_matches_fp32_cpu_with_adapter(tiny_bundle, random_adapter):
    texts = ["hydraulic pressure low", "belt replaced on packer 3", "temp_c=91.2 vib=7.7"]
    with InferenceEngine.open(
        tiny_bundle, EngineConfig(precision="fp32", provider="cpu"), adapter_dir=random_adapter
    ) as cpu:
        ids, mask = cpu.tokenize(texts)
        ref = cpu.run_padded(ids, mask)
    with InferenceEngine.open(tiny_bundle, EngineConfig(provider="cuda"), adapter_dir=random_adapter) as gpu:
        assert gpu.provider == "CUDAExecutionProvider" and gpu.precision == "fp16"
        out = gpu.run_padded(ids, mask)
        assert [p.adapter_version for p in gpu.predict(texts)] == ["a1"] * 3
    assert np.abs(out - ref).max() < 2e-2
    assert (out.argmax(1) == ref.argmax(1)).all()


def test_cuda_serves_the_lora_path_and_ignores_background_load(tiny_bundle, random_adapter):
    """Merged sessions are built for CPU only; on CUDA the adapter stays on the LoRA inputs and a
    learner round does not make the engine build a lean CPU copy."""
    with InferenceEngine.open(tiny_bundle, EngineConfig(provider="cuda"), adapter_dir=random_adapter) as gpu:
        assert gpu.wait_merged(30)["state"] == "disabled"
        assert gpu.serving_path == "lora"
        gpu.set_background_load(True)
        assert [p.adapter_version for p in gpu.predict(["hydraulic pressure low"])] == ["a1"]
        stats = gpu.stats()
        assert stats["lean_sessions_alive"] == 0 and stats["provider"] == "CUDAExecutionProvider"
        gpu.set_background_load(False)
