"""Combines: how a stack of client values becomes one value per coordinate.

``weighted_mean`` is FedAvg's rule and the default of every strategy. ``trimmed_mean`` and
``coordinate_median`` (Yin et al. 2018) are the robust variants against faulty or hostile boxes, used
in place of the mean by the ``*_trimmed_mean`` and ``*_median`` strategies of ``agent.fed.strategies``
(``combine=``). They are unweighted (one vote per box) and not associative, so they have no partial
sums; their sorts run along the client axis, in cache-sized blocks, on several threads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from agent.fed.lora_tensors import StrategyError

_F32 = np.float32
_F64 = np.float64

# A combine reduces a stack of client values, shape (K, d) float32 with one row per client, and the
# clients' normalised weights (K,) float64 to one value per coordinate, shape (d,). It must treat
# coordinates independently: strategies call it on chunks of coordinates.
Combine = Callable[[np.ndarray, np.ndarray], np.ndarray]


def weighted_mean(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``Σ w_k x_k`` per coordinate (weights normalised to sum 1): FedAvg's rule."""
    return np.asarray(weights.astype(_F32) @ stack, dtype=_F32)


def trimmed_mean(beta: float) -> Combine:
    """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate drop ``floor(beta·K)`` values at
    each end, average the rest.

    Unweighted, on purpose: ``num_examples`` is what each box reports about itself, so a weighted robust
    statistic lets one hostile box claim a huge count and dominate; unweighted, every box has one vote
    (Flower's ``aggregate_trimmed_mean`` is unweighted too). With ``beta`` at least the hostile fraction,
    no hostile value survives in any coordinate. Not associative: no partial sums.
    """
    if not 0.0 <= beta < 0.5:
        raise StrategyError(f"trim fraction must be in [0, 0.5), got {beta}")

    def combine(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
        k = stack.shape[0]
        cut = int(beta * k)
        if cut == 0:
            return np.asarray(stack.mean(axis=0, dtype=_F64), dtype=_F32)
        return _sorted_reduce(stack, lambda s: s[:, cut : k - cut].mean(axis=1, dtype=_F64))

    combine.__name__ = f"trimmed_mean_{beta:g}"
    return combine


def coordinate_median(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Coordinate-wise median (Yin et al. 2018), unweighted for the reason ``trimmed_mean`` gives.

    Resists any minority of hostile boxes per coordinate; noisier than the trimmed mean on honest data.
    Not associative: no partial sums.
    """
    k = stack.shape[0]
    if k % 2:
        return _sorted_reduce(stack, lambda s: s[:, k // 2])
    return _sorted_reduce(stack, lambda s: 0.5 * (s[:, k // 2 - 1].astype(_F64) + s[:, k // 2]))


def _workers() -> int:
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:  # not Linux
        return max(1, min(8, os.cpu_count() or 1))


def _sorted_reduce(stack: np.ndarray, reduce: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply ``reduce`` to blocks of coordinates with their client values sorted, shape (block, K).

    Clients go on the last axis because numpy's SIMD sort (AVX-512/AVX2) works along the last axis
    and is about 6x faster there than a sort or multi-kth partition along axis 0; the transpose is
    done in row blocks to stay in cache, and threads share the coordinates (sort releases the GIL).
    """
    k, d = stack.shape
    out = np.empty(d, dtype=_F32)
    cols, rows = 1024, 32

    def run(lo: int, hi: int) -> None:
        block = np.empty((min(cols, hi - lo), k), dtype=stack.dtype)
        for j in range(lo, hi, cols):
            je = min(j + cols, hi)
            blk = block[: je - j]
            for i in range(0, k, rows):
                blk[:, i : i + rows] = stack[i : i + rows, j:je].T
            blk.sort(axis=1)
            out[j:je] = reduce(blk)

    workers = _workers() if k * d >= 1 << 21 else 1
    if workers == 1:
        run(0, d)
    else:
        bounds = np.linspace(0, d, workers + 1).astype(int)
        with ThreadPoolExecutor(workers) as pool:
            for f in [
                pool.submit(run, int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
            ]:
                f.result()
    return out


def combine_stack(combine: Combine, stack: np.ndarray, weights: np.ndarray, key: str) -> np.ndarray:
    """``combine`` of a (K, d) stack as float32, checked to give one value per coordinate."""
    out = np.asarray(combine(stack, weights), dtype=_F32)
    if out.shape != (stack.shape[1],):
        raise StrategyError(f"{key}: combine returned shape {out.shape}, expected ({stack.shape[1]},)")
    return out


def is_mean(combine: Combine | None) -> bool:
    return combine is None or combine is weighted_mean
