"""Aggregation strategies for federated LoRA: pure numpy functions over (adapter tensors, example counts).

Averaging A and B apart is not averaging the updates: ``mean(B)·mean(A) != mean(B·A)`` (adapters,
pairs and ``ΔW = B·A``: ``agent.fed.lora_tensors``). The strategies, named after what they are (see
``STRATEGIES``, the registry of the names a round announcement carries; ``aggregate`` runs one):

- ``fedavg_naive``: A and B averaged apart. The baseline that shows the error, not for production.
- ``ffa_lora`` (FFA-LoRA, arXiv 2403.12313): A frozen from the fleet seed (``frozen_lora_a``), identical
  on every box, so only B (and the head) is trained, uploaded and averaged: ``mean(B)·A = mean(B·A)``.
- ``product_svd`` (FlexLoRA, arXiv 2402.11505): the weighted mean of ``ΔW_k = B_k·A_k`` re-factorised by
  a truncated SVD to rank r; exact up to the truncation (exact when the mean's rank is at most r).
- robust variants against faulty or hostile boxes: a coordinate-wise ``trimmed_mean`` or
  ``coordinate_median`` in place of the mean (``combine=``, ``agent.fed.combines``), and norm clipping
  (``clip_norm=``, ``clip_median_factor=``, ``agent.fed.update_batch``), composable with each strategy.

The box's fast learner (``agent.linear``: logistic regression over *hashed* n-grams) needs none of
this: every box shares one feature space by construction, so the weighted mean of ``coef`` and
``intercept`` is the average of the models' scores exactly (FedAvg is exact for linear models), once
the fleet fixes one ``idf`` vector (today each box learns its own). It is not federated yet; the box
refits it from its own samples each round.

Weights are the clients' ``num_examples``. The weighted means also split over workers
(``agent.fed.partial_sums``). Inconsistent input raises ``StrategyError``. Numerics: stacks are float32
and the weighted sums run in float32 BLAS; the SVD steps (``agent.fed.low_rank``) run in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from agent.fed.combines import Combine, combine_stack, coordinate_median, is_mean, trimmed_mean
from agent.fed.lora_tensors import A_SUFFIX, ClientUpdate, StrategyError, Tensors

# agent/learner/train.py imports frozen_lora_a from here; its home is now agent.fed.lora_tensors.
from agent.fed.lora_tensors import frozen_lora_a as frozen_lora_a
from agent.fed.low_rank import check_rank, dense_mean, dense_svd, factored_svd
from agent.fed.update_batch import (
    Coefs,
    Scratch,
    clip_scales,
    clipped_stack,
    common_frozen_a,
    ensure_finite,
    linear_sum,
    mean_coefs,
    prepare,
    quiet_numpy,
    raise_non_finite,
    reference_values,
    stacked,
    stacked_pair,
)

_F32 = np.float32
# Memory bound of one chunk of per-client ΔW in the robust product path (bytes).
_CHUNK_BYTES = 128 << 20


@quiet_numpy
def fedavg_naive(
    updates: Sequence[ClientUpdate],
    *,
    combine: Combine | None = None,
    clip_norm: float | None = None,
    clip_median_factor: float | None = None,
    reference: Tensors | None = None,
) -> dict[str, np.ndarray]:
    """Naive FedAvg: the weighted mean of every tensor, A and B apart. **Baseline only.**

    ``mean(B)·mean(A) != mean(B·A)``: the result's ΔW is not the mean of the clients' ΔW, and the gap
    grows as the boxes' A drift apart (``exact_error`` measures it). This is what Flower's FlowerTune
    does; it is here to show the error, not to ship. Clipping scales B and the plain tensors (towards
    ``reference`` when given; exact for ΔW only without one).
    """
    batch = prepare(updates)
    w = batch.weights / batch.weights.sum()
    scales = clip_scales(batch, clip_norm, clip_median_factor, reference, None)
    clipped = {b for _, b in batch.split.pairs.values()} | set(batch.split.plain)
    ref = reference_values(reference, batch, clipped)
    coefs = mean_coefs(w, scales, reference is not None)
    scratch = Scratch()
    out: dict[str, np.ndarray] = {}
    for key in batch.shapes:
        # A is averaged unclipped: scaling B alone scales ΔW = B·A exactly.
        key_scales = scales if key in clipped else None
        if is_mean(combine):
            stack = stacked(batch, key, scratch, check=False)
            flat = linear_sum(stack, coefs if key in clipped else Coefs(w, 0.0), ref.get(key))
            ensure_finite(flat, batch, (key,))
        else:
            assert combine is not None
            stack = stacked(batch, key, scratch)
            flat = combine_stack(combine, clipped_stack(stack, key_scales, ref.get(key)), w, key)
        out[key] = flat.astype(_F32).reshape(batch.shapes[key])
    return out


@quiet_numpy
def ffa_lora(
    updates: Sequence[ClientUpdate],
    *,
    frozen_a: Tensors | None = None,
    combine: Combine | None = None,
    clip_norm: float | None = None,
    clip_median_factor: float | None = None,
    reference: Tensors | None = None,
) -> dict[str, np.ndarray]:
    """FFA-LoRA (Sun et al., ICLR'24, arXiv 2403.12313): A frozen and shared, B and the head averaged.

    Every update must carry the same A, bit for bit (``frozen_lora_a`` from the fleet seed), else
    ``StrategyError`` names the key. Uploads without A (the box sends B and the head only) are
    completed from ``frozen_a``, which also checks any A that is sent. Because A is common,
    ``mean(B)·A = mean(B·A)``: exact. With ``combine`` (``trimmed_mean``, ``coordinate_median``) B and
    the head are combined robustly; clipping scales B and the head (towards ``reference``, the global
    the boxes started from, when given). Returns A, B and the plain tensors.
    """
    batch = prepare(updates, frozen_a=frozen_a)
    shared = common_frozen_a(batch)
    w = batch.weights / batch.weights.sum()
    scales = clip_scales(batch, clip_norm, clip_median_factor, reference, shared)
    clipped = [b for _, b in batch.split.pairs.values()] + list(batch.split.plain)
    ref = reference_values(reference, batch, clipped)
    coefs = mean_coefs(w, scales, reference is not None)
    out: dict[str, np.ndarray] = {}
    for prefix, (a_key, _) in batch.split.pairs.items():
        out[a_key] = shared[prefix]
    scratch = Scratch()
    for key in clipped:
        if is_mean(combine):
            flat = linear_sum(stacked(batch, key, scratch, check=False), coefs, ref.get(key))
            ensure_finite(flat, batch, (key,))
        else:
            assert combine is not None
            stack = stacked(batch, key, scratch)
            flat = combine_stack(combine, clipped_stack(stack, scales, ref.get(key)), w, key)
        out[key] = flat.astype(_F32).reshape(batch.shapes[key])
    return {k: out[k] for k in batch.shapes}  # the updates' key order


@quiet_numpy
def product_svd(
    updates: Sequence[ClientUpdate],
    rank: int | None = None,
    *,
    combine: Combine | None = None,
    clip_norm: float | None = None,
    clip_median_factor: float | None = None,
    reference: Tensors | None = None,
    method: Literal["auto", "factored", "dense"] = "auto",
) -> dict[str, np.ndarray]:
    """Product averaging + SVD (FlexLoRA, arXiv 2402.11505): mean of ``ΔW_k = B_k·A_k``, back to rank r.

    Per pair: ``M = Σ w_k B_k·A_k``, then the truncated SVD ``M ≈ U_r S_r V_rᵀ`` gives
    ``B' = U_r·sqrt(S_r)``, ``A' = sqrt(S_r)·V_rᵀ``: the best rank-r approximation (Eckart–Young), exact
    when the mean's rank is at most r. ``rank`` defaults to each pair's client rank (the bundle's
    shape); a smaller mean rank is padded with zero components. Signs are fixed (largest entry of each
    A' row positive) so that every worker gets the same factors.

    ``method``: ``factored`` never forms M: QR of the stacked weighted B's and A's and an SVD of the
    (K·r)² core, exact and cheap while K·r is below the matrix size; ``dense`` forms M by one GEMM and
    takes its top-r singular vectors from the float64 Gram of its smaller side; ``auto`` picks per pair.
    With ``combine`` the per-client ΔW are combined coordinate-wise (in memory-bounded chunks), which
    costs K·n_out·n_in per pair: fine for tens of boxes, slow for thousands. Clipping scales each ΔW
    (towards ``reference``'s ΔW when given). Plain tensors are averaged (or combined).
    """
    if method not in ("auto", "factored", "dense"):
        raise StrategyError(f"unknown product_svd method {method!r}")
    check_rank(rank)
    batch = prepare(updates)
    w = batch.weights / batch.weights.sum()
    scales = clip_scales(batch, clip_norm, clip_median_factor, reference, None)
    ref = reference_values(reference, batch, batch.shapes)
    coefs = mean_coefs(w, scales, reference is not None)
    scratch = Scratch()
    out: dict[str, np.ndarray] = {}
    for prefix, (a_key, b_key) in batch.split.pairs.items():
        target = int(rank) if rank is not None else batch.shapes[a_key][0]
        ref_pair = (ref[b_key], ref[a_key]) if ref else None
        if is_mean(combine):
            b_list = [t[b_key] for t in batch.tensors]
            a_list = [t[a_key] for t in batch.tensors]
            c = coefs.clients
            if ref_pair is not None and coefs.ref:
                # The clipped mean is linear: the reference enters as one more client.
                b_list.append(ref_pair[0])
                a_list.append(ref_pair[1])
                c = np.append(c, coefs.ref)
            (n_out, r), n_in = batch.shapes[b_key], batch.shapes[a_key][1]
            if method == "factored" or (method == "auto" and len(b_list) * r < min(n_out, n_in)):
                bs, as_ = np.stack(b_list, dtype=_F32), np.stack(a_list, dtype=_F32)
                if not (np.isfinite(bs).all() and np.isfinite(as_).all()):
                    raise_non_finite(batch, (a_key, b_key))
                b_new, a_new = factored_svd(bs, as_, c, target)
            else:
                mean = dense_mean(b_list, a_list, c, scratch)
                b_new, a_new = dense_svd(ensure_finite(mean, batch, (a_key, b_key)), target)
        else:
            assert combine is not None
            bs, as_ = stacked_pair(batch, a_key, b_key)
            delta = _combined_delta(bs, as_, w, scales, ref_pair, combine, prefix)
            b_new, a_new = dense_svd(delta, target)
        out[b_key], out[a_key] = b_new, a_new
    for key in batch.split.plain:
        if is_mean(combine):
            flat = linear_sum(stacked(batch, key, scratch, check=False), coefs, ref.get(key))
            ensure_finite(flat, batch, (key,))
        else:
            assert combine is not None
            stack = stacked(batch, key, scratch)
            flat = combine_stack(combine, clipped_stack(stack, scales, ref.get(key)), w, key)
        out[key] = flat.astype(_F32).reshape(batch.shapes[key])
    return {k: out[k] for k in batch.shapes}


def _combined_delta(
    bs: np.ndarray,
    as_: np.ndarray,
    w: np.ndarray,
    scales: np.ndarray | None,
    ref_pair: tuple[np.ndarray, np.ndarray] | None,
    combine: Combine,
    prefix: str,
) -> np.ndarray:
    """``combine`` over the clients' ΔW, in row chunks of at most ``_CHUNK_BYTES`` of client values."""
    k, n_out, _ = bs.shape
    n_in = as_.shape[2]
    rows = max(1, _CHUNK_BYTES // (4 * k * n_in))
    out = np.empty((n_out, n_in), dtype=_F32)
    ref_delta = ref_pair[0] @ ref_pair[1] if ref_pair is not None else None
    for i in range(0, n_out, rows):
        ie = min(i + rows, n_out)
        chunk = np.matmul(bs[:, i:ie, :], as_).reshape(k, -1)
        ref_chunk = ref_delta[i:ie] if ref_delta is not None else None
        chunk = clipped_stack(chunk, scales, ref_chunk)
        out[i:ie] = combine_stack(combine, chunk, w, prefix).reshape(ie - i, n_in)
    return out


# --------------------------------------------------------------------------------------------------
# Registry: the names a round announcement carries


@dataclass(frozen=True)
class StrategySpec:
    """A strategy as a round announces it.

    ``freezes_a``: boxes train B only, with A from ``frozen_lora_a`` and the round's seed.
    ``uploads_a``: boxes upload their A (``upload_tensors`` drops it otherwise: half the bytes).
    ``exact``: the aggregate's ΔW is the weighted mean of the clients' ΔW (``product_svd``: up to
    truncation to rank). ``takes_rank``: accepts ``rank``. ``associative``: has partial sums.
    """

    name: str
    base: str
    combine: str  # "mean", "trimmed_mean" or "median"
    freezes_a: bool
    uploads_a: bool
    exact: bool
    takes_rank: bool
    associative: bool
    summary: str


_COMMON_PARAMS = frozenset({"clip_norm", "clip_median_factor", "reference"})
_BASE_PARAMS = {
    "fedavg_naive": _COMMON_PARAMS,
    "ffa_lora": _COMMON_PARAMS | {"frozen_a"},
    "product_svd": _COMMON_PARAMS | {"rank", "method"},
}
_BASE_FUNCS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "fedavg_naive": fedavg_naive,
    "ffa_lora": ffa_lora,
    "product_svd": product_svd,
}


def _make_specs() -> dict[str, StrategySpec]:
    base_info = {
        "fedavg_naive": (False, True, "A and B averaged apart (baseline: mean(B)·mean(A) != mean(B·A))"),
        "ffa_lora": (True, False, "FFA-LoRA, arXiv 2403.12313: A frozen from the fleet seed, B averaged"),
        "product_svd": (False, True, "FlexLoRA, arXiv 2402.11505: mean of B·A, truncated SVD to rank r"),
    }
    specs = {}
    for base, (freezes, uploads_a, summary) in base_info.items():
        for comb, suffix, note in (
            ("mean", "", ""),
            ("trimmed_mean", "_trimmed_mean", "; coordinate-wise trimmed mean"),
            ("median", "_median", "; coordinate-wise median"),
        ):
            if base == "fedavg_naive" and comb != "mean":
                continue  # robust variants of a wrong rule would only muddle comparisons
            name = base + suffix
            specs[name] = StrategySpec(
                name=name,
                base=base,
                combine=comb,
                freezes_a=freezes,
                uploads_a=uploads_a,
                exact=comb == "mean" and base != "fedavg_naive",
                takes_rank=base == "product_svd",
                associative=comb == "mean",
                summary=summary + note,
            )
    return specs


STRATEGIES: Mapping[str, StrategySpec] = _make_specs()


def strategy_spec(name: str) -> StrategySpec:
    """``STRATEGIES[name]``, or a ``StrategyError`` that lists the known names."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise StrategyError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}") from None


def aggregate(name: str, updates: Sequence[ClientUpdate], **params: Any) -> dict[str, np.ndarray]:
    """Run strategy ``name`` (a key of ``STRATEGIES``) with the round's parameters.

    Parameters: ``clip_norm``, ``clip_median_factor``, ``reference`` for all; ``frozen_a`` for the FFA
    ones; ``rank``, ``method`` for the product ones; ``trim_fraction`` (default 0.1) for the trimmed
    ones. A parameter the strategy does not take is a ``StrategyError``, not silently ignored.
    """
    spec = strategy_spec(name)
    allowed = set(_BASE_PARAMS[spec.base]) | ({"trim_fraction"} if spec.combine == "trimmed_mean" else set())
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise StrategyError(f"{name} takes no {unknown}; it takes {sorted(allowed)}")
    params = dict(params)
    if spec.combine == "trimmed_mean":
        params["combine"] = trimmed_mean(float(params.pop("trim_fraction", 0.1)))
    elif spec.combine == "median":
        params["combine"] = coordinate_median
    return _BASE_FUNCS[spec.base](updates, **params)


def upload_tensors(tensors: Tensors, strategy: str) -> dict[str, np.ndarray]:
    """What a box uploads for ``strategy``: without the A factors when the strategy freezes them.

    FFA-LoRA's A is regenerated from the seed at the aggregator, which halves the upload.
    """
    spec = strategy_spec(strategy)
    if spec.uploads_a:
        return dict(tensors)
    return {k: v for k, v in tensors.items() if not k.endswith(A_SUFFIX)}
