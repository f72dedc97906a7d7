from __future__ import annotations

from typing import Any

import numpy as np
from anndata import AnnData
from scipy import sparse

from .._constants import AFFINITY, REP_PCA
from .._engine.affinity import entropic_affinities, padded_neighbors_from_graph
from .._engine.distributed import knn_affinities
from .._engine.knn import KNN_METHODS, METRICS, resolve_knn_method
from .._utils import (
    check_adata,
    check_affinity_matrix,
    check_bool,
    check_in_range,
    check_key,
    check_n_jobs,
    check_positive_int,
    copy_adata,
    get_logger,
    get_representation,
    output_keys,
    renamed_parameters,
    resolve_device,
    shared_docs,
)
from .._utils._random import seed_int


def compute_affinities(
    X: np.ndarray,
    perplexity: float,
    *,
    n_neighbors: int | None = None,
    knn_method: str = "auto",
    metric: str = "euclidean",
    tol: float = 1e-5,
    n_jobs: int | None = None,
    device: Any = "auto",
    random_state: int = 0,
) -> tuple[sparse.csr_matrix, dict[str, Any]]:
    """Entropic affinities of the rows of ``X``: the one path from a representation to P.

    ``k = n_neighbors`` or ``min(3 · perplexity, n − 1)`` nearest neighbours (``knn_method``), then the entropic
    calibration and symmetrisation of :func:`scembed._engine.affinity.entropic_affinities`. Used by
    :func:`affinity` and by the tools that compute their affinities themselves (``tl.ee``, ``tl.neuralee``).

    Returns
    -------
    P
        ``(n, n)`` CSR float32, symmetric, summing to 1.
    info
        ``n_neighbors``, ``method`` (the search used) and ``n_unconverged``.
    """
    n = X.shape[0]
    dev = resolve_device(device) if isinstance(device, str) else device
    if perplexity >= n - 1:
        raise ValueError(f"`perplexity={perplexity:g}` must be smaller than n_obs - 1 = {n - 1}.")
    k = min(int(3 * perplexity), n - 1) if n_neighbors is None else check_positive_int(n_neighbors, "n_neighbors")
    if k > n - 1:
        raise ValueError(f"`n_neighbors={k}` must be at most n_obs - 1 = {n - 1}.")
    if perplexity >= k:
        raise ValueError(f"`perplexity={perplexity:g}` must be smaller than `n_neighbors={k}`.")
    method = resolve_knn_method(knn_method, n, dev)
    get_logger().info(f"computing {k} nearest neighbours ({method}, {metric})")
    # one process: nearest_neighbors + entropic_affinities; under torchrun the rows are split across ranks
    P, _, n_bad, method = knn_affinities(
        X, k, perplexity, method=method, metric=metric, tol=tol, n_jobs=n_jobs, device=dev, random_state=random_state
    )
    _warn_unconverged(n_bad, perplexity, tol)
    return sparse.csr_matrix(P), {"n_neighbors": int(k), "method": method, "n_unconverged": int(n_bad)}


def _calibrate(indices, distances, perplexity: float, tol: float, dev) -> tuple[sparse.csr_matrix, dict[str, Any]]:
    P, _, n_bad = entropic_affinities(indices, distances, perplexity, tol=tol, device=dev)
    _warn_unconverged(n_bad, perplexity, tol)
    return sparse.csr_matrix(P), {"n_unconverged": int(n_bad)}


def _warn_unconverged(n_bad: int, perplexity: float, tol: float) -> None:
    if n_bad:
        get_logger().warning(
            f"{n_bad} cell(s) could not be calibrated to perplexity {perplexity:g} within tol={tol:g} "
            "(e.g. all their neighbours at the same distance)"
        )


def affinity_record(params: dict[str, Any], info: dict[str, Any], use_rep: str | None) -> dict[str, Any]:
    """The ``uns`` entry written next to the affinities (by :func:`affinity` and by tools that compute them)."""
    return {
        "params": params,
        "use_rep": "" if use_rep is None else use_rep,
        "n_neighbors": int(info["n_neighbors"]),
        "method": info["method"],
        "n_unconverged": int(info["n_unconverged"]),
    }


