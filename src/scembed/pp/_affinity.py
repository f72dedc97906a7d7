from __future__ import annotations

import numpy as np
from anndata import AnnData
from scipy import sparse

from .._constants import AFFINITY
from .._engine.affinity import entropic_affinities, padded_neighbors_from_graph
from .._engine.distributed import knn_affinities
from .._engine.knn import KNN_METHODS, METRICS, resolve_knn_method
from .._utils import (
    check_adata,
    check_in_range,
    check_key,
    check_positive_int,
    get_logger,
    get_representation,
    resolve_device,
)
from .._utils._random import seed_int


def affinity(
    adata: AnnData,
    perplexity: float = 30.0,
    *,
    use_rep: str | None = None,
    n_pcs: int | None = None,
    n_neighbors: int | None = None,
    method: str = "auto",
    metric: str = "euclidean",
    neighbors_key: str | None = None,
    tol: float = 1e-5,
    key_added: str = AFFINITY,
    n_jobs: int | None = None,
    device: str = "auto",
    random_state: int | None = 0,
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
    use_rep
        Representation to use: a key of ``adata.obsm`` or ``"X"``. ``None`` (default) takes ``obsm["X_pca"]``, or
        ``X`` when it has fewer than 50 variables, or otherwise a 50-component PCA of ``X`` computed on the fly.
    n_pcs
        Use only the first ``n_pcs`` columns of the representation.
    n_neighbors
        Neighbours per cell, *k*. Default ``min(3 · perplexity, n_obs − 1)`` as in t-SNE/openTSNE.
    method
        Nearest-neighbour search: ``"exact"`` (chunked brute force in torch, on the GPU when present),
        ``"annoy"``, ``"pynndescent"``, or ``"auto"`` (exact on a GPU or up to 20,000 cells, annoy beyond).
    metric
        ``"euclidean"`` or ``"cosine"``; with ``method="pynndescent"`` any of its metrics.
    neighbors_key
        Reuse the distances of an existing neighbour graph instead of searching, e.g. ``"neighbors"`` for
        :func:`scanpy.pp.neighbors`' graph (``adata.obsp[adata.uns[neighbors_key]["distances_key"]]``). The graph
        must hold more than ``perplexity`` neighbours for every cell.
    tol
        Tolerance of the entropy calibration, in nats.
    key_added
        Key of the result in ``adata.obsp`` and ``adata.uns``.
    n_jobs
        CPU threads for the neighbour search (``None``: all cores).
    device
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
    random_state
        Seed of the approximate neighbour searches and of the PCA computed when needed.
    copy
        Return a modified copy instead of writing to ``adata``.

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
        use_rep is None and neighbors_key is None and "X_pca" not in getattr(adata, "obsm", {})
    )
    check_adata(adata, min_obs=3, require_vars=needs_X)
    perplexity = check_in_range(perplexity, "perplexity", low=0, low_inclusive=False)
    if method not in KNN_METHODS:
        raise ValueError(f"`method` must be one of {KNN_METHODS}, got {method!r}.")
    if method != "pynndescent" and neighbors_key is None and metric not in METRICS:
        raise ValueError(f"`metric` must be one of {METRICS} (any pynndescent metric with method='pynndescent').")
    tol = check_in_range(tol, "tol", low=0, low_inclusive=False)
    if not isinstance(key_added, str) or not key_added:
        raise TypeError(f"`key_added` must be a non-empty string, got {key_added!r}.")
    n = adata.n_obs
    dev = resolve_device(device)
    seed = seed_int(random_state)
    log = get_logger()

    if neighbors_key is not None:
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
        rep_name, k, used_method = f"obsp[{dist_key!r}]", indices.shape[1], "graph"
        P, _, n_bad = entropic_affinities(indices, distances, perplexity, tol=tol, device=dev)
    else:
        if perplexity >= n - 1:
            raise ValueError(f"`perplexity={perplexity:g}` must be smaller than n_obs - 1 = {n - 1}.")
        k = min(int(3 * perplexity), n - 1) if n_neighbors is None else check_positive_int(n_neighbors, "n_neighbors")
        if k > n - 1:
            raise ValueError(f"`n_neighbors={k}` must be at most n_obs - 1 = {n - 1}.")
        if perplexity >= k:
            raise ValueError(f"`perplexity={perplexity:g}` must be smaller than `n_neighbors={k}`.")
        X, rep_name = get_representation(adata, use_rep, n_pcs, random_state=seed)
        used_method = resolve_knn_method(method, n, dev)
        log.info(f"computing {k} nearest neighbours ({used_method}, {metric}) on {rep_name}")
        # one process: nearest_neighbors + entropic_affinities; under torchrun the rows are split across ranks
        P, _, n_bad, used_method = knn_affinities(
            X, k, perplexity, method=used_method, metric=metric, tol=tol, n_jobs=n_jobs, device=dev, random_state=seed
        )
    if n_bad:
        log.warning(
            f"{n_bad} cell(s) could not be calibrated to perplexity {perplexity:g} within tol={tol:g} "
            "(e.g. all their neighbours at the same distance)"
        )

    adata = adata.copy() if copy else adata
    adata.obsp[key_added] = sparse.csr_matrix(P)
    adata.uns[key_added] = {
        "params": {
            "perplexity": perplexity,
            "use_rep": rep_name,
            "n_pcs": -1 if n_pcs is None else int(n_pcs),
            "metric": metric,
            "method": method,
            "neighbors_key": neighbors_key or "",
            "tol": tol,
            "random_state": seed,
        },
        "use_rep": "" if use_rep is None else use_rep,
        "n_neighbors": int(k),
        "method": used_method,
        "n_unconverged": int(n_bad),
    }
    return adata if copy else None
