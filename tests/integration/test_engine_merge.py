"""Merged serving graph: the adapter folded into the weights equals the LoRA path, swaps in
between batches without failing a request, and a newer adapter cancels or supersedes a build."""

from __future__ import annotations

import threading
import time

import numpy as np
import onnx
import pytest

from agent import merge
from agent.adapters import read_adapter
from agent.bundle import load_manifest
from agent.engine import EngineConfig, InferenceEngine

TEXTS = [f"motor M{i} current {i * 1.7:.1f}A above limit on line {i % 3}" for i in range(40)] + [
    "ALM 4711 hydraulic pressure low HP-02",
    "replaced worn belt on packer 3, noisy bearing",
    "ok",
]


def _lora_path_logits(bundle, adapter, precision, ids, mask):
    cfg = EngineConfig(precision=precision, provider="cpu", merge_adapters=False)
    with InferenceEngine.open(bundle, cfg, adapter_dir=adapter) as e:
        assert e.serving_path == "lora"
        return e.run_padded(ids, mask)


def test_merged_fp32_session_equals_lora_path(tiny_bundle, random_adapter):
    cfg = EngineConfig(precision="fp32", provider="cpu", cache_size=0)
    with InferenceEngine.open(tiny_bundle, cfg, adapter_dir=random_adapter, calibration_texts=TEXTS) as e:
        state = e.wait_merged(600)
        assert state["state"] == "serving", state
        assert e.serving_path == "merged" and e.stats()["serving_path"] == "merged"
        assert state["verify"]["ok"] and state["precision"] == "fp32"
        ids, mask = e.tokenize(TEXTS)
        merged = e.run_padded(ids, mask)
        preds = e.predict(TEXTS[:3])
    lora = _lora_path_logits(tiny_bundle, random_adapter, "fp32", ids, mask)
    assert np.abs(merged - lora).max() <= 1e-4
    assert [p.adapter_version for p in preds] == ["a1"] * 3


def test_merged_int8_session_is_as_close_to_fp32_as_the_lora_path(tiny_bundle, tmp_path):
    """INT8 tolerance: the merged INT8 session agrees with the fp32 LoRA path on every top-1 and
    its logits are about as far from fp32 as the INT8 LoRA path's (re-quantized from fp32 weights
    with the adapter folded in, the recipe chosen on the box's texts). The adapter's delta is of a
    trained one's size next to W: the fixtures' (B std 0.5) would dominate the folded weights, where
    the LoRA path keeps it in fp32."""
    from tests.tiny import make_random_adapter

    random_adapter = make_random_adapter(tiny_bundle, tmp_path / "small", 11, "s1", b_std=0.05)
    cfg = EngineConfig(precision="int8", provider="cpu", cache_size=0)
    with InferenceEngine.open(tiny_bundle, cfg, adapter_dir=random_adapter, calibration_texts=TEXTS) as e:
        state = e.wait_merged(600)
        assert state["state"] == "serving", state
        ids, mask = e.tokenize(TEXTS)
        merged = e.run_padded(ids, mask)
    fp32 = _lora_path_logits(tiny_bundle, random_adapter, "fp32", ids, mask)
    lora8 = _lora_path_logits(tiny_bundle, random_adapter, "int8", ids, mask)
    err_merged, err_lora = np.abs(merged - fp32).mean(), np.abs(lora8 - fp32).mean()
    assert (merged.argmax(1) == fp32.argmax(1)).all()
    assert err_merged <= 1.25 * err_lora
    assert np.abs(merged - lora8).max() <= 0.1
    q = state["quantization"]
    assert len(q["trials"]) == 2 and q["chosen"] in q["trials"]
    assert q["chosen"]["mean_abs_logit_diff_vs_fp32"] == min(
        t["mean_abs_logit_diff_vs_fp32"] for t in q["trials"]
    )
    assert state["verify"]["agreement_vs_fp32"] == 1.0


def test_fold_keeps_base_where_the_adapter_trains_nothing(tiny_bundle, tmp_path):
    from tests.tiny import make_random_adapter

    m = load_manifest(tiny_bundle)
    adapter = make_random_adapter(tiny_bundle, tmp_path / "q", 7, "q", targets=["query"])
    arrays = read_adapter(adapter, m).arrays
    fp32 = onnx.load(str(tiny_bundle / m.precisions["fp32"].file))
    before = {t.name: onnx.numpy_helper.to_array(t) for t in fp32.graph.initializer}
    merged = merge.fold_adapter(fp32, arrays)
    after = {t.name: onnx.numpy_helper.to_array(t) for t in merged.model.graph.initializer}
    by_kind = {p.key: p.weight for p in merged.projections}
    assert merged.folded == [f"layer{layer}.qkv" for layer in range(m.num_layers)]
    assert np.array_equal(after[by_kind["layer0.intermediate"]], before[by_kind["layer0.intermediate"]])
    w = by_kind["layer0.qkv"]
    a, b = arrays["lora.0.qkv.A"], arrays["lora.0.qkv.B"]
    assert np.allclose(after[w], before[w] + a @ b, atol=1e-6)
    # No LoRA input or branch is left; the head is a constant.
    names = {i.name for i in merged.model.graph.input}
    assert names == {"input_ids", "attention_mask"}
    assert not [n for n in merged.model.graph.node if n.name.endswith((".lora_a", ".lora_b", ".lora_add"))]


