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

    The entropy H_i(β) falls from log k_i (β = 0, uniform over the k_i neighbours) to log m_i (β → ∞, uniform
    over the m_i neighbours tied at the smallest distance). A row whose ``m_i ≥ perplexity`` (duplicated
    cells, or ``perplexity = 1``) therefore has no finite root: it gets the limit of the search, the uniform
    distribution over its m_i tied nearest neighbours, with β_i = ``inf``. Every row sums to 1.

    Parameters
    ----------
    distances
        ``(n, k)`` distances to each cell's neighbours; ``inf`` marks a missing neighbour (padding).
    perplexity
        Target perplexity, at least 1 and at most the number of finite distances in every row.
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
        ``(n,)`` precisions β_i, in units of 1 / distance²; ``inf`` for rows at the tie limit.
    n_unconverged
        Rows whose entropy is still off by more than ``tol``: rows the search did not finish in ``max_iter``
        steps, and rows at the tie limit whose entropy log m_i exceeds log(perplexity) by more than ``tol``
        (more than ``perplexity`` neighbours at the same smallest distance, e.g. all at distance 0).

    Raises
    ------
    ValueError
        If ``perplexity`` is below 1 (the entropy of a distribution is never negative) or larger than the
        number of finite distances of some row (the entropy is at most log k_i), or if ``distances`` holds
        NaN or negative values.
    """
    distances = np.asarray(distances)
    if distances.ndim != 2:
        raise ValueError(f"`distances` must be a 2-D array (cells × neighbours), got shape {distances.shape}.")
    perplexity = float(perplexity)
    if not perplexity >= 1:  # also refuses NaN
        raise ValueError(
            f"`perplexity` must be at least 1, got {perplexity:g}: the entropy of p_{{j|i}} is never below 0 = log(1)."
        )
    if np.isnan(distances).any() or (distances < 0).any():
        raise ValueError("`distances` holds NaN or negative values.")
    n = distances.shape[0]
    if n:
        n_finite = np.isfinite(distances).sum(1)
        worst = int(n_finite.argmin())
        if perplexity > n_finite[worst]:
            raise ValueError(
                f"`perplexity={perplexity:g}` is larger than the number of neighbours of cell {worst} "
                f"({n_finite[worst]}): the entropy over k neighbours is at most log(k). Lower the perplexity "
                "or use more neighbours."
            )
    P_out = np.empty(distances.shape, dtype=np.float64)
    beta_out = np.empty(n, dtype=np.float64)
    n_unconverged = 0
    for start in range(0, n, _ROW_CHUNK):
        stop = min(start + _ROW_CHUNK, n)
        d = torch.as_tensor(distances[start:stop], dtype=torch.float64, device=device)
        P, beta, bad = _calibrate_block(d, squared, perplexity, tol, max_iter)
        P_out[start:stop] = P.cpu().numpy()
        beta_out[start:stop] = beta.cpu().numpy()
        n_unconverged += bad
    return P_out, beta_out, n_unconverged


#: rows whose largest distance lies outside [2^-64, 2^64] are rescaled by a power of two (exact) before squaring,
#: so that d², its square (in the Newton slope) and β stay far from float64's overflow and underflow
_RESCALE_EXPONENT = 64
#: bound on |log β| during the search: exp(700) ≈ 1e304 stays finite, so β · 0 is never inf · 0 = NaN. After the
#: rescaling above every finite root lies well inside (|log β| < ~140), so the bound binds only on steps that
#: would overflow, never on ordinary data
_LOG_BETA_BOUND = 700.0


def _calibrate_block(
    d: torch.Tensor, squared: bool, perplexity: float, tol: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    target = np.log(perplexity)
    finite = torch.isfinite(d)
    # exact power-of-two rescaling of rows with extreme distances; rows of ordinary data are left untouched
    d_max = torch.where(finite, d, torch.zeros_like(d)).amax(1)
    _, exponent = torch.frexp(d_max)
    extreme = (d_max > 0) & ((exponent > _RESCALE_EXPONENT) | (exponent < -_RESCALE_EXPONENT))
    exponent = torch.where(extreme, exponent, torch.zeros_like(exponent))
    if bool(extreme.any()):
        d = torch.ldexp(d, -exponent[:, None].to(d.dtype))
    d2 = d if squared else d * d
    beta_exponent = exponent if squared else 2 * exponent  # β of the original units = β here · 2^-beta_exponent

    # shift each row by its smallest distance: p is unchanged and exp never underflows for the nearest neighbour
    s = d2 - d2.min(dim=1, keepdim=True).values
    s = torch.where(finite, s, torch.zeros_like(s))
    # rows with at least `perplexity` neighbours tied at the smallest distance: H(β) decreases to log m > target
    # (or = target) only as β → ∞, so the limit, the uniform distribution over the tied set, is their answer
    at_min = finite & (s == 0)
    n_tied = at_min.sum(1)
    tied = n_tied >= perplexity
    spread = (s.sum(1) / finite.sum(1).clamp_min(1)).clamp_min(1e-12)
    log_beta = -torch.log(spread)  # β ≈ 1 / mean squared distance: the right order of magnitude in every row
    lo = torch.full_like(log_beta, -np.inf)
    hi = torch.full_like(log_beta, np.inf)

    def entropy(
        log_b: torch.Tensor, s: torch.Tensor, finite: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = log_b.exp()[:, None]
        w = torch.where(finite, torch.exp(-b * s), torch.zeros_like(s))
        z = w.sum(1, keepdim=True)
        p = w / z
        mean_s = (p * s).sum(1)
        var_s = (p * s * s).sum(1) - mean_s**2
        h = torch.log(z[:, 0]) + b[:, 0] * mean_s
        return p, h, var_s

    p, h, var_s = entropy(log_beta, s, finite)
    for _ in range(max_iter):
        err = h - target
        active = (err.abs() > tol) & ~tied
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
        step = torch.where(inside, newton, bisect)
        step = step.clamp(-_LOG_BETA_BOUND, _LOG_BETA_BOUND)
        log_beta = torch.where(active, step, log_beta)
        # only the rows still searching are evaluated again: most converge in a few steps, and a handful of slow
        # rows must not cost a pass over every row per step (the others' values do not change)
        rows = torch.nonzero(active).squeeze(1)
        p_rows, h_rows, var_rows = entropy(log_beta[rows], s[rows], finite[rows])
        p[rows], h[rows], var_s[rows] = p_rows, h_rows, var_rows

    beta = torch.ldexp(log_beta.exp(), -beta_exponent.to(log_beta.dtype))
    if bool(tied.any()):
        m = n_tied.to(p.dtype)[:, None]
        p = torch.where(tied[:, None], at_min.to(p.dtype) / m, p)
        h = torch.where(tied, torch.log(m[:, 0]), h)
        beta = torch.where(tied, torch.full_like(beta, np.inf), beta)
    n_bad = int(((h - target).abs() > tol).sum())
    return p, beta, n_bad


def symmetrize(indices: np.ndarray, P_cond: np.ndarray, n: int | None = None) -> sparse.csr_matrix:
    """P = (P_cond + P_condᵀ) / (2n): sparse, symmetric, summing to 1, float32.

    ``indices[i, j] < 0`` marks padding and is skipped.
    """
    n_rows, k = indices.shape
    n = n_rows if n is None else n
    # built in float32 and 32-bit indices straight as CSR (the rows are the rows of `indices`): at 1.3 M cells × 90
    # neighbours every float64 or int64 copy of the edges is ~1 GB, and this step set the peak memory of the
    # whole affinity computation. The float32 sum differs from a float64 one by at most one rounding.
    vals = P_cond.astype(np.float32).ravel()
    keep = (indices.ravel() >= 0) & (vals > 0)
    small = max(n, int(keep.sum())) < 2**31
    index_dtype = np.int32 if small else np.int64
    indptr = np.zeros(n + 1, dtype=index_dtype)
    np.cumsum(keep.reshape(n_rows, k).sum(1), out=indptr[1 : n_rows + 1])
    indptr[n_rows + 1 :] = indptr[n_rows]
    cond = sparse.csr_matrix((vals[keep], indices.astype(index_dtype).ravel()[keep], indptr), shape=(n, n))
    del vals, keep
    cond.sum_duplicates()  # a neighbour listed twice (padding of tiny searches) counts twice, as a COO build would
    P = (cond + cond.T).tocsr()
    del cond
    P.data /= np.float32(2.0 * n_rows)
    P.eliminate_zeros()  # values below float32's range must not stay as stored zeros
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
        Rows not calibrated to ``tol``, including rows with more than ``perplexity`` neighbours tied at the
        smallest distance (duplicated cells), which get the uniform distribution over the tied set
        (:func:`calibrate_perplexity`).
    """
    distances = np.where(indices < 0, np.inf, distances)
    P_cond, beta, n_bad = calibrate_perplexity(distances, perplexity, tol=tol, device=device)
    return symmetrize(indices, P_cond), beta, n_bad


def padded_neighbors_from_graph(graph: sparse.spmatrix | sparse.sparray) -> tuple[np.ndarray, np.ndarray]:
    """Turn a sparse distance graph (scanpy's ``obsp["distances"]``) into padded ``(n, k_max)`` arrays.

    Missing entries get index −1 and distance ``inf``; self-loops are dropped. Stored zero distances off the
    diagonal are kept: they are neighbours at distance 0 (duplicated cells), not missing edges.
    """
    graph = sparse.csr_matrix(graph)
    n = graph.shape[0]
    counts = np.diff(graph.indptr)
    rows = np.repeat(np.arange(n), counts)
    off_diagonal = graph.indices != rows
    rows, cols, data = rows[off_diagonal], graph.indices[off_diagonal], graph.data[off_diagonal]
    counts = np.bincount(rows, minlength=n)
    k_max = int(counts.max()) if n else 0
    indices = np.full((n, k_max), -1, dtype=np.int64)
    distances = np.full((n, k_max), np.inf, dtype=np.float64)
    pos = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    indices[rows, pos] = cols
    distances[rows, pos] = data
    return indices, distances
