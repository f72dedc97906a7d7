"""Perplexity-calibrated (entropic) affinities on a kNN graph, as in t-SNE and Elastic Embedding."""

from __future__ import annotations

import numpy as np
import torch
from scipy import sparse

#: rows calibrated together; bounds the working memory to a few arrays of _ROW_CHUNK × k float64
_ROW_CHUNK = 262_144


def calibrate_perplexity(
    distances: np.ndarray,
    perplexity: float,
    *,
    tol: float = 1e-5,
    max_iter: int = 200,
    squared: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray, int]:
    """Conditional affinities p_{j|i} ∝ exp(−β_i d_ij²) whose entropy equals log(perplexity) in every row.

    All rows are solved at once: Newton steps on log β_i, guarded by a bisection bracket so that every step
    stays inside the interval known to hold the root.

    Parameters
    ----------
    distances
        ``(n, k)`` distances to each cell's neighbours; ``inf`` marks a missing neighbour (padding).
    perplexity
        Target perplexity; must be smaller than the number of finite distances in every row.
    tol
        Tolerance on the entropy, in nats.
    max_iter
        Iteration cap.
    squared
        Whether ``distances`` are already squared.
    device
        Where to compute.

    Returns
    -------
    P_cond
        ``(n, k)`` float64; each row sums to 1.
    beta
        ``(n,)`` precisions β_i, in units of 1 / distance².
    n_unconverged
        Rows whose entropy is still off by more than ``tol`` (rows whose distances are all equal cannot be
        calibrated: any β gives the uniform distribution).
    """
    n = distances.shape[0]
    P_out = np.empty(distances.shape, dtype=np.float64)
    beta_out = np.empty(n, dtype=np.float64)
    n_unconverged = 0
    for start in range(0, n, _ROW_CHUNK):
        stop = min(start + _ROW_CHUNK, n)
        d = torch.as_tensor(distances[start:stop], dtype=torch.float64, device=device)
        P, beta, bad = _calibrate_block(d if squared else d * d, float(perplexity), tol, max_iter)
        P_out[start:stop] = P.cpu().numpy()
        beta_out[start:stop] = beta.cpu().numpy()
        n_unconverged += bad
    return P_out, beta_out, n_unconverged


def _calibrate_block(
    d2: torch.Tensor, perplexity: float, tol: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    target = np.log(perplexity)
    # shift each row by its smallest distance: p is unchanged and exp never underflows for the nearest neighbour
    s = d2 - d2.min(dim=1, keepdim=True).values
    finite = torch.isfinite(s)
    s = torch.where(finite, s, torch.zeros_like(s))
    spread = (s.sum(1) / finite.sum(1).clamp_min(1)).clamp_min(1e-12)
    log_beta = -torch.log(spread)  # β ≈ 1 / mean squared distance: the right order of magnitude in every row
    lo = torch.full_like(log_beta, -np.inf)
    hi = torch.full_like(log_beta, np.inf)

    def entropy(log_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = log_b.exp()[:, None]
        w = torch.where(finite, torch.exp(-b * s), torch.zeros_like(s))
        z = w.sum(1, keepdim=True)
        p = w / z
        mean_s = (p * s).sum(1)
        var_s = (p * s * s).sum(1) - mean_s**2
        h = torch.log(z[:, 0]) + b[:, 0] * mean_s
        return p, h, var_s

    p, h, var_s = entropy(log_beta)
    for _ in range(max_iter):
        err = h - target
        active = err.abs() > tol
        if not bool(active.any()):
            break
        # H falls as β grows: entropy too high → the root lies at larger β
        lo = torch.where(active & (err > 0), log_beta, lo)
        hi = torch.where(active & (err < 0), log_beta, hi)
        beta = log_beta.exp()
        slope = -(beta**2) * var_s  # dH / dlog β
        newton = log_beta - err / torch.where(slope < 0, slope, torch.full_like(slope, -1e-300))
        bisect = torch.where(
            torch.isinf(lo) | torch.isinf(hi),
            torch.where(torch.isinf(hi), log_beta + 2.0, log_beta - 2.0),
            (lo + hi) / 2,
        )
        inside = (newton > lo) & (newton < hi) & torch.isfinite(newton)
        log_beta = torch.where(active, torch.where(inside, newton, bisect), log_beta)
        p, h, var_s = entropy(log_beta)
    n_bad = int(((h - target).abs() > tol).sum())
    return p, log_beta.exp(), n_bad


def symmetrize(indices: np.ndarray, P_cond: np.ndarray, n: int | None = None) -> sparse.csr_matrix:
    """P = (P_cond + P_condᵀ) / (2n): sparse, symmetric, summing to 1, float32.

    ``indices[i, j] < 0`` marks padding and is skipped.
    """
    n_rows, k = indices.shape
    n = n_rows if n is None else n
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), k)
    cols = indices.ravel()
    vals = P_cond.ravel()
    keep = (cols >= 0) & (vals > 0)
    cond = sparse.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=(n, n), dtype=np.float64)
    P = (cond + cond.T).tocsr()
    P.data /= 2.0 * n_rows
    P = P.astype(np.float32)
    P.eliminate_zeros()  # after the cast: values below float32's range must not stay as stored zeros
    P.sort_indices()
    return P


def entropic_affinities(
    indices: np.ndarray,
    distances: np.ndarray,
    perplexity: float,
    *,
    tol: float = 1e-5,
    device: torch.device | str = "cpu",
) -> tuple[sparse.csr_matrix, np.ndarray, int]:
    """Symmetric entropic affinities from a kNN graph: calibrate every row, then symmetrise.

    Returns
    -------
    P
        ``(n, n)`` CSR float32, symmetric, sums to 1.
    beta
        Per-cell precisions.
    n_unconverged
        Rows not calibrated to ``tol``.
    """
    distances = np.where(indices < 0, np.inf, distances)
    P_cond, beta, n_bad = calibrate_perplexity(distances, perplexity, tol=tol, device=device)
    return symmetrize(indices, P_cond), beta, n_bad


def padded_neighbors_from_graph(graph: sparse.spmatrix | sparse.sparray) -> tuple[np.ndarray, np.ndarray]:
    """Turn a sparse distance graph (scanpy's ``obsp["distances"]``) into padded ``(n, k_max)`` arrays.

    Missing entries get index −1 and distance ``inf``; explicit self-loops are dropped.
    """
    graph = sparse.csr_matrix(graph)
    graph.setdiag(0)
    graph.eliminate_zeros()
    n = graph.shape[0]
    counts = np.diff(graph.indptr)
    k_max = int(counts.max()) if n else 0
    indices = np.full((n, k_max), -1, dtype=np.int64)
    distances = np.full((n, k_max), np.inf, dtype=np.float64)
    pos = np.arange(graph.nnz) - np.repeat(graph.indptr[:-1], counts)
    rows = np.repeat(np.arange(n), counts)
    indices[rows, pos] = graph.indices
    distances[rows, pos] = graph.data
    return indices, distances
