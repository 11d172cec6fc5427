"""Validated batches of client updates, and what is measured on them: norms, clipping, exact error.

``prepare`` checks the keys, shapes, dtypes and weights (the clients' ``num_examples``) of a round's
updates, completes FFA uploads with the frozen A, and drops the updates of weight zero (no data, no
vote). The strategies then work on float32 stacks of one tensor name at a time (``stacked``, in reused
``Scratch`` buffers), check their results finite (``ensure_finite``, naming the bad update), and clip:
``clip_scales`` bounds each update's norm (``clip_norm=``, ``clip_median_factor=``, towards
``reference=``), which keeps a weighted mean linear in the updates (``Coefs``, ``linear_sum``).

``update_norm`` is the number the aggregator refuses outliers by; ``exact_error`` is the distance of an
aggregate from the exact weighted mean of the updates' ΔW.

Numerics: stacks are float32 and the weighted sums run in float32 BLAS (relative error about 1e-7,
two orders below the fleet benchmark's 1e-5 bound on ``exact_error``); norms come from r×r Gram
matrices combined in float64.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, NoReturn, ParamSpec, TypeVar

import numpy as np

from agent.fed.lora_tensors import (
    ClientUpdate,
    KeySplit,
    StrategyError,
    Tensors,
    pair_arrays,
    same_array,
    split_keys,
    with_frozen_a,
)

_F32 = np.float32
_F64 = np.float64

_P = ParamSpec("_P")
_R = TypeVar("_R")


def quiet_numpy(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Silence numpy's invalid/overflow warnings: non-finite input is refused by explicit checks,
    and the warnings raised on the way there would only be noise in the aggregator's log."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with np.errstate(invalid="ignore", over="ignore"):
            return fn(*args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class Batch:
    tensors: list[Tensors]
    index: np.ndarray  # position of each kept update in the caller's list, for error messages
    weights: np.ndarray  # float64 num_examples of the kept updates
    split: KeySplit
    shapes: dict[str, tuple[int, ...]]

    @property
    def size(self) -> int:
        return len(self.tensors)


def prepare(
    updates: Iterable[ClientUpdate],
    *,
    frozen_a: Tensors | None = None,
    drop_zero_weight: bool = True,
) -> Batch:
    """Check keys, shapes, dtypes and weights of every update (finiteness is checked on the stacks,
    one vectorised pass per tensor name) and drop the updates of weight zero (no data, no vote)."""
    updates = list(updates)
    if not updates:
        raise StrategyError("no updates to aggregate")
    weights = np.empty(len(updates), dtype=_F64)
    for i, u in enumerate(updates):
        n = u.num_examples
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise StrategyError(f"update {i}: num_examples must be a non-negative integer, got {n!r}")
        weights[i] = n
    if drop_zero_weight and not weights.sum() > 0:
        raise StrategyError("total weight (num_examples) is zero: nothing to aggregate")
    tensors = [dict(u.tensors) if frozen_a is None else with_frozen_a(u.tensors, frozen_a) for u in updates]
    first = tensors[0]
    if not first:
        raise StrategyError("update 0 has no tensors")
    keyset = first.keys()
    shapes: dict[str, tuple[int, ...]] = {}
    for key, value in first.items():
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            raise StrategyError(f"update 0: {key} is not a float array")
        shapes[key] = value.shape
    split = split_keys(first)
    for prefix, (a_key, b_key) in split.pairs.items():
        if a_key in shapes:
            a_shape, b_shape = shapes[a_key], shapes[b_key]
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise StrategyError(f"{prefix}: shapes A{a_shape} B{b_shape} do not make a LoRA pair")
        else:
            raise StrategyError(f"{b_key}: no {a_key} (pass frozen_a for FFA uploads)")
    for i, t in enumerate(tensors[1:], start=1):
        if t.keys() != keyset:
            missing, extra = sorted(keyset - t.keys()), sorted(t.keys() - keyset)
            raise StrategyError(
                f"update {i}: keys differ from update 0: missing {missing[:3]}, extra {extra[:3]}"
            )
        for key, shape in shapes.items():
            value = t[key]
            if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
                raise StrategyError(f"update {i}: {key} is not a float array")
            if value.shape != shape:
                raise StrategyError(f"update {i}: {key} has shape {value.shape}, update 0 has {shape}")
    keep = np.flatnonzero(weights > 0) if drop_zero_weight else np.arange(len(updates))
    if drop_zero_weight and len(keep) < len(updates):
        # Dropped updates are not stacked, so check them here: bad input is refused even at weight 0.
        for j in np.flatnonzero(weights == 0):
            for key, value in tensors[j].items():
                if not np.isfinite(value).all():
                    raise StrategyError(f"update {int(j)}: {key} has non-finite values")
    return Batch([tensors[i] for i in keep], keep, weights[keep], split, shapes)


class Scratch:
    """Float32 buffers reused across the tensor names of one call: stacking into memory already
    touched saves the page faults of a fresh array per name, about half the cost of a stack."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, slot: str, shape: tuple[int, ...]) -> np.ndarray:
        size = math.prod(shape)
        buf = self._buffers.get(slot)
        if buf is None or buf.size < size:
            buf = self._buffers[slot] = np.empty(size, dtype=_F32)
        return buf[:size].reshape(shape)