@pytest.mark.parametrize(
    "recipe",
    [
        merge.QuantRecipe(smooth_alpha=0.5),
        merge.QuantRecipe(
            smooth_alpha=0.5, outlier_kinds=frozenset({"output"}), outlier_ratio=1.5, outlier_mode="scale"
        ),
        merge.QuantRecipe(smooth_alpha=None, outlier_kinds=frozenset({"output", "qkv"}), outlier_ratio=1.5),
    ],
    ids=["smooth", "smooth+scaled-outliers", "split-outliers"],
)
def test_smoothing_and_outlier_rewrites_are_exact_in_fp32(tiny_bundle, random_adapter, recipe):
    """The rewrites (a Mul before the projection, 1/s folded into the value projection, s·W in the
    weight, outlier channels scaled or computed beside) leave the function unchanged in fp32:
    only quantizing may change it."""
    import onnxruntime as ort

    m = load_manifest(tiny_bundle)
    arrays = read_adapter(random_adapter, m).arrays

    def folded():
        return merge.fold_adapter(onnx.load(str(tiny_bundle / m.precisions["fp32"].file)), arrays)

    base = folded()
    names = merge.calibration_outputs(base)
    cal = ort.InferenceSession(merge.with_extra_outputs(base.model, names).SerializeToString())
    with InferenceEngine.open(tiny_bundle, EngineConfig(precision="fp32", merge_adapters=False)) as e:
        ids, mask = e.tokenize(TEXTS)
    feeds = {"input_ids": ids, "attention_mask": mask}
    outs = cal.run(["logits", *names], feeds)
    absmax = {n: merge.channel_absmax(v, mask) for n, v in zip(names, outs[1:], strict=True)}
    rewritten = folded()
    info = merge.quantize_int8(rewritten, recipe, absmax, keep_weights_fp32=True)
    if recipe.smooth_alpha is not None:
        assert set(info["smoothed"]) == {
            p.key for p in rewritten.projections if p.kind in recipe.smooth_kinds
        }
        ops = [n.op_type for n in rewritten.model.graph.node]
        # One Mul per projection except the attention output (folded into the value projection).
        assert ops.count("Mul") - [n.op_type for n in base.model.graph.node].count("Mul") == 3 * m.num_layers
    if recipe.outlier_kinds:
        assert info["outlier_channels"], "the test must exercise the outlier path"
    w = {t.name: onnx.numpy_helper.to_array(t) for t in rewritten.model.graph.initializer}
    w0 = {t.name: onnx.numpy_helper.to_array(t) for t in base.model.graph.initializer}
    assert any(not np.allclose(w[p.weight], w0[p.weight]) for p in base.projections)
    out = ort.InferenceSession(rewritten.model.SerializeToString()).run(["logits"], feeds)[0]
    assert np.abs(out - outs[0]).max() <= 1e-4


