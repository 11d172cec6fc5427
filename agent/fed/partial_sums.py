"""Partial sums of the weighted-mean strategies: a round's uploads split over several aggregator
workers, or a site aggregator feeding headquarters, each summing what it received.

``partial_sum`` makes Σ n_k·x_k of some updates in a strategy's coordinates (``PartialSum``), ``merge``
adds them (associative and commutative, up to float64 rounding) and ``finalize`` makes the adapter: the
means, and for ``product_svd`` the SVD to rank. Median and trimmed mean need every client's value at
once and have none. Partial sums are stored and merged in float64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from agent.fed.lora_tensors import A_SUFFIX, B_SUFFIX, ClientUpdate, StrategyError, Tensors, same_array
from agent.fed.low_rank import check_rank, dense_mean, dense_svd
from agent.fed.strategies import strategy_spec
from agent.fed.update_batch import (
    Coefs,
    Scratch,
    clip_scales,
    common_frozen_a,
    ensure_finite,
    linear_sum,
    mean_coefs,
    prepare,
    quiet_numpy,
    reference_values,
    stacked,
)

_F32 = np.float32
_F64 = np.float64


@dataclass(frozen=True)
class PartialSum:
    """Weighted sums of part of a round's updates; ``merge`` adds them, ``finalize`` makes the adapter.

    ``sums``: Σ n_k·x_k per tensor, float64 (naive: every tensor; FFA: B and plain; product: plain).
    ``delta_sums``: product only, Σ n_k·B_k·A_k per pair prefix. ``frozen_a``: FFA's shared A.
    ``lora_ranks``: product only, the clients' rank per prefix (the default target rank).
    Plain fields (dicts of arrays and numbers), so a worker can ship one as safetensors + JSON.
    """

    strategy: str
    sums: Mapping[str, np.ndarray]
    total_weight: float
    count: int
    delta_sums: Mapping[str, np.ndarray] = field(default_factory=dict)
    frozen_a: Mapping[str, np.ndarray] = field(default_factory=dict)
    lora_ranks: Mapping[str, int] = field(default_factory=dict)


def _linear_strategy(strategy: str) -> str:
    spec = strategy_spec(strategy)
    if not spec.associative:
        raise StrategyError(
            f"{strategy}: median and trimmed mean are not associative (they need every client's value "
            "at once), so they have no partial sums: route all uploads of the round to one worker"
        )
    return spec.base


@quiet_numpy
def partial_sum(
    updates: Sequence[ClientUpdate],
    strategy: str,
    *,
    frozen_a: Tensors | None = None,
    clip_norm: float | None = None,
    reference: Tensors | None = None,
) -> PartialSum:
    """Σ n_k·x_k of ``updates`` in ``strategy``'s coordinates (see ``PartialSum``), for ``merge``.

    For the weighted-mean strategies only. ``clip_norm`` (a fixed bound) clips each update on its own,
    so it splits over workers; a median-relative bound needs every norm and is refused here.
    """
    base = _linear_strategy(strategy)
    batch = prepare(updates, frozen_a=frozen_a if base == "ffa_lora" else None)
    total = float(batch.weights.sum())
    shared = common_frozen_a(batch) if base == "ffa_lora" else None
    scales = clip_scales(batch, clip_norm, None, reference, shared)
    coefs = mean_coefs(batch.weights, scales, reference is not None)
    sums: dict[str, np.ndarray] = {}
    delta_sums: dict[str, np.ndarray] = {}
    lora_ranks: dict[str, int] = {}
    scratch = Scratch()
    if base == "product_svd":
        ref = reference_values(reference, batch, batch.shapes)
        for prefix, (a_key, b_key) in batch.split.pairs.items():
            b_list = [t[b_key] for t in batch.tensors]
            a_list = [t[a_key] for t in batch.tensors]
            acc = dense_mean(b_list, a_list, coefs.clients, scratch).astype(_F64)
            ensure_finite(acc, batch, (a_key, b_key))
            if ref and coefs.ref:
                acc += coefs.ref * (ref[b_key].astype(_F64) @ ref[a_key].astype(_F64))
            delta_sums[prefix] = acc
            lora_ranks[prefix] = batch.shapes[a_key][0]
        linear_keys: list[str] = list(batch.split.plain)
    else:
        b_keys = [b for _, b in batch.split.pairs.values()]
        ref = reference_values(reference, batch, b_keys + list(batch.split.plain))
        linear_keys = [k for k in batch.shapes if base == "fedavg_naive" or not k.endswith(A_SUFFIX)]
    for key in linear_keys:
        # Naive's A is summed unclipped, as fedavg_naive does.
        key_coefs = Coefs(batch.weights, 0.0) if key.endswith(A_SUFFIX) else coefs
        flat = linear_sum(stacked(batch, key, scratch, check=False), key_coefs, ref.get(key))
        sums[key] = ensure_finite(flat, batch, (key,)).reshape(batch.shapes[key])
    frozen = {a_key: shared[p] for p, (a_key, _) in batch.split.pairs.items()} if shared is not None else {}
    return PartialSum(base, sums, total, batch.size, delta_sums, frozen, lora_ranks)


def merge(*parts: PartialSum) -> PartialSum:
    """Add partial sums of one strategy (associative and commutative, up to float64 rounding)."""
    if not parts:
        raise StrategyError("nothing to merge")
    first = parts[0]
    sums = {k: v.copy() for k, v in first.sums.items()}
    delta = {k: v.copy() for k, v in first.delta_sums.items()}
    total, count = first.total_weight, first.count
    for i, p in enumerate(parts[1:], start=1):
        if p.strategy != first.strategy:
            raise StrategyError(f"part {i} is {p.strategy}, part 0 is {first.strategy}")
        if p.sums.keys() != sums.keys() or p.delta_sums.keys() != delta.keys():
            raise StrategyError(f"part {i}: tensors differ from part 0's")
        if dict(p.lora_ranks) != dict(first.lora_ranks):
            raise StrategyError(f"part {i}: LoRA ranks differ from part 0's")
        if p.frozen_a.keys() != first.frozen_a.keys() or not all(
            same_array(p.frozen_a[k], first.frozen_a[k]) for k in first.frozen_a
        ):
            raise StrategyError(f"part {i}: frozen A differs from part 0's (another fleet seed?)")
        for target, source in ((sums, p.sums), (delta, p.delta_sums)):
            for k, v in source.items():
                if v.shape != target[k].shape:
                    raise StrategyError(f"part {i}: {k} has shape {v.shape}, part 0 has {target[k].shape}")
                target[k] += v
        total += p.total_weight
        count += p.count
    return PartialSum(first.strategy, sums, total, count, delta, dict(first.frozen_a), dict(first.lora_ranks))


def finalize(p: PartialSum, strategy: str | None = None, *, rank: int | None = None) -> dict[str, np.ndarray]:
    """The aggregated adapter from (merged) partial sums: the means, and for product the SVD to rank.

    ``strategy`` is optional (the partial knows its own) and, if given, must match.
    """
    if strategy is not None and _linear_strategy(strategy) != p.strategy:
        raise StrategyError(f"partial sum is {p.strategy}, not {strategy}")
    if not p.total_weight > 0:
        raise StrategyError("total weight (num_examples) is zero: nothing to aggregate")
    check_rank(rank)
    out = {k: (v / p.total_weight).astype(_F32) for k, v in p.sums.items()}
    out.update({k: np.array(v, dtype=_F32) for k, v in p.frozen_a.items()})
    for prefix, acc in p.delta_sums.items():
        target = int(rank) if rank is not None else p.lora_ranks[prefix]
        out[prefix + B_SUFFIX], out[prefix + A_SUFFIX] = dense_svd(acc / p.total_weight, target)
    return out