def stacked(
    batch: Batch, key: str, scratch: Scratch | None = None, slot: str = "x", check: bool = True
) -> np.ndarray:
    """The updates' values of ``key`` as (K, d) float32, in ``scratch`` when given.

    ``check=False`` skips the finiteness pass, for callers that check their (NaN-propagating) result
    with ``ensure_finite`` instead: one pass over the stack fewer.
    """
    arrays = [t[key].reshape(-1) for t in batch.tensors]
    if scratch is None:
        stack = np.stack(arrays, dtype=_F32)
    else:
        stack = np.stack(arrays, out=scratch.get(slot, (batch.size, len(arrays[0]))))
    if check and not np.isfinite(stack).all():
        raise_non_finite(batch, (key,))
    return stack


def raise_non_finite(batch: Batch, keys: Iterable[str]) -> NoReturn:
    """Name the first update with a non-finite value among ``keys`` (the slow path of a failed check)."""
    keys = list(keys)
    for i, t in enumerate(batch.tensors):
        for key in keys:
            if not np.isfinite(t[key]).all():
                raise StrategyError(f"update {int(batch.index[i])}: {key} has non-finite values")
    raise StrategyError(f"{keys[0]}: the weighted sum overflows float32 (values too large)")


def ensure_finite(result: np.ndarray, batch: Batch, keys: Iterable[str]) -> np.ndarray:
    # A NaN or inf in any client's values reaches a weighted sum: every coefficient is positive
    # (zero-weight updates are dropped, an infinite norm is refused before clipping scales by 0).
    if not np.isfinite(result).all():
        raise_non_finite(batch, keys)
    return result


def stacked_pair(batch: Batch, a_key: str, b_key: str) -> tuple[np.ndarray, np.ndarray]:
    """B as (K, n_out, r) and A as (K, r, n_in), float32, checked finite."""
    return (
        stacked(batch, b_key).reshape(batch.size, *batch.shapes[b_key]),
        stacked(batch, a_key).reshape(batch.size, *batch.shapes[a_key]),
    )


def common_frozen_a(batch: Batch) -> dict[str, np.ndarray]:
    """FFA's A by prefix: the same in every update (bit for bit), else ``StrategyError`` naming the key."""
    shared = {}
    for prefix, (a_key, _) in batch.split.pairs.items():
        ref = batch.tensors[0][a_key]
        if not np.isfinite(ref).all():
            raise StrategyError(f"update {int(batch.index[0])}: {a_key} has non-finite values")
        for i, t in enumerate(batch.tensors[1:], start=1):
            if not same_array(t[a_key], ref):
                raise StrategyError(
                    f"update {int(batch.index[i])}: {a_key} differs from update {int(batch.index[0])}'s: "
                    "FFA-LoRA needs the same frozen A on every box (same fleet seed, A not trained)"
                )
        shared[prefix] = np.array(ref, dtype=_F32)
    return shared


