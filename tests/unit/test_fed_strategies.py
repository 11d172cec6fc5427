"""Aggregation strategies against numpy references, on small random adapters."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

from agent.fed import strategies as st
from agent.fed.combines import coordinate_median, trimmed_mean, weighted_mean
from agent.fed.lora_tensors import (
    A_SUFFIX,
    B_SUFFIX,
    ClientUpdate,
    StrategyError,
    check_update,
    delta_w,
    frozen_lora_a,
    frozen_lora_a_for,
    split_keys,
    with_frozen_a,
)
from agent.fed.partial_sums import finalize, merge, partial_sum
from agent.fed.update_batch import exact_error, update_norm, update_norms

LAYER = "base_model.model.bert.encoder.layer.{i}.{module}"
HEAD_W, HEAD_B = "base_model.model.classifier.weight", "base_model.model.classifier.bias"
HIDDEN, INTER, LABELS = 12, 20, 4
# (module, n_in, n_out): a square, a widening and a narrowing projection, like the real bundle's.
MODULES = [
    ("attention.self.query", HIDDEN, HIDDEN),
    ("intermediate.dense", HIDDEN, INTER),
    ("output.dense", INTER, HIDDEN),
]
PREFIXES = [LAYER.format(i=i, module=m) for i in range(2) for m, _, _ in MODULES]
WEIGHTS = (3, 5, 7, 11)


def _shapes(rank: int = 3) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(2):
        for module, n_in, n_out in MODULES:
            prefix = LAYER.format(i=i, module=module)
            shapes[prefix + A_SUFFIX] = (rank, n_in)
            shapes[prefix + B_SUFFIX] = (n_out, rank)
    shapes[HEAD_W], shapes[HEAD_B] = (LABELS, HIDDEN), (LABELS,)
    return shapes


def _adapter(rng: np.random.Generator, rank: int = 3, frozen: dict | None = None) -> dict[str, np.ndarray]:
    out = {}
    for key, shape in _shapes(rank).items():
        if frozen is not None and key in frozen:
            out[key] = frozen[key]
        else:
            out[key] = rng.standard_normal(shape).astype(np.float32)
    return out


def _updates(seed: int = 0, weights=WEIGHTS, rank: int = 3, frozen: dict | None = None) -> list[ClientUpdate]:
    rng = np.random.default_rng(seed)
    return [ClientUpdate(_adapter(rng, rank, frozen), n) for n in weights]


def _frozen(rank: int = 3, seed: int = 7) -> dict[str, np.ndarray]:
    return frozen_lora_a_for(_shapes(rank), seed)


def _w(updates: list[ClientUpdate]) -> np.ndarray:
    w = np.array([u.num_examples for u in updates], dtype=np.float64)
    return w / w.sum()


def _mean_tensor(updates: list[ClientUpdate], key: str) -> np.ndarray:
    return np.average(
        np.stack([u.tensors[key].astype(np.float64) for u in updates]), axis=0, weights=_w(updates)
    )


def _mean_delta(updates: list[ClientUpdate], prefix: str) -> np.ndarray:
    stack = np.stack([delta_w(u.tensors)[prefix] for u in updates])
    return np.average(stack, axis=0, weights=_w(updates))


def _agg_delta(agg: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    return delta_w(agg)[prefix]


def _dense_norm(tensors, reference=None) -> float:
    """The update norm the slow way: form every ΔW."""
    total = 0.0
    d, plain = delta_w(tensors), [k for k in tensors if k in (HEAD_W, HEAD_B)]
    dr = delta_w(reference) if reference is not None else {}
    for prefix, delta in d.items():
        total += float(np.sum((delta - dr.get(prefix, 0.0)) ** 2))
    for key in plain:
        x = tensors[key].astype(np.float64) - (reference[key] if reference is not None else 0.0)
        total += float(np.sum(x**2))
    return math.sqrt(total)


# ------------------------------------------------------------------------------------------------
# Helpers


def test_split_keys_pairs_plain_and_b_only():
    keys = list(_shapes())
    split = split_keys(keys)
    assert set(split.pairs) == set(PREFIXES)
    assert split.pairs[PREFIXES[0]] == (PREFIXES[0] + A_SUFFIX, PREFIXES[0] + B_SUFFIX)
    assert set(split.plain) == {HEAD_W, HEAD_B}
    b_only = split_keys([k for k in keys if not k.endswith(A_SUFFIX)])
    assert set(b_only.pairs) == set(PREFIXES)  # an FFA upload: B without its A is a pair
    with pytest.raises(StrategyError, match="lora_A without its lora_B"):
        split_keys([PREFIXES[0] + A_SUFFIX])


def test_update_norm_is_frobenius_norm_of_every_delta_w_and_plain_tensor():
    updates = _updates(1)
    ref = _adapter(np.random.default_rng(9))
    for u in updates:
        assert update_norm(u.tensors) == pytest.approx(_dense_norm(u.tensors), rel=1e-5)
        assert update_norm(u.tensors, reference=ref) == pytest.approx(_dense_norm(u.tensors, ref), rel=1e-5)
    norms = update_norms(updates)
    assert norms == pytest.approx([_dense_norm(u.tensors) for u in updates], rel=1e-5)


def test_delta_w_is_b_times_a():
    t = _adapter(np.random.default_rng(2))
    d = delta_w(t)
    p = PREFIXES[1]
    np.testing.assert_allclose(d[p], t[p + B_SUFFIX].astype(np.float64) @ t[p + A_SUFFIX], rtol=1e-12)
    assert d[p].shape == (INTER, HIDDEN)


# ------------------------------------------------------------------------------------------------
# frozen A


def test_frozen_lora_a_is_deterministic_and_depends_on_key_and_seed():
    key = PREFIXES[0] + A_SUFFIX
    a = frozen_lora_a(7, key, 8, 384)
    assert a.dtype == np.float32 and a.shape == (8, 384)
    assert np.array_equal(a, frozen_lora_a(7, key, 8, 384))
    assert not np.array_equal(a, frozen_lora_a(8, key, 8, 384))
    assert not np.array_equal(a, frozen_lora_a(7, PREFIXES[1] + A_SUFFIX, 8, 384))
    bound = 1 / math.sqrt(384)  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(n_in), 1/sqrt(n_in))
    assert np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.95 * bound  # spread over the whole range, not a narrower one
    assert abs(float(a.mean())) < 0.05 * bound
    assert float(a.var()) == pytest.approx(bound**2 / 3, rel=0.1)


def test_frozen_lora_a_is_default_rng_seeded_by_seed_and_sha256_of_the_key():
    import hashlib

    key = "some.module.lora_A.weight"
    digest = hashlib.sha256(b"edge-agent/ffa-lora/lora_A/v1\x00" + key.encode()).digest()
    rng = np.random.default_rng(np.random.SeedSequence([5, int.from_bytes(digest, "little")]))
    expected = ((2 * rng.random(3 * 10) - 1) / math.sqrt(10)).astype(np.float32).reshape(3, 10)
    assert np.array_equal(frozen_lora_a(5, key, 3, 10), expected)


def test_frozen_lora_a_golden_values():
    # Pinned: boxes and the aggregator must agree across releases; change the tag to change these.
    a = frozen_lora_a(12345, "k", 1, 3)
    np.testing.assert_array_equal(
        a, np.array([[0.5221385359764099, 0.04641885682940483, 0.49151211977005005]], np.float32)
    )


def test_frozen_lora_a_for_fills_every_a_from_arrays_or_shapes():
    shapes = _shapes(4)
    frozen = frozen_lora_a_for(shapes, seed=3)
    assert set(frozen) == {p + A_SUFFIX for p in PREFIXES}
    for key, a in frozen.items():
        assert a.shape == shapes[key]
        assert np.array_equal(a, frozen_lora_a(3, key, *shapes[key]))
    from_arrays = frozen_lora_a_for(_adapter(np.random.default_rng(0), 4), seed=3)
    assert all(np.array_equal(from_arrays[k], frozen[k]) for k in frozen)
    with pytest.raises(StrategyError):
        frozen_lora_a(-1, "k", 1, 3)


def test_with_frozen_a_completes_b_only_uploads_and_refuses_another_a():
    frozen = _frozen()
    full = _adapter(np.random.default_rng(0), frozen=frozen)
    upload = st.upload_tensors(full, "ffa_lora")
    assert not any(k.endswith(A_SUFFIX) for k in upload) and len(upload) == len(full) - len(PREFIXES)
    completed = with_frozen_a(upload, frozen)
    assert completed.keys() == full.keys()
    bad = dict(full)
    key = PREFIXES[2] + A_SUFFIX
    bad[key] = np.nextafter(bad[key], np.float32(1))  # one ulp off: not the fleet's A
    with pytest.raises(StrategyError, match="frozen A"):
        with_frozen_a(bad, frozen)
    assert st.upload_tensors(full, "product_svd").keys() == full.keys()


# ------------------------------------------------------------------------------------------------
# fedavg_naive


def test_fedavg_naive_is_the_weighted_mean_of_every_tensor():
    updates = _updates(0)
    agg = st.fedavg_naive(updates)
    assert agg.keys() == updates[0].tensors.keys()
    for key in agg:
        assert agg[key].dtype == np.float32
        np.testing.assert_allclose(agg[key], _mean_tensor(updates, key), rtol=1e-5, atol=1e-6)


def test_fedavg_naive_is_not_the_mean_of_the_products():
    updates = _updates(0)
    agg = st.fedavg_naive(updates)
    for prefix in PREFIXES:
        exact = _mean_delta(updates, prefix)
        gap = np.linalg.norm(_agg_delta(agg, prefix) - exact)
        assert gap > 0.3 * np.linalg.norm(exact)  # random A's: the product of means is far off
    assert exact_error(updates, agg) > 0.5


# ------------------------------------------------------------------------------------------------
# ffa_lora


def test_ffa_lora_is_exact_mean_of_products():
    frozen = _frozen()
    updates = _updates(3, frozen=frozen)
    agg = st.ffa_lora(updates)
    for prefix in PREFIXES:
        np.testing.assert_array_equal(agg[prefix + A_SUFFIX], frozen[prefix + A_SUFFIX])
        np.testing.assert_allclose(_agg_delta(agg, prefix), _mean_delta(updates, prefix), atol=1e-6)
        np.testing.assert_allclose(
            agg[prefix + B_SUFFIX], _mean_tensor(updates, prefix + B_SUFFIX), atol=1e-6
        )
    for key in (HEAD_W, HEAD_B):
        np.testing.assert_allclose(agg[key], _mean_tensor(updates, key), atol=1e-6)
    assert exact_error(updates, agg) < 1e-6


def test_ffa_lora_b_only_uploads_with_frozen_a_match_full_uploads():
    frozen = _frozen()
    updates = _updates(3, frozen=frozen)
    uploads = [ClientUpdate(st.upload_tensors(u.tensors, "ffa_lora"), u.num_examples) for u in updates]
    agg = st.ffa_lora(uploads, frozen_a=frozen)
    full = st.ffa_lora(updates)
    assert agg.keys() == full.keys()
    for key in agg:
        np.testing.assert_array_equal(agg[key], full[key])
    with pytest.raises(StrategyError, match="frozen_a"):
        st.ffa_lora(uploads)


def test_ffa_lora_refuses_a_mismatched_a_naming_the_key():
    frozen = _frozen()
    updates = _updates(3, frozen=frozen)
    key = PREFIXES[4] + A_SUFFIX
    tensors = dict(updates[2].tensors)
    tensors[key] = tensors[key].copy()
    tensors[key][0, 0] += 1e-3
    updates[2] = ClientUpdate(tensors, updates[2].num_examples)
    with pytest.raises(StrategyError, match=f"update 2: {key}"):
        st.ffa_lora(updates)
    with pytest.raises(StrategyError, match="frozen A"):
        st.ffa_lora(updates, frozen_a=frozen)
    # Every box trained its own A: FFA-LoRA refuses rather than averaging wrongly.
    with pytest.raises(StrategyError):
        st.ffa_lora(_updates(4))


# ------------------------------------------------------------------------------------------------
# product_svd


@pytest.mark.parametrize("method", ["auto", "factored", "dense"])
def test_product_svd_is_exact_when_the_combined_rank_fits(method):
    updates = _updates(5, rank=2)
    rank = 2 * len(updates)  # K·r: the mean has at most this rank
    agg = st.product_svd(updates, rank=rank, method=method)
    for prefix in PREFIXES:
        exact = _mean_delta(updates, prefix)
        np.testing.assert_allclose(_agg_delta(agg, prefix), exact, atol=1e-5 * np.abs(exact).max())
        assert agg[prefix + A_SUFFIX].shape[0] == rank and agg[prefix + B_SUFFIX].shape[1] == rank
    for key in (HEAD_W, HEAD_B):
        np.testing.assert_allclose(agg[key], _mean_tensor(updates, key), atol=1e-6)


@pytest.mark.parametrize("method", ["auto", "factored", "dense"])
def test_product_svd_is_exact_when_clients_share_the_a_row_space(method):
    rng = np.random.default_rng(6)
    base = _adapter(rng, rank=3)
    updates = []
    for n in WEIGHTS:
        t = _adapter(rng, rank=3)
        for prefix in PREFIXES:  # A_k = M_k·A_0: another basis of the same row space
            t[prefix + A_SUFFIX] = (rng.standard_normal((3, 3)) @ base[prefix + A_SUFFIX]).astype(np.float32)
        updates.append(ClientUpdate(t, n))
    agg = st.product_svd(updates, method=method)  # rank defaults to the clients' 3
    for prefix in PREFIXES:
        exact = _mean_delta(updates, prefix)
        # Rank 3 up to the float32 rounding of the A's.
        assert np.linalg.matrix_rank(exact, tol=1e-4 * np.abs(exact).max()) <= 3
        np.testing.assert_allclose(_agg_delta(agg, prefix), exact, atol=1e-5 * np.abs(exact).max())
        assert agg[prefix + A_SUFFIX].shape == (3, base[prefix + A_SUFFIX].shape[1])


@pytest.mark.parametrize("method", ["auto", "factored", "dense"])
def test_product_svd_truncation_is_the_best_rank_r_error(method):
    updates = _updates(7, rank=3)
    rank = 2
    agg = st.product_svd(updates, rank=rank, method=method)
    for prefix in PREFIXES:
        mean = _mean_delta(updates, prefix)
        u, s, vt = np.linalg.svd(mean)
        best = (u[:, :rank] * s[:rank]) @ vt[:rank]
        got = _agg_delta(agg, prefix)
        # Eckart–Young: no rank-2 matrix is closer; product_svd reaches that error and that matrix.
        assert np.linalg.norm(got - mean) == pytest.approx(math.sqrt(np.sum(s[rank:] ** 2)), rel=1e-4)
        np.testing.assert_allclose(got, best, atol=1e-5 * s[0])
        # Balanced factors: B' = U·sqrt(S), A' = sqrt(S)·Vᵀ.
        b, a = agg[prefix + B_SUFFIX].astype(np.float64), agg[prefix + A_SUFFIX].astype(np.float64)
        np.testing.assert_allclose(np.linalg.norm(b, axis=0) ** 2, s[:rank], rtol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(a, axis=1) ** 2, s[:rank], rtol=1e-4)
    err = exact_error(updates, agg)
    assert err > 1e-2  # truncation is real here, and exact_error reports it


def test_product_svd_methods_agree_and_pad_a_large_rank_with_zeros():
    updates = _updates(8)
    factored = st.product_svd(updates, rank=4, method="factored")
    dense = st.product_svd(updates, rank=4, method="dense")
    for prefix in PREFIXES:
        np.testing.assert_allclose(_agg_delta(factored, prefix), _agg_delta(dense, prefix), atol=1e-4)
        # Signs are fixed, so the factors themselves agree too (distinct singular values here).
        np.testing.assert_allclose(factored[prefix + A_SUFFIX], dense[prefix + A_SUFFIX], atol=1e-4)
    big = st.product_svd(updates, rank=30)  # more than min(n_out, n_in) = 12
    a = big[PREFIXES[0] + A_SUFFIX]
    assert a.shape == (30, HIDDEN) and not a[12:].any()
    with pytest.raises(StrategyError, match="rank"):
        st.product_svd(updates, rank=0)


# ------------------------------------------------------------------------------------------------
# Robust variants


def _with_hostile(updates: list[ClientUpdate], index: int = 0, keys=None) -> list[ClientUpdate]:
    """Client ``index`` sends its tensors scaled by -100 (B and plain only when ``keys`` says so)."""
    out = list(updates)
    t = dict(out[index].tensors)
    for key in keys or t:
        t[key] = (-100.0 * t[key]).astype(np.float32)
    out[index] = ClientUpdate(t, out[index].num_examples)
    return out


def _honest_cluster(seed: int, k: int = 6, frozen: dict | None = None, noise: float = 0.01):
    """k honest boxes near one common adapter: the robust aggregate should stay near it."""
    rng = np.random.default_rng(seed)
    center = _adapter(rng, frozen=frozen)
    updates = []
    for i in range(k):
        t = {
            key: v
            if frozen is not None and key in frozen
            else (v + noise * rng.standard_normal(v.shape)).astype(np.float32)
            for key, v in center.items()
        }
        updates.append(ClientUpdate(t, 10 + i))
    return center, updates


@pytest.mark.parametrize("name", ["ffa_lora_trimmed_mean", "ffa_lora_median"])
def test_ffa_robust_variants_resist_one_hostile_box(name):
    frozen = _frozen()
    center, honest = _honest_cluster(11, frozen=frozen)
    hostile = _with_hostile(honest, 2, keys=[k for k in center if not k.endswith(A_SUFFIX)])
    plain = st.ffa_lora(hostile)
    robust = (
        st.aggregate(name, hostile, trim_fraction=0.2) if "trimmed" in name else st.aggregate(name, hostile)
    )
    for prefix in PREFIXES:
        target = delta_w(center)[prefix]
        scale = np.linalg.norm(target)
        assert np.linalg.norm(_agg_delta(plain, prefix) - target) > 5 * scale  # the mean is dragged away
        assert np.linalg.norm(_agg_delta(robust, prefix) - target) < 0.05 * scale
    assert np.abs(robust[HEAD_W] - center[HEAD_W]).max() < 0.05


@pytest.mark.parametrize("name", ["product_svd_trimmed_mean", "product_svd_median"])
def test_product_robust_variants_resist_one_hostile_box(name):
    center, honest = _honest_cluster(12)
    hostile = _with_hostile(honest, 4, keys=[p + B_SUFFIX for p in PREFIXES] + [HEAD_W, HEAD_B])
    plain = st.product_svd(hostile)
    robust = (
        st.aggregate(name, hostile, trim_fraction=0.2) if "trimmed" in name else st.aggregate(name, hostile)
    )
    for prefix in PREFIXES:
        target = delta_w(center)[prefix]
        scale = np.linalg.norm(target)
        assert np.linalg.norm(_agg_delta(plain, prefix) - target) > 5 * scale
        assert np.linalg.norm(_agg_delta(robust, prefix) - target) < 0.1 * scale


def test_trimmed_mean_and_median_match_numpy_references_and_ignore_weights():
    rng = np.random.default_rng(13)
    for k in (1, 2, 5, 10, 37):
        stack = rng.standard_normal((k, 3001)).astype(np.float32)
        weights = rng.random(k)
        weights /= weights.sum()
        cut = int(0.2 * k)
        expected = np.sort(stack.astype(np.float64), axis=0)[cut : k - cut].mean(axis=0)
        np.testing.assert_allclose(trimmed_mean(0.2)(stack, weights), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(coordinate_median(stack, weights), np.median(stack, axis=0), rtol=1e-6)
        np.testing.assert_allclose(weighted_mean(stack, weights), weights @ stack, rtol=1e-5, atol=1e-6)
        skewed = np.full(k, 1e-6)
        skewed[0] = 1.0
        np.testing.assert_array_equal(trimmed_mean(0.2)(stack, skewed), trimmed_mean(0.2)(stack, weights))
    big = rng.standard_normal((300, 9000)).astype(np.float32)  # the threaded path
    expected = np.sort(big, axis=0)[30:270].mean(axis=0, dtype=np.float64)
    np.testing.assert_allclose(trimmed_mean(0.1)(big, np.full(300, 1 / 300)), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(StrategyError):
        trimmed_mean(0.5)


def test_clip_norm_bounds_every_update_and_matches_manual_clipping():
    frozen = _frozen()
    updates = _with_hostile(
        _updates(14, frozen=frozen), 1, keys=[p + B_SUFFIX for p in PREFIXES] + [HEAD_W, HEAD_B]
    )
    norms = update_norms(updates)
    bound = float(np.median(norms))
    agg = st.ffa_lora(updates, clip_norm=bound)
    assert update_norm(agg) <= bound * (1 + 1e-6)  # a mean of vectors inside the ball stays inside
    manual = []
    for u, n in zip(updates, norms, strict=True):
        s = min(1.0, bound / n)
        t = {k: (v if k.endswith(A_SUFFIX) else v * np.float32(s)) for k, v in u.tensors.items()}
        assert update_norm(t) <= bound * (1 + 1e-6)
        manual.append(ClientUpdate(t, u.num_examples))
    expected = st.ffa_lora(manual)
    for key in agg:
        np.testing.assert_allclose(agg[key], expected[key], rtol=1e-5, atol=1e-6)
    # The median bound is the same bound here.
    by_median = st.ffa_lora(updates, clip_median_factor=1.0)
    for key in agg:
        np.testing.assert_allclose(by_median[key], agg[key], rtol=1e-5, atol=1e-6)


def test_clip_towards_a_reference_bounds_the_distance_from_it():
    frozen = _frozen()
    ref = _adapter(np.random.default_rng(20), frozen=frozen)
    updates = _updates(15, frozen=frozen)
    dist = [update_norm(u.tensors, reference=ref) for u in updates]
    bound = 0.5 * min(dist)
    agg = st.ffa_lora(updates, clip_norm=bound, reference=ref)
    assert update_norm(agg, reference=ref) <= bound * (1 + 1e-6)
    # Product: the clipped mean of ΔW stays within the bound of the reference's ΔW (rank 18 keeps
    # every component, so no truncation adds to the distance).
    pref = _adapter(np.random.default_rng(21))
    prod = st.product_svd(_updates(16), clip_norm=1.0, reference=pref, rank=18)
    assert _dense_norm(prod, pref) <= 1.0 + 1e-4
    with pytest.raises(StrategyError, match="only used by clipping"):
        st.ffa_lora(updates, reference=ref)


def test_product_svd_clipping_scales_each_delta_w():
    updates = _updates(17)
    norms = update_norms(updates)
    bound = float(norms.min())
    agg = st.product_svd(updates, clip_norm=bound, rank=12)
    manual = [
        ClientUpdate(
            {
                k: v * np.float32(bound / n) if k.endswith(B_SUFFIX) or k in (HEAD_W, HEAD_B) else v
                for k, v in u.tensors.items()
            },
            u.num_examples,
        )
        for u, n in zip(updates, norms, strict=True)
    ]
    expected = st.product_svd(manual, rank=12)
    for prefix in PREFIXES:
        np.testing.assert_allclose(_agg_delta(agg, prefix), _agg_delta(expected, prefix), atol=1e-5)
    assert update_norm(agg) <= bound * (1 + 1e-5)


# ------------------------------------------------------------------------------------------------
# Partial sums


def _assert_same_aggregate(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    da, db = delta_w(a), delta_w(b)
    for prefix in da:
        np.testing.assert_allclose(da[prefix], db[prefix], atol=atol)
    for key in (HEAD_W, HEAD_B):
        np.testing.assert_allclose(a[key], b[key], atol=atol)


@pytest.mark.parametrize("strategy", ["fedavg_naive", "ffa_lora", "product_svd"])
def test_merged_partial_sums_equal_the_strategy_over_all_updates(strategy):
    frozen = _frozen()
    updates = _updates(18, weights=(3, 5, 7, 11, 2), frozen=frozen if strategy == "ffa_lora" else None)
    whole = st.aggregate(strategy, updates)
    parts = [
        partial_sum(updates[:2], strategy),
        partial_sum(updates[2:3], strategy),
        partial_sum(updates[3:], strategy),
    ]
    merged = merge(merge(parts[0], parts[1]), parts[2])
    assert merged.count == 5 and merged.total_weight == sum(u.num_examples for u in updates)
    _assert_same_aggregate(finalize(merged), whole)
    _assert_same_aggregate(finalize(merge(parts[2], merge(parts[1], parts[0])), strategy), whole)
    if strategy != "product_svd":  # the weighted means themselves, tensor by tensor
        fin = finalize(merged)
        for key in fin:
            np.testing.assert_allclose(fin[key], whole[key], rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    strategy=hst.sampled_from(["fedavg_naive", "ffa_lora", "product_svd"]),
    weights=hst.lists(hst.integers(1, 1000), min_size=2, max_size=7),
    data=hst.data(),
)
def test_partial_sums_are_associative_over_any_split_and_grouping(strategy, weights, data):
    frozen = _frozen(rank=2)
    updates = _updates(19, weights=tuple(weights), rank=2, frozen=frozen if strategy == "ffa_lora" else None)
    labels = data.draw(hst.lists(hst.integers(0, 3), min_size=len(updates), max_size=len(updates)))
    groups = [
        [u for u, g in zip(updates, labels, strict=True) if g == label] for label in sorted(set(labels))
    ]
    parts = [partial_sum(g, strategy) for g in groups]
    order = data.draw(hst.permutations(range(len(parts))))
    # Fold in a random order with random nesting: ((p1 + p3) + p0) + p2 ...
    acc = parts[order[0]]
    for i in order[1:]:
        acc = merge(acc, parts[i]) if data.draw(hst.booleans()) else merge(parts[i], acc)
    _assert_same_aggregate(finalize(acc), st.aggregate(strategy, updates), atol=1e-4)


def test_partial_sums_refuse_what_does_not_add_up():
    frozen = _frozen()
    ffa_updates = _updates(20, frozen=frozen)
    for name in ("ffa_lora_median", "ffa_lora_trimmed_mean", "product_svd_median"):
        with pytest.raises(StrategyError, match="not associative"):
            partial_sum(ffa_updates, name)
    ffa_part = partial_sum(ffa_updates, "ffa_lora")
    with pytest.raises(StrategyError, match="is fedavg_naive"):
        merge(ffa_part, partial_sum(_updates(21), "fedavg_naive"))
    other_seed = partial_sum(_updates(22, frozen=_frozen(seed=8)), "ffa_lora")
    with pytest.raises(StrategyError, match="frozen A differs"):
        merge(ffa_part, other_seed)
    with pytest.raises(StrategyError, match="not product_svd"):
        finalize(ffa_part, "product_svd")
    with pytest.raises(StrategyError):
        merge()


def test_partial_sums_with_a_fixed_clip_equal_the_clipped_strategy():
    frozen = _frozen()
    updates = _updates(23, frozen=frozen)
    bound = float(np.median(update_norms(updates)))
    merged = merge(
        partial_sum(updates[:2], "ffa_lora", clip_norm=bound),
        partial_sum(updates[2:], "ffa_lora", clip_norm=bound),
    )
    fin, whole = finalize(merged), st.ffa_lora(updates, clip_norm=bound)
    for key in fin:
        np.testing.assert_allclose(fin[key], whole[key], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Bad input and the registry


def _poisoned(key: str, value: float, index: int = 1, weights=WEIGHTS) -> list[ClientUpdate]:
    updates = _updates(24, weights=weights, frozen=_frozen())
    t = {k: v.copy() for k, v in updates[index].tensors.items()}
    t[key].flat[3] = value
    updates[index] = ClientUpdate(t, updates[index].num_examples)
    return updates


@pytest.mark.parametrize("name", sorted(st.STRATEGIES))
@pytest.mark.parametrize("key,value", [(PREFIXES[1] + B_SUFFIX, np.nan), (HEAD_W, np.inf), (HEAD_B, -np.inf)])
def test_every_strategy_refuses_non_finite_values_naming_the_update(name, key, value):
    with pytest.raises(StrategyError, match=f"update 1: {key} has non-finite"):
        st.aggregate(name, _poisoned(key, value))


def test_non_finite_values_are_refused_in_a_zero_weight_update_and_in_norms():
    with pytest.raises(StrategyError, match="update 1"):
        st.ffa_lora(_poisoned(HEAD_W, np.nan, weights=(3, 0, 7, 11)))
    with pytest.raises(StrategyError, match="update 1"):
        st.ffa_lora(_poisoned(PREFIXES[0] + B_SUFFIX, np.inf), clip_median_factor=2.0)
    with pytest.raises(StrategyError, match="update 1"):
        st.product_svd(_poisoned(PREFIXES[0] + A_SUFFIX, np.nan), method="dense")
    with pytest.raises(StrategyError, match="update 0: .* non-finite"):
        st.ffa_lora(_poisoned(PREFIXES[0] + A_SUFFIX, np.nan, index=0))


@pytest.mark.parametrize("name", sorted(st.STRATEGIES))
def test_every_strategy_refuses_inconsistent_updates(name):
    good = _updates(25, frozen=_frozen())
    missing = list(good)
    missing[2] = ClientUpdate({k: v for k, v in good[2].tensors.items() if k != HEAD_B}, 5)
    with pytest.raises(StrategyError, match="update 2: keys differ"):
        st.aggregate(name, missing)
    reshaped = list(good)
    t = dict(good[3].tensors)
    t[HEAD_W] = np.zeros((LABELS + 1, HIDDEN), np.float32)
    reshaped[3] = ClientUpdate(t, 5)
    with pytest.raises(StrategyError, match="update 3: .*shape"):
        st.aggregate(name, reshaped)
    with pytest.raises(StrategyError, match="total weight"):
        st.aggregate(name, [ClientUpdate(u.tensors, 0) for u in good])
    with pytest.raises(StrategyError, match="non-negative"):
        st.aggregate(name, [ClientUpdate(good[0].tensors, -1)] + good[1:])
    with pytest.raises(StrategyError, match="no updates"):
        st.aggregate(name, [])
    with pytest.raises(StrategyError, match="takes no"):
        st.aggregate(name, good, bogus=1)


def test_zero_weight_updates_have_no_effect():
    updates = _updates(26, frozen=_frozen())
    with_idle = updates + [ClientUpdate(_adapter(np.random.default_rng(99), frozen=_frozen()), 0)]
    for name in ("ffa_lora", "ffa_lora_median", "fedavg_naive"):
        a, b = st.aggregate(name, updates), st.aggregate(name, with_idle)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_registry_describes_every_strategy():
    assert {
        "fedavg_naive",
        "ffa_lora",
        "product_svd",
        "ffa_lora_trimmed_mean",
        "ffa_lora_median",
        "product_svd_trimmed_mean",
        "product_svd_median",
    } == set(st.STRATEGIES)
    for name, spec in st.STRATEGIES.items():
        assert spec.name == name
        assert spec.freezes_a == name.startswith("ffa_lora")
        assert spec.uploads_a == (not spec.freezes_a)
        assert spec.takes_rank == name.startswith("product_svd")
        assert spec.associative == (spec.combine == "mean")
        assert spec.exact == (name in ("ffa_lora", "product_svd"))
    with pytest.raises(StrategyError, match="unknown strategy"):
        st.aggregate("fedprox", _updates(0))
    with pytest.raises(StrategyError, match="takes no"):
        st.aggregate("ffa_lora", _updates(0, frozen=_frozen()), rank=4)


def test_check_update_accepts_a_good_upload_and_names_what_is_wrong():
    frozen = _frozen()
    t = st.upload_tensors(_adapter(np.random.default_rng(27), frozen=frozen), "ffa_lora")
    like = {k: v.shape for k, v in t.items()}
    check_update(t, like)
    bad = dict(t)
    bad[HEAD_B] = np.array([np.nan] * LABELS, np.float32)
    with pytest.raises(StrategyError, match=f"{HEAD_B}: non-finite"):
        check_update(bad, like)
    with pytest.raises(StrategyError, match="shape"):
        check_update({**t, HEAD_B: np.zeros(LABELS + 1, np.float32)}, like)
    with pytest.raises(StrategyError, match="missing"):
        check_update({k: v for k, v in t.items() if k != HEAD_W}, like)
    with pytest.raises(StrategyError, match="float array"):
        check_update({**t, HEAD_B: np.zeros(LABELS, np.int64)}, like)