def stored_affinities(adata: AnnData, affinity_key: str) -> sparse.csr_matrix | None:
    """``adata.obsp[affinity_key]`` checked (square, finite, non-negative, not all zero) and symmetric, or None.

    The one check of stored affinities: a bad matrix raises a ValueError naming the key before any training.
    """
    if affinity_key not in adata.obsp:
        return None
    where = f"adata.obsp[{affinity_key!r}]"
    P = check_affinity_matrix(adata.obsp[affinity_key], adata.n_obs, where)
    if abs(P - P.T).max() > 1e-6 * abs(P).max():
        get_logger().warning(f"{where} is not symmetric; using (P + Pᵀ) / 2")
        P = ((P + P.T) / 2).tocsr()
    return P


def tool_affinities(
    X: np.ndarray,
    rep_name: str,
    *,
    perplexity: float,
    use_rep: str | None,
    n_jobs: int | None,
    device: Any,
    random_state: int,
) -> tuple[sparse.csr_matrix, dict[str, Any]]:
    """Affinities a tool computes itself when ``obsp[affinity_key]`` is absent: P and the ``uns`` record to store.

    Same path and defaults as ``pp.affinity(adata, perplexity, use_rep=...)``.
    """
    get_logger().info(f"computing entropic affinities (perplexity {perplexity:g}) on {rep_name}")
    P, info = compute_affinities(X, perplexity, n_jobs=n_jobs, device=device, random_state=random_state)
    params = {
        "perplexity": float(perplexity),
        "use_rep": rep_name,
        "n_pcs": -1,
        "metric": "euclidean",
        "knn_method": "auto",
        "neighbors_key": "",
        "tol": 1e-5,
        "random_state": int(random_state),
    }
    return P, affinity_record(params, info, use_rep)