def reference_values(reference: Tensors | None, batch: Batch, keys: Iterable[str]) -> dict[str, np.ndarray]:
    """``reference``'s ``keys`` as float32, checked against the batch's shapes and finite; {} without one."""
    if reference is None:
        return {}
    out = {}
    for key in keys:
        if key not in reference:
            raise StrategyError(f"reference has no {key}")
        value = np.asarray(reference[key], dtype=_F32)
        if value.shape != batch.shapes[key]:
            raise StrategyError(
                f"reference {key} has shape {value.shape}, the updates have {batch.shapes[key]}"
            )
        if not np.isfinite(value).all():
            raise StrategyError(f"reference {key}: non-finite values")
        out[key] = value
    return out


def _norms(batch: Batch, reference: Tensors | None, shared_a: Mapping[str, np.ndarray] | None) -> np.ndarray:
    """``update_norm`` of every update of the batch, (K,) float64, from r×r Gram matrices.

    Grams in float32 BLAS, combined in float64 (relative error about 1e-6: ample for clipping and
    outlier checks). Against a reference with its own A the norm needs ``‖X‖² + ‖Y‖² − 2⟨X, Y⟩``,
    which cancels when a round moves the adapter little: that case runs in float64.
    """
    k = batch.size
    sq = np.zeros(k, dtype=_F64)
    scratch = Scratch()
    for prefix, (a_key, b_key) in batch.split.pairs.items():
        n_out, r = batch.shapes[b_key]
        b = stacked(batch, b_key, scratch, "b", check=False).reshape(k, n_out, r)
        if shared_a is not None:
            # One A for all (FFA; a reference global has the same A): ‖(B_k − B_ref)·A‖² =
            # Σ (DᵀD ∘ AAᵀ) with D = B_k − B_ref, no cancellation at all.
            a64 = shared_a[prefix].astype(_F64)
            if reference is not None:
                b = b - reference_values(reference, batch, (b_key,))[b_key]
            gram_b = np.matmul(b.transpose(0, 2, 1), b).astype(_F64)
            sq += np.einsum("krs,rs->k", gram_b, a64 @ a64.T)
            continue
        a = stacked(batch, a_key, scratch, "a", check=False).reshape(k, r, -1)
        if reference is None:
            gram_b = np.matmul(b.transpose(0, 2, 1), b).astype(_F64)
            gram_a = np.matmul(a, a.transpose(0, 2, 1)).astype(_F64)
            sq += np.einsum("krs,krs->k", gram_b, gram_a)
            continue
        ref = reference_values(reference, batch, (a_key, b_key))
        b64, a64 = b.astype(_F64), a.astype(_F64)
        br, ar = ref[b_key].astype(_F64), ref[a_key].astype(_F64)
        bt = b64.transpose(0, 2, 1)
        sq += np.einsum("krs,krs->k", bt @ b64, a64 @ a64.transpose(0, 2, 1))
        sq -= 2.0 * np.einsum("krs,krs->k", bt @ br, a64 @ ar.T)
        sq += float(np.sum((br.T @ br) * (ar @ ar.T)))
    for key in batch.split.plain:
        x = stacked(batch, key, scratch, "x", check=False)
        if reference is not None:
            x = x - reference_values(reference, batch, (key,))[key].reshape(-1)
        sq += (x * x).sum(axis=1, dtype=_F64)
    if not np.isfinite(sq).all():
        raise_non_finite(batch, batch.shapes)
    return np.sqrt(np.maximum(sq, 0.0))


def clip_scales(
    batch: Batch,
    clip_norm: float | None,
    clip_median_factor: float | None,
    reference: Tensors | None,
    shared_a: Mapping[str, np.ndarray] | None,
) -> np.ndarray | None:
    """Per-update factor ``min(1, bound / norm)``, or None when clipping is off.

    The bound is ``clip_norm``, or ``clip_median_factor`` × the median norm of the updates, or the
    smaller of the two. The median adapts to the round's scale; a hostile minority cannot move it far.
    """
    if clip_norm is None and clip_median_factor is None:
        if reference is not None:
            raise StrategyError("reference is only used by clipping: pass clip_norm or clip_median_factor")
        return None
    norms = _norms(batch, reference, shared_a)
    bounds = []
    if clip_norm is not None:
        if not clip_norm > 0:
            raise StrategyError(f"clip_norm must be positive, got {clip_norm}")
        bounds.append(float(clip_norm))
    if clip_median_factor is not None:
        if not clip_median_factor > 0:
            raise StrategyError(f"clip_median_factor must be positive, got {clip_median_factor}")
        bounds.append(float(clip_median_factor) * float(np.median(norms)))
    bound = min(bounds)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = np.where(norms > bound, bound / norms, 1.0)
    return np.asarray(scales, dtype=_F64)


