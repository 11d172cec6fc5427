"""The fleet benchmark's pure parts: site sizes and splits, the step budget, the hostile round (boxes,
replicas, hostile updates, the aggregator's refusals and outlier rule), targets and the JSON contract.
No training, no engine; tiny arrays."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tools.bench import common, fleet
from tools.bench.fleet import Box, Row, Site

A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
B = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
HEAD = "base_model.model.classifier.weight"


def test_site_sizes_are_geometric_with_a_small_site():
    assert fleet.site_sizes(4, 1200, 80) == [1200, 487, 197, 80]
    assert fleet.site_sizes(1, 1200, 80) == [1200]
    assert fleet.site_sizes(2, 100, 100) == [100, 100]
    with pytest.raises(ValueError):
        fleet.site_sizes(3, 50, 80)


def test_simulated_sites_follow_the_plan():
    plan = fleet.Plan.quick()
    sites = fleet.simulated_sites(plan, seed=0)
    assert [s.name for s in sites] == ["site0", "site1", "site2"]
    assert [len(s.train) for s in sites] == fleet.site_sizes(3, plan.largest, plan.smallest)
    assert all(len(s.test) == plan.test_per_site for s in sites)
    # Non-IID: the label mixes differ between sites.
    labels = sorted({r.label for s in sites for r in s.train})
    mix = np.array([[sum(r.label == lab for r in s.train) / len(s.train) for lab in labels] for s in sites])
    assert np.abs(mix[0] - mix[1]).max() > 0.1
    # Test rows come after the train rows and are not the same records.
    assert sites[0].test[0] is not sites[0].train[-1]


def test_csv_rows_group_by_site_largest_first_and_hold_out_each_sites_tail():
    rows = [("b", Row(f"b{i}", "x")) for i in range(5)] + [("a", Row(f"a{i}", "y")) for i in range(10)]
    sites = fleet.group_sites(rows, test_fraction=0.2)
    assert [s.name for s in sites] == ["a", "b"]
    a, b = sites
    assert [r.text for r in a.test] == ["a8", "a9"] and [r.text for r in a.train][-1] == "a7"
    assert [r.text for r in b.test] == ["b4"] and len(b.train) == 4
    assert [s.name for s in fleet.group_sites(rows, 0.2, max_sites=1)] == ["a"]
    with pytest.raises(ValueError):
        fleet.split_site_rows([Row("only", "x")], 0.2)


def test_step_budget_is_the_same_for_every_site_and_round():
    plan = fleet.Plan.full()
    cfg = fleet.train_config(plan.steps, seed=3)
    assert cfg.max_steps == plan.steps and cfg.epochs >= 1
    assert (cfg.lr, cfg.batch_size) == (1e-3, 16)
    assert fleet.train_config(0, seed=0).max_steps == 0  # the start adapter: nothing trained
    assert plan.site_steps == plan.rounds * plan.steps
    assert plan.central_steps(4) == 4 * plan.rounds * plan.steps
    # The matched centralized run: the sites' batches in one, as many updates as the rounds make.
    assert fleet.train_config(plan.site_steps, seed=0, batch_scale=4).batch_size == 64
    seeds = {fleet.round_seed(0, r, i) for r in range(5) for i in range(6)}
    assert len(seeds) == 30  # every (round, site) draws its own batches


def test_apportion_boxes_by_examples_at_least_one_each():
    counts = fleet.apportion([1200, 487, 197, 80], 27)
    assert sum(counts) == 27 and min(counts) >= 1
    assert counts == sorted(counts, reverse=True)
    assert fleet.apportion([1, 1, 1], 3) == [1, 1, 1]
    assert fleet.apportion([10, 0], 5) == [4, 1]
    with pytest.raises(ValueError):
        fleet.apportion([1, 2, 3], 2)


def test_split_examples_and_hostile_count():
    assert fleet.split_examples(10, 3) == [4, 3, 3]
    assert fleet.split_examples(2, 3) == [1, 1, 1]  # a box claims at least one example
    assert fleet.hostile_count(30, 0.1) == 3
    assert fleet.hostile_count(20, 0.1) == 2
    assert fleet.hostile_count(3, 0.1) == 1
    assert fleet.hostile_count(2, 0.9) == 1  # one honest box stays


def _pair(seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    start = {B: rng.standard_normal((4, 2)).astype(np.float32), HEAD: np.ones((2, 4), np.float32)}
    tensors = {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()}
    return tensors, start


def test_hostile_updates_scale_flip_or_poison_the_update():
    tensors, start = _pair(0)
    u = {k: tensors[k] - start[k] for k in tensors}
    scaled = fleet.hostile_update("scaled", tensors, start)
    flipped = fleet.hostile_update("sign_flip", tensors, start)
    poisoned = fleet.hostile_update("nan", tensors, start)
    for k in tensors:
        np.testing.assert_allclose(scaled[k], start[k] + 100 * u[k], rtol=1e-5)
        np.testing.assert_allclose(flipped[k], start[k] - u[k], rtol=1e-6)
    assert np.isnan(poisoned[B]).all() and np.array_equal(poisoned[HEAD], tensors[HEAD])
    assert not np.isnan(tensors[B]).any()  # the honest upload is not touched
    with pytest.raises(ValueError):
        fleet.hostile_update("bribe", tensors, start)


def test_honest_replicas_scatter_by_the_noise_share_of_the_update():
    tensors, start = _pair(1)
    start[HEAD] = tensors[HEAD].copy()  # a tensor the site did not change
    reps = fleet.honest_replicas(tensors, start, copies=200, noise=0.1, seed=0)
    assert len(reps) == 200
    u = tensors[B] - start[B]
    rms = float(np.sqrt(np.mean(u.astype(np.float64) ** 2)))
    spread = np.stack([r[B] for r in reps]) - tensors[B]
    assert np.std(spread) == pytest.approx(0.1 * rms, rel=0.15)
    assert all(np.array_equal(r[HEAD], tensors[HEAD]) for r in reps)
    assert fleet.honest_replicas(tensors, start, 2, 0.1, seed=0)[0][B].tolist() == reps[0][B].tolist()


def test_hostile_fleet_is_ten_percent_hostile_and_proportional():
    sites = [(f"site{i}", *_pair(i)[:1], n) for i, n in enumerate([1200, 300, 80])]
    start = _pair(0)[1]
    honest, hostile = fleet.hostile_fleet(sites, start, boxes=30, fraction=0.1, noise=0.1, seed=0)
    assert len(honest) == 27 and [b.kind for b in hostile] == ["scaled", "sign_flip", "nan"]
    per_site = {name: [b for b in honest if b.device.startswith(name + "-")] for name, _, _ in sites}
    assert [len(v) for v in per_site.values()] == fleet.apportion([1200, 300, 80], 27)
    # A site's boxes claim its examples between them.
    assert [sum(b.num_examples for b in v) for v in per_site.values()] == [1200, 300, 80]
    assert len({b.device for b in honest + hostile}) == 30


def test_outlier_rule_is_the_aggregators():
    norms = {"a": 1.0, "b": 1.2, "c": 0.9, "d": 50.0}
    out = fleet.outlier_exclusions(norms, 10.0)
    assert list(out) == ["d"] and "median" in out["d"]
    assert fleet.outlier_exclusions({"a": 1.0, "d": 50.0}, 10.0) == {}  # fewer than 3 uploads
    assert fleet.outlier_exclusions(norms, None) == {}


def _tiny_fleet() -> fleet.Fleet:
    from agent.fed.hq_config import RoundSettings
    from agent.fed.spec import AdapterSpec

    spec = AdapterSpec(
        base_hash="0" * 64,
        labels=("x", "y"),
        rank=2,
        alpha=4,
        targets=("query",),
        shapes={A: (2, 4), B: (4, 2), HEAD: (2, 4)},
    )
    return fleet.Fleet(Path("."), spec, seed=7, settings=RoundSettings(), chunk_bytes=4096)


def test_the_aggregators_defences_refuse_nan_and_leave_out_the_boosted_box():
    f = _tiny_fleet()
    rng = np.random.default_rng(0)
    start = {B: np.zeros((4, 2), np.float32), HEAD: np.zeros((2, 4), np.float32)}
    sites = []
    for i in range(3):
        t = {k: (rng.standard_normal(v.shape) * 0.1).astype(np.float32) for k, v in start.items()}
        sites.append((f"site{i}", t, 100))
    honest, hostile = fleet.hostile_fleet(sites, start, boxes=10, fraction=0.3, noise=0.1, seed=0)
    got = f.receive(honest + hostile, "ffa_lora_trimmed_mean", 1)
    nan_box = next(b.device for b in hostile if b.kind == "nan")
    scaled_box = next(b.device for b in hostile if b.kind == "scaled")
    flip_box = next(b.device for b in hostile if b.kind == "sign_flip")
    assert list(got["refused"]) == [nan_box] and got["refused"][nan_box].startswith("non_finite")
    assert list(got["excluded"]) == [scaled_box]
    assert flip_box in got["devices"] and len(got["kept"]) == 8
    # The update from the start global: the boosted box is ~100x the median, the flipped one ~1x.
    ratios = fleet.norm_ratios(f, got["norms"], honest + hostile, start)
    assert set(ratios) == {scaled_box, flip_box}
    assert ratios[scaled_box]["update"] > 30 and 0.3 < ratios[flip_box]["update"] < 3
    # What a box sends: the upload (B and head, no A under FFA) in framed chunks of at most chunk_bytes.
    body, frames = f.frames(honest[0], "ffa_lora_trimmed_mean", 1)
    assert len(frames) == math.ceil(len(body) / 4096) and all(len(x) <= 4096 + 1024 for x in frames)
    assert len(body) < got["frame_bytes"][honest[0].device] < len(body) + 1024 * len(frames)
    assert got["body_bytes"][honest[0].device] == len(body)
    agg = f.aggregate("ffa_lora_trimmed_mean", got["kept"])
    assert set(agg) == {A, B, HEAD} and all(np.isfinite(v).all() for v in agg.values())
    np.testing.assert_array_equal(agg[A], f.frozen_a()[A])


def test_exact_strategies_have_no_product_error_on_tiny_uploads():
    from agent.fed import update_batch

    f = _tiny_fleet()
    rng = np.random.default_rng(1)
    boxes = [
        Box(
            f"b{i}",
            {B: rng.standard_normal((4, 2)).astype(np.float32), HEAD: np.ones((2, 4), np.float32)},
            10 + i,
        )
        for i in range(3)
    ]
    got = f.receive(boxes, "ffa_lora", 1)
    agg = f.aggregate("ffa_lora", got["kept"])
    assert update_batch.exact_error(f.full(got["kept"], "ffa_lora"), agg) < 1e-6


def _fake_measurements(sites: list[Site]) -> dict:
    names = [s.name for s in sites]

    def accs(x: float) -> dict[str, float]:
        return {n: x + 0.01 * i for i, n in enumerate(names)}

    def fed(x: float) -> dict:
        rnd = {
            "exact_error": {
                "ffa_lora": 1e-9,
                "product_svd": 0.01,
                "product_svd_full_rank": 2e-8,
                "fedavg_naive": 0.3,
            },
            "upload_frame_bytes": 700_000,
            "upload_body_bytes": 690_000,
        }
        return {"per_site": accs(x), "rounds": [rnd, rnd], "curve": [x - 0.1, x], "acc": x}

    hostile = {
        "robust_clean": {
            "per_site": accs(0.84),
            "acc": 0.85,
            "refused": {"h2": "non_finite"},
            "excluded": {},
        },
        "robust_hostile": {
            "per_site": accs(0.83),
            "acc": 0.84,
            "refused": {"h2": "non_finite"},
            "excluded": {},
        },
        "mean_hostile": {"per_site": accs(0.8), "acc": 0.81},
        "boxes": 30,
        "hostile_boxes": {"h0": "scaled", "h1": "sign_flip", "h2": "nan"},
        "byzantine_drop_pts": 1.0,
    }
    return {
        "tfidf": {"local": accs(0.7), "centralized": accs(0.8)},
        "local": accs(0.75),
        "local_info": {},
        "central": accs(0.88),
        "central_long": accs(0.9),
        "central_long_info": {},
        "central_info": {},
        "runs": {"fedavg_naive": fed(0.8), "ffa_lora": fed(0.87), "product_svd": fed(0.86)},
        "hostile": hostile,
        "scale": {"clients": 1000, "by_strategy": {"ffa_lora": 0.4, "fedavg_naive": 0.8}, "decode_s": 0.3},
    }


def test_json_contract_targets_and_report():
    sites = [
        Site("site0", [Row("a", "x")] * 3, [Row("b", "x")] * 2),
        Site("site1", [Row("c", "y")], [Row("d", "y")]),
    ]
    plan = fleet.Plan.quick()
    result = fleet.summarize(
        plan,
        sites,
        _fake_measurements(sites),
        {"machine": common.machine_info(), "data": {"source": "fake"}, "loadavg_seen": [0.5]},
    )
    assert fleet.missing_keys(result) == []
    assert result["ffa_lora_acc"] == pytest.approx(0.875) and result["svd_acc"] == pytest.approx(0.865)
    assert result["best_strategy"] == "ffa_lora"
    assert result["best_vs_centralized"] == pytest.approx(0.875 / 0.885)
    assert result["best_vs_centralized_long"] == pytest.approx(0.875 / 0.905)
    assert result["exact_error"] == pytest.approx(2e-8)  # ffa_lora and product_svd at full rank only
    assert result["fed_ge_local_all_sites"] is True and result["sites_below_local_pts"] == {}
    assert set(result["per_site"]) == {"site0", "site1"}
    assert {"local_only", "ffa_lora", "product_svd", "fedavg_naive", "centralized"} <= set(
        result["per_site"]["site0"]
    )
    assert result["targets"]["best_vs_centralized"]["met"] is True
    assert result["targets"]["byzantine_drop_pts"]["met"] is True
    line = common.json_line(result)
    assert json.loads(line)["upload_bytes_per_round"] == 700_000 and "\n" not in line
    text = fleet.report(result)
    assert "per-site accuracy" in text and "targets:" in text and "site1" in text


def test_targets():
    t = fleet.targets(
        {
            "best_vs_centralized": 0.98,
            "exact_error": 2e-5,
            "aggregate_1000_s": None,
            "byzantine_drop_pts": math.nan,
            "fed_ge_local_all_sites": False,
        }
    )
    assert t["best_vs_centralized"]["met"] is True and t["exact_error"]["met"] is False
    assert t["aggregate_1000_s"]["met"] is None and t["byzantine_drop_pts"]["met"] is None
    assert t["fed_ge_local_all_sites"]["met"] is False


def test_benchmark_is_registered():
    from tools.bench.__main__ import BENCHMARKS

    assert "fleet" in BENCHMARKS


def test_a_written_global_serves_its_lora_factors_scale_and_head(tiny_bundle, random_adapter, tmp_path):
    """The global the bench writes (``Fleet.write_global``: the box's ``write_adapter_dir``) reaches the
    serving engine with everything: its LoRA B·A at the scale alpha/r and its head, exactly as the PEFT
    adapter it was made from. (Round 1 of the fleet benchmark gave the same per-site accuracies for
    every strategy: the averaged globals predicted the one label all sites share, not an adapter served
    without its LoRA.)"""
    from safetensors.numpy import load_file

    from agent.adapters import WEIGHTS, read_adapter
    from agent.bundle import load_manifest
    from agent.lora_graph import HEAD_WEIGHT

    fl = fleet.Fleet.open(tiny_bundle, seed=7)
    tensors = load_file(str(random_adapter / WEIGHTS))
    manifest = load_manifest(tiny_bundle)
    want = read_adapter(random_adapter, manifest).arrays

    got = read_adapter(fl.write_global(tensors, tmp_path / "g", "fedavg_naive", 1, 10), manifest).arrays
    assert set(got) == set(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)

    # B is served, not only the head: zero B changes the LoRA inputs and leaves the head as it was.
    no_b = {k: (np.zeros_like(v) if k.endswith(".lora_B.weight") else v) for k, v in tensors.items()}
    served = read_adapter(fl.write_global(no_b, tmp_path / "no-b", "fedavg_naive", 1, 10), manifest).arrays
    assert any(k != HEAD_WEIGHT and not np.array_equal(served[k], want[k]) for k in want)
    assert np.array_equal(served[HEAD_WEIGHT], want[HEAD_WEIGHT])
