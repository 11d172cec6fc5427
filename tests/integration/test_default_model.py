"""The real default model (all-MiniLM-L6-v2 from site-packages), built offline and served."""

from __future__ import annotations

import numpy as np

from agent.bundle import check_bundle, load_manifest
from agent.engine import EngineConfig, InferenceEngine


def test_default_bundle_builds_offline_and_answers(tmp_path):
    from agent.build import build_bundle

    out = tmp_path / "minilm"
    m = build_bundle(out)
    assert check_bundle(out) == []
    assert m.hidden_size == 384 and m.num_layers == 6 and len(m.labels) == 8
    assert m.verification["fp32_max_abs_logit_diff_vs_torch"] <= 1e-4
    assert set(load_manifest(out).precisions) == {"fp32", "int8", "fp16"}
    # INT8 is about a quarter of fp32 for the encoder weights (embeddings stay fp32).
    assert m.precisions["int8"].size_bytes < 0.7 * m.precisions["fp32"].size_bytes
    texts = ["ALM 4711 Hydraulic pressure low HP-02", "replaced worn belt on packer 3"]
    results = {}
    for precision in ("fp32", "int8"):
        with InferenceEngine.open(out, EngineConfig(precision=precision)) as e:
            ids, mask = e.tokenize(texts)
            results[precision] = e.run_padded(ids, mask)
            assert [p.label for p in e.predict(texts)][0] in m.labels
    assert np.abs(results["int8"] - results["fp32"]).max() < 0.05