class Coefs(NamedTuple):
    """Σ_k c_k x_k + c_ref·x_ref: a clipped weighted mean is still linear in the updates."""

    clients: np.ndarray  # (K,) float64
    ref: float


def mean_coefs(weights: np.ndarray, scales: np.ndarray | None, has_reference: bool) -> Coefs:
    """The coefficients of the (clipped) weighted mean: ``weights`` scaled by the clip ``scales``."""
    if scales is None:
        return Coefs(weights, 0.0)
    clients = weights * scales
    # Clipping towards a reference moves x to ref + s·(x − ref); without one, towards zero.
    return Coefs(clients, float(np.sum(weights - clients)) if has_reference else 0.0)


def linear_sum(stack: np.ndarray, coefs: Coefs, ref: np.ndarray | None) -> np.ndarray:
    """``Σ c_k x_k (+ c_ref·ref)`` over a (K, d) float32 stack, in float32 BLAS; (d,) float64."""
    out = (coefs.clients.astype(_F32) @ stack).astype(_F64)
    if ref is not None and coefs.ref:
        out += coefs.ref * ref.reshape(-1).astype(_F64)
    return out


def clipped_stack(stack: np.ndarray, scales: np.ndarray | None, ref: np.ndarray | None) -> np.ndarray:
    """The clipped client values, for combines that are not linear (trimmed mean, median)."""
    if scales is None:
        return stack
    s = scales.astype(_F32)[:, None]
    if ref is None:
        return stack * s
    r = ref.reshape(1, -1)
    return r + s * (stack - r)


def update_norm(tensors: Tensors, reference: Tensors | None = None) -> float:
    """Frobenius norm of an adapter's update: ``ΔW = B·A`` of every pair plus the plain tensors.

    With ``reference`` (the global the box started from), the norm of the difference from it. This is
    the number the aggregator refuses outliers by and norm clipping bounds. Computed from r×r Gram
    matrices (``‖B·A‖² = Σ (BᵀB)∘(AAᵀ)``), never forming ΔW, so it costs O((n_in + n_out)·r²).
    """
    return float(update_norms([ClientUpdate(tensors, 1)], reference=reference)[0])


@quiet_numpy
def update_norms(updates: Sequence[ClientUpdate], reference: Tensors | None = None) -> np.ndarray:
    """``update_norm`` of each update (all of them, zero-weight ones included), vectorised; float64."""
    batch = prepare(updates, drop_zero_weight=False)
    return _norms(batch, reference, shared_a=None)


@quiet_numpy
def exact_error(updates: Sequence[ClientUpdate], aggregated: Tensors) -> float:
    """Max ``|ΔW_agg − Σ w_k ΔW_k|`` over every pair, and over the plain tensors, in float64.

    The distance of an aggregate from the exact weighted mean of the updates: float rounding for
    ``ffa_lora``, the truncation for ``product_svd``, the product error for ``fedavg_naive``. Updates
    must carry their A (complete FFA uploads with ``with_frozen_a``).
    """
    batch = prepare(updates)
    w = batch.weights / batch.weights.sum()
    worst = 0.0
    agg_split = split_keys(aggregated)
    if set(agg_split.pairs) != set(batch.split.pairs) or set(agg_split.plain) != set(batch.split.plain):
        raise StrategyError("the aggregate's tensors do not match the updates'")
    for prefix, (a_key, b_key) in batch.split.pairs.items():
        a_agg, b_agg = pair_arrays(aggregated, prefix, a_key, b_key)
        bs, as_ = stacked_pair(batch, a_key, b_key)
        bc = (bs.astype(_F64) * w[:, None, None]).transpose(1, 0, 2).reshape(bs.shape[1], -1)
        mean = bc @ as_.astype(_F64).reshape(-1, as_.shape[2])
        worst = max(worst, float(np.abs(b_agg.astype(_F64) @ a_agg.astype(_F64) - mean).max()))
    for key in batch.split.plain:
        mean = w @ stacked(batch, key).astype(_F64)
        worst = max(worst, float(np.abs(np.asarray(aggregated[key], _F64).reshape(-1) - mean).max()))
    return worst
