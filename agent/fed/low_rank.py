"""Low-rank steps of product averaging (FlexLoRA): the weighted mean of ``ΔW_k = B_k·A_k`` and its
re-factorisation to rank r by a truncated SVD.

``dense_mean`` forms the mean by one float32 GEMM and ``dense_svd`` takes its top-r factors from the
float64 Gram of its smaller side; ``factored_svd`` never forms it (QR of the stacked factors, SVD of the
small core). Both return balanced factors with fixed signs, so every path, and every aggregator worker
finalising partial sums, gives the same adapter. The SVD steps run in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.fed.lora_tensors import StrategyError
from agent.fed.update_batch import Scratch

_F32 = np.float32
_F64 = np.float64


def check_rank(rank: int | None) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1):
        raise StrategyError(f"rank must be a positive integer, got {rank!r}")


def dense_mean(
    b_list: Sequence[np.ndarray], a_list: Sequence[np.ndarray], coefs: np.ndarray, scratch: Scratch
) -> np.ndarray:
    """``Σ c_k B_k·A_k`` by one float32 GEMM over the stacked rank: (n_out, K·r) @ (K·r, n_in).

    B is stacked straight into the (n_out, K, r) layout of a plain NN product: no transpose copy, and
    OpenBLAS runs NN about 1.5x faster here than with a transposed operand.
    """
    k = len(b_list)
    n_out, r = b_list[0].shape
    n_in = a_list[0].shape[1]
    bb = np.stack(b_list, axis=1, out=scratch.get("b", (n_out, k, r)))
    bb *= coefs.astype(_F32)[None, :, None]
    aa = np.stack(a_list, out=scratch.get("a", (k, r, n_in)))
    return bb.reshape(n_out, k * r) @ aa.reshape(k * r, n_in)


def _balanced_factors(
    us: np.ndarray, v: np.ndarray, sigma: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """B' = (U·S)·S^(-1/2), A' = S^(1/2)·Vᵀ from ``us = U·S`` (n_out, c) and ``v`` (n_in, c).

    Taking B' from U·S (not U) keeps ``B'·A' = U·S·Vᵀ`` exact even where a tiny singular value is
    imprecise. Components beyond those available, or of zero value, are zero; the result has ``rank``.
    """
    n_out, n_in = us.shape[0], v.shape[0]
    c = min(rank, us.shape[1])
    b = np.zeros((n_out, rank), dtype=_F64)
    a = np.zeros((rank, n_in), dtype=_F64)
    root = np.sqrt(sigma[:c])
    live = root > 0
    b[:, :c][:, live] = us[:, :c][:, live] / root[live]
    a[:c][live] = (v[:, :c][:, live] * root[live]).T
    # Fix each component's sign (SVD leaves it free) so every path and worker gives the same factors.
    flip = np.sign(a[np.arange(rank), np.abs(a).argmax(axis=1)])
    flip[flip == 0] = 1.0
    return (b * flip).astype(_F32), (a * flip[:, None]).astype(_F32)


def factored_svd(
    bs: np.ndarray, as_: np.ndarray, coefs: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``rank`` SVD of ``Σ c_k B_k·A_k`` without forming it: with ``B_cat = Q_B R_B`` and
    ``A_catᵀ = Q_A R_A``, the mean is ``Q_B (R_B R_Aᵀ) Q_Aᵀ`` and only the small core needs an SVD."""
    k, n_out, r = bs.shape
    n_in = as_.shape[2]
    b_cat = (bs.astype(_F64) * coefs[:, None, None]).transpose(1, 0, 2).reshape(n_out, k * r)
    a_cat = as_.astype(_F64).reshape(k * r, n_in)
    q_b, r_b = np.linalg.qr(b_cat)
    q_a, r_a = np.linalg.qr(a_cat.T)
    u, s, vt = np.linalg.svd(r_b @ r_a.T, full_matrices=False)
    us = q_b @ (u * s)
    v = q_a @ vt.T
    return _balanced_factors(us, v, s, rank)


def dense_svd(m: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``rank`` SVD of ``m`` from the eigenvectors of its float64 Gram on the smaller side.

    Equivalent to a truncated SVD and 3-5x faster than ``np.linalg.svd`` at 1536×384. The factors are
    built as ``M·V·Vᵀ`` (or ``U·Uᵀ·M``), so the product is exact on the kept subspace and singular
    values are read as column norms, which stay accurate where the squared eigenvalues do not.
    """
    m64 = m.astype(_F64)
    n_out, n_in = m64.shape
    c = min(rank, n_out, n_in)
    if n_in <= n_out:
        _, vecs = np.linalg.eigh(m64.T @ m64)
        v = vecs[:, ::-1][:, :c]
        us = m64 @ v
        sigma = np.linalg.norm(us, axis=0)
    else:
        _, vecs = np.linalg.eigh(m64 @ m64.T)
        u = vecs[:, ::-1][:, :c]
        sv = u.T @ m64  # S·Vᵀ, (c, n_in)
        sigma = np.linalg.norm(sv, axis=1)
        us = u * sigma
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(sigma > 0, sv.T / sigma, 0.0)
    order = np.argsort(-sigma, kind="stable")
    return _balanced_factors(us[:, order], v[:, order], sigma[order], rank)