@renamed_parameters(method="knn_method")
@shared_docs
def affinity(
    adata: AnnData,
    perplexity: float = 30.0,
    *,
    use_rep: str | None = None,
    n_pcs: int | None = None,
    n_neighbors: int | None = None,
    knn_method: str = "auto",
    metric: str = "euclidean",
    neighbors_key: str | None = None,
    tol: float = 1e-5,
    n_jobs: int | None = None,
    device: str = "auto",
    random_state: int | None = 0,
    key_added: str = AFFINITY,
    copy: bool = False,
) -> AnnData | None:
    """Perplexity-calibrated (entropic) affinities on a k-nearest-neighbour graph.

    For every cell *i* a Gaussian kernel over its *k* nearest neighbours is calibrated so that the entropy of
    p_{j|i} equals log(``perplexity``), as in t-SNE and Elastic Embedding; the conditional affinities are then
    symmetrised, P = (P_cond + P_condᵀ) / (2N), so that P sums to 1. P holds N·k entries: memory grows like N·k.

    Parameters
    ----------
    adata
        Annotated data matrix.
    perplexity
        Effective number of neighbours. Must be smaller than the number of neighbours.
    {doc_use_rep}
    n_neighbors
        Neighbours per cell, *k*. Default ``min(3 · perplexity, n_obs − 1)`` as in t-SNE/openTSNE.
    knn_method
        Nearest-neighbour search: ``"exact"`` (chunked brute force in torch, on the GPU when present: a float32
        shortlist of k + max(8, k/4) candidates per cell, from which the k nearest are chosen by their distances
        recomputed directly, in float64 on a CPU),
        ``"faiss"`` (faiss's HNSW graph), ``"annoy"``, ``"pynndescent"``, or ``"auto"`` (exact on a GPU or up to
        20,000 cells, faiss beyond: the fastest of the three approximate searches at 300,000 cells, with a recall
        of the exact neighbours above annoy's).
        Formerly ``method``.
    metric
        ``"euclidean"`` or ``"cosine"``; with ``knn_method="pynndescent"`` any of its metrics.
    neighbors_key
        Reuse the distances of an existing neighbour graph instead of searching, e.g. ``"neighbors"`` for
        :func:`scanpy.pp.neighbors`' graph (``adata.obsp[adata.uns[neighbors_key]["distances_key"]]``). The graph
        must hold more than ``perplexity`` neighbours for every cell.
    tol
        Tolerance of the entropy calibration, in nats.
    n_jobs
        CPU threads for the neighbour search (``None``: all cores).
    {doc_device}
    {doc_random_state}
    {doc_key_added}
    {doc_copy}

    Returns
    -------
    Returns `None` if `copy=False`, else a new `AnnData`. Sets the following fields:

    `adata.obsp['affinity' | key_added]` : :class:`scipy.sparse.csr_matrix` (dtype `float32`)
        The symmetric affinity matrix P, summing to 1.
    `adata.uns['affinity' | key_added]` : `dict`
        `params` (the call's parameters and the representation used), `n_neighbors`, the resolved `method`, and
        `n_unconverged` (cells whose calibration missed `tol`).

    Examples
    --------
    >>> import scanpy as sc, scembed as se
    >>> adata = sc.datasets.pbmc68k_reduced()
    >>> se.pp.affinity(adata, perplexity=30)
    >>> adata.obsp["affinity"].sum()  # doctest: +ELLIPSIS
    np.float32(1.0...)
    """
    needs_X = use_rep == "X" or (
        use_rep is None and neighbors_key is None and REP_PCA not in getattr(adata, "obsm", {})
    )
    check_adata(adata, min_obs=3, require_vars=needs_X)
    perplexity = check_in_range(perplexity, "perplexity", low=1)  # the entropy of p_{j|i} is never below log(1)
    if knn_method not in KNN_METHODS:
        raise ValueError(f"`knn_method` must be one of {KNN_METHODS}, got {knn_method!r}.")
    if knn_method != "pynndescent" and neighbors_key is None and metric not in METRICS:
        raise ValueError(f"`metric` must be one of {METRICS} (any pynndescent metric with knn_method='pynndescent').")
    tol = check_in_range(tol, "tol", low=0, low_inclusive=False)
    n_jobs = check_n_jobs(n_jobs)
    check_bool(copy, "copy")
    keys = output_keys(key_added)
    dev = resolve_device(device)
    seed = seed_int(random_state)

    if neighbors_key is not None:
        P, info, rep_name = _from_neighbors(adata, neighbors_key, perplexity, tol, dev)
    else:
        n = adata.n_obs
        if perplexity >= n - 1:
            raise ValueError(f"`perplexity={perplexity:g}` must be smaller than n_obs - 1 = {n - 1}.")
        if n_neighbors is not None:
            check_positive_int(n_neighbors, "n_neighbors")
        X, rep_name = get_representation(adata, use_rep, n_pcs, random_state=seed)
        P, info = compute_affinities(
            X,
            perplexity,
            n_neighbors=n_neighbors,
            knn_method=knn_method,
            metric=metric,
            tol=tol,
            n_jobs=n_jobs,
            device=dev,
            random_state=seed,
        )

    adata = copy_adata(adata) if copy else adata
    adata.obsp[keys.obsp] = P
    params = {
        "perplexity": perplexity,
        "use_rep": rep_name,
        "n_pcs": -1 if n_pcs is None else int(n_pcs),
        "metric": metric,
        "knn_method": knn_method,
        "neighbors_key": neighbors_key or "",
        "tol": tol,
        "random_state": seed,
    }
    adata.uns[keys.uns] = affinity_record(params, info, use_rep)
    return adata if copy else None


def _from_neighbors(
    adata: AnnData, neighbors_key: str, perplexity: float, tol: float, dev
) -> tuple[sparse.csr_matrix, dict[str, Any], str]:
    """Affinities from the distances of an existing neighbour graph (``neighbors_key``)."""
    check_key(adata.uns, neighbors_key, arg="neighbors_key", where="adata.uns")
    dist_key = adata.uns[neighbors_key].get("distances_key", "distances")
    check_key(adata.obsp, dist_key, arg="neighbors_key", where=f"adata.obsp (via uns[{neighbors_key!r}])")
    indices, distances = padded_neighbors_from_graph(adata.obsp[dist_key])
    k_min = int((indices >= 0).sum(1).min())
    if perplexity >= k_min:
        raise ValueError(
            f"`perplexity={perplexity:g}` needs more than {perplexity:g} neighbours per cell, but the graph "
            f"obsp[{dist_key!r}] has only {k_min} for some cells; lower the perplexity or recompute the graph "
            f"with sc.pp.neighbors(adata, n_neighbors={int(3 * perplexity) + 1})."
        )
    if not np.isfinite(distances[indices >= 0]).all():
        raise ValueError(f"the graph obsp[{dist_key!r}] holds NaN or infinite distances.")
    P, info = _calibrate(indices, distances, perplexity, tol, dev)
    return P, {"n_neighbors": int(indices.shape[1]), "method": "graph", **info}, f"obsp[{dist_key!r}]"