def test_swap_then_merge_under_concurrent_requests_fails_none(tiny_bundle, random_adapter, random_adapter2):
    cfg = EngineConfig(precision="int8", provider="cpu", cache_size=0)
    with InferenceEngine.open(tiny_bundle, cfg, calibration_texts=TEXTS) as engine:
        errors, results = [], []
        stop = threading.Event()

        def client(seed):
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                batch = [TEXTS[i] for i in rng.integers(0, len(TEXTS), size=int(rng.integers(1, 6)))]
                try:
                    preds = engine.predict(batch, timeout=300)
                    results.append(
                        (engine.serving_path, {p.adapter_version for p in preds}, len(preds) == len(batch))
                    )
                except Exception as e:  # noqa: BLE001 - any failure is what this test counts
                    errors.append(e)

        threads = [threading.Thread(target=client, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        paths = []
        for adapter, version in ((random_adapter, "a1"), (random_adapter2, "a2")):
            engine.activate_adapter(adapter)
            paths.append(engine.serving_path)
            state = engine.wait_merged(600)
            assert state["state"] == "serving" and state["version"] == version, state
            paths.append(engine.serving_path)
            served = len(results)
            deadline = time.monotonic() + 300
            while len(results) < served + 20 and time.monotonic() < deadline:
                time.sleep(0.01)  # requests answered by the merged session
        stop.set()
        for t in threads:
            t.join()
        stats = engine.stats()
    assert errors == []
    assert paths == ["lora", "merged", "lora", "merged"]
    assert all(ok and len(versions) == 1 for _, versions, ok in results)
    assert {p for p, _, _ in results} >= {"merged"}
    assert stats["errors"] == 0 and stats["merge"]["switched"] == 2
    # Never more than the bundle's session and one merged (or calibration) session.
    assert stats["sessions_alive"] <= 2


def test_a_newer_adapter_supersedes_a_merge_in_progress(tiny_bundle, random_adapter, random_adapter2):
    cfg = EngineConfig(precision="int8", provider="cpu", cache_size=0)
    with InferenceEngine.open(tiny_bundle, cfg, calibration_texts=TEXTS) as engine:
        engine.activate_adapter(random_adapter)
        deadline = time.monotonic() + 300
        while engine.stats()["merge"]["state"] != "building" and time.monotonic() < deadline:
            time.sleep(0.001)
        assert engine.stats()["merge"]["state"] == "building", engine.stats()["merge"]
        engine.activate_adapter(random_adapter2)  # while a1's merge builds
        state = engine.wait_merged(600)
        stats = engine.stats()
        assert state["state"] == "serving" and state["version"] == "a2", state
        assert engine.adapter_version == "a2" and engine.serving_path == "merged"
        # a1's build never served: it was cancelled, or its result was dropped on arrival.
        assert stats["merge"]["switched"] == 1
        assert stats["merge"]["builds"] == 2 and stats["merge"]["cancelled"] == 1
        assert {p.adapter_version for p in engine.predict(TEXTS[:4])} == {"a2"}


def test_deactivate_while_merging_serves_the_base(tiny_bundle, random_adapter):
    cfg = EngineConfig(precision="fp32", provider="cpu", cache_size=0)
    with InferenceEngine.open(tiny_bundle, cfg) as engine:
        ids, mask = engine.tokenize(TEXTS)
        base = engine.run_padded(ids, mask)
        engine.activate_adapter(random_adapter)
        engine.deactivate_adapter()
        engine.wait_merged(600)
        time.sleep(0.2)
        assert engine.serving_path == "base" and engine.adapter_version is None
        assert np.array_equal(engine.run_padded(ids, mask), base)
        assert engine.stats()["merge"]["switched"] == 0


def test_merging_off_keeps_the_lora_path(tiny_bundle, random_adapter):
    cfg = EngineConfig(precision="fp32", provider="cpu", merge_adapters=False)
    with InferenceEngine.open(tiny_bundle, cfg, adapter_dir=random_adapter) as engine:
        assert engine.wait_merged(5)["state"] == "disabled"
        assert engine.serving_path == "lora"


def test_background_load_serves_on_fewer_threads_and_returns(tiny_bundle, random_adapter):
    cfg = EngineConfig(precision="fp32", provider="cpu", cache_size=0, intra_op_threads=2)
    with InferenceEngine.open(tiny_bundle, cfg, adapter_dir=random_adapter) as engine:
        engine.wait_merged(600)
        ids, mask = engine.tokenize(TEXTS)
        full = engine.run_padded(ids, mask)
        engine.set_background_load(True)
        deadline = time.monotonic() + 60
        while engine.stats()["intra_op_threads"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = engine.stats()
        assert stats["background_load"] and stats["intra_op_threads"] == 1
        assert stats["serving_path"] == "merged" and stats["lean_sessions_alive"] == 1
        assert np.abs(engine.run_padded(ids, mask) - full).max() <= 1e-5
        assert [p.adapter_version for p in engine.predict(TEXTS[:2])] == ["a1", "a1"]
        engine.set_background_load(False)
        stats = engine.stats()
        assert not stats["background_load"] and stats["intra_op_threads"] == 2
        assert np.array_equal(engine.run_padded(ids, mask), full)


@pytest.mark.parametrize("min_agreement,expected", [(0.9, "int8"), (1.01, "fp32")])
def test_precision_trial_with_an_adapter_judges_the_merged_int8_session(
    tiny_bundle, random_adapter, monkeypatch, min_agreement, expected
):
    """With an adapter at open, INT8 stays only if the merged INT8 session (what will serve) agrees
    with fp32 on the box's texts; the engine then starts on it. Otherwise it serves fp32."""
    from agent import providers

    monkeypatch.setattr(providers, "choose_cpu_precision", lambda trials, *a, **k: "int8")  # INT8 "faster"
    cfg = EngineConfig(cache_size=0, min_int8_agreement=min_agreement)
    with InferenceEngine.open(tiny_bundle, cfg, adapter_dir=random_adapter, calibration_texts=TEXTS) as e:
        assert e.precision == expected and e.adapter_version == "a1"
        if expected == "int8":
            # Merged before open returned: no LoRA-path period, and the check is recorded.
            assert e.serving_path == "merged"
            assert e.stats()["merge"]["verify"]["agreement_vs_fp32"] >= min_agreement
        else:
            assert e.wait_merged(600)["state"] == "serving" and e.serving_path == "merged"
        assert [p.adapter_version for p in e.predict(TEXTS[:2])] == ["a1", "a1"]
