"""Hot swap under load, refusal of bad adapters, cache and batching behaviour on a real ORT session."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from agent.adapters import META, WEIGHTS, AdapterError
from agent.engine import EngineConfig, InferenceEngine

TEXTS = [f"motor M{i} current {i * 1.7:.1f}A above limit on line {i % 3}" for i in range(40)]


@pytest.fixture
def engine(tiny_bundle):
    # The LoRA path only: exact comparisons of predictions before and after a refusal must not
    # straddle the switch to a merged session (tests/integration/test_engine_merge.py).
    cfg = EngineConfig(precision="fp32", provider="cpu", cache_size=0, merge_adapters=False)
    with InferenceEngine.open(tiny_bundle, cfg) as e:
        yield e


def _expected(tiny_bundle, adapter, texts):
    with InferenceEngine.open(
        tiny_bundle, EngineConfig(precision="fp32", cache_size=0), adapter_dir=adapter
    ) as e:
        return {t: p.label for t, p in zip(texts, e.predict(texts), strict=True)}, e.adapter_version


def test_swap_under_concurrent_requests_fails_none(tiny_bundle, random_adapter, random_adapter2, engine):
    expected = dict(
        [
            _expected(tiny_bundle, random_adapter, TEXTS)[::-1],
            _expected(tiny_bundle, random_adapter2, TEXTS)[::-1],
        ]
    )
    engine.activate_adapter(random_adapter)
    errors, results = [], []
    stop = threading.Event()

    def client(seed):
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            batch = [TEXTS[i] for i in rng.integers(0, len(TEXTS), size=int(rng.integers(1, 6)))]
            try:
                results.append((batch, engine.predict(batch, timeout=30)))
            except Exception as e:  # noqa: BLE001 - any failure is what this test counts
                errors.append(e)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    swaps = 0
    while swaps < 30 or len(results) < 100:
        engine.activate_adapter(random_adapter2 if swaps % 2 == 0 else random_adapter)
        swaps += 1
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    for batch, preds in results:
        # A request is answered by exactly one adapter, and its label is that adapter's answer.
        versions = {p.adapter_version for p in preds}
        assert len(versions) == 1
        version = versions.pop()
        assert [p.label for p in preds] == [expected[version][t] for t in batch]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _mutate_tensor(adapter_dir, fn):
    tensors = load_file(str(adapter_dir / WEIGHTS))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = fn(tensors[key])
    save_file(tensors, str(adapter_dir / WEIGHTS))


@pytest.mark.parametrize(
    "breakage,message",
    [
        ("base_hash", "trained on base"),
        ("shape", "shapes"),
        ("nan", "NaN"),
        ("truncated", "unreadable"),
        ("missing_weights", "missing"),
        ("bad_meta_json", "not valid JSON"),
        ("unknown_key", "unexpected tensor"),
    ],
)
def test_bad_adapter_is_refused_and_active_stays(
    tmp_path, random_adapter, random_adapter2, engine, breakage, message
):
    engine.activate_adapter(random_adapter)
    before = engine.predict(TEXTS[:5])
    bad = _copy(random_adapter2, tmp_path / "bad")
    if breakage == "base_hash":
        meta = json.loads((bad / META).read_text())
        meta["base_hash"] = "0" * 64
        (bad / META).write_text(json.dumps(meta))
    elif breakage == "shape":
        _mutate_tensor(bad, lambda a: np.zeros((a.shape[0], a.shape[1] + 1), np.float32))
    elif breakage == "nan":
        _mutate_tensor(bad, lambda a: np.full_like(a, np.nan))
    elif breakage == "truncated":
        data = (bad / WEIGHTS).read_bytes()
        (bad / WEIGHTS).write_bytes(data[: len(data) // 2])
    elif breakage == "missing_weights":
        (bad / WEIGHTS).unlink()
    elif breakage == "bad_meta_json":
        (bad / META).write_text("{not json")
    elif breakage == "unknown_key":
        tensors = load_file(str(bad / WEIGHTS))
        tensors["base_model.model.bert.pooler.dense.weight"] = np.zeros((32, 32), np.float32)
        save_file(tensors, str(bad / WEIGHTS))
    with pytest.raises(AdapterError, match=message):
        engine.activate_adapter(bad)
    assert engine.adapter_version == "a1"
    assert engine.predict(TEXTS[:5]) == before


def test_cache_is_keyed_by_adapter_version(tiny_bundle, random_adapter):
    with InferenceEngine.open(tiny_bundle, EngineConfig(precision="fp32", cache_size=100)) as e:
        first = e.predict(TEXTS[:3])
        assert e.predict(TEXTS[:3]) == first
        assert e.stats()["cache_hits"] == 3
        e.activate_adapter(random_adapter)
        after = e.predict(TEXTS[:3])
        assert {p.adapter_version for p in after} == {"a1"}
        assert e.stats()["cache_hits"] == 3  # the swap made every earlier entry a miss


def test_micro_batching_matches_one_by_one(engine):
    one_by_one = [engine.predict([t])[0] for t in TEXTS]
    futures = [engine.submit([t]) for t in TEXTS]
    batched = [f.result(30)[0] for f in futures]
    assert [p.label for p in batched] == [p.label for p in one_by_one]
    assert np.allclose([p.score for p in batched], [p.score for p in one_by_one], atol=1e-5)
    assert engine.stats()["batches"] < 2 * len(TEXTS)


def test_top_k_probabilities(engine):
    (p,) = engine.predict(["hydraulic pressure low"])
    assert len(p.top_k) == 3 and p.top_k[0] == (p.label, p.score)
    assert all(a[1] >= b[1] for a, b in zip(p.top_k, p.top_k[1:], strict=False))
    assert 0.0 < p.score <= 1.0


def test_requested_gpu_falls_back_to_cpu(tiny_bundle):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this box has CUDA; the fallback is for boxes without it")
    with InferenceEngine.open(tiny_bundle, EngineConfig(provider="cuda")) as e:
        assert e.provider == "CPUExecutionProvider"
        assert e.precision in ("fp32", "int8")
        assert len(e.predict(["ok"])) == 1


def test_adapter_with_other_alpha_is_scaled(tiny_bundle, random_adapter, tmp_path):
    """alpha/r is folded into B on conversion: doubling alpha doubles the LoRA delta."""
    from agent.adapters import PEFT_CONFIG

    doubled = _copy(random_adapter, tmp_path / "alpha")
    cfg = json.loads((doubled / PEFT_CONFIG).read_text())
    cfg["lora_alpha"] *= 2
    (doubled / PEFT_CONFIG).write_text(json.dumps(cfg))
    from agent.adapters import read_adapter
    from agent.bundle import load_manifest

    m = load_manifest(tiny_bundle)
    a, b = read_adapter(random_adapter, m), read_adapter(doubled, m)
    key = "lora.0.qkv.B"
    assert np.allclose(b.arrays[key], 2 * a.arrays[key])


def test_precision_trial_on_the_plants_own_texts(tiny_bundle, random_adapter):
    """The auto trial runs on given texts (more than one chunk of them) and picks a CPU precision."""
    texts = [f"{t} #{i}" for i, t in enumerate(TEXTS * 4)]
    with InferenceEngine.open(
        tiny_bundle, EngineConfig(), adapter_dir=random_adapter, calibration_texts=texts
    ) as e:
        assert e.precision in ("fp32", "int8") and e.adapter_version == "a1"
        assert len(e.predict(texts[:3])) == 3
