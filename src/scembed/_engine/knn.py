"""k-nearest-neighbour search: exact (chunked brute force in torch, CPU or GPU), faiss HNSW, annoy or pynndescent."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

KNN_METHODS = ("auto", "exact", "faiss", "annoy", "pynndescent")
#: metrics every method supports; pynndescent accepts any of its own metrics too
METRICS = ("euclidean", "cosine")
#: on a CPU, the exact search is used up to this many cells by ``method="auto"``
EXACT_MAX_CPU = 20_000
#: annoy visits this many times openTSNE's default number of nodes per query
_ANNOY_SEARCH_FACTOR = 3
#: faiss HNSW graph: links per node, candidates kept while building, and at least this many while searching
#: (k = 90 neighbours of 300,000 cells: recall 0.989 against the exact search; benchmarks/README.md, "kNN search")
_HNSW_M, _HNSW_EF_CONSTRUCTION, _HNSW_EF_SEARCH = 32, 80, 128
#: bytes of the distance block that the exact search holds at once
_CHUNK_BYTES = {"cpu": 128 * 2**20, "cuda": 1024 * 2**20}
#: the exact search shortlists k + max(this, k / 4) candidates by the fast expansion, then keeps the k nearest
_EXACT_MARGIN_MIN = 8


def resolve_n_jobs(n_jobs: int | None) -> int:
    """``None`` or -1 → every core this process may use; other negatives count back from it, as in joblib."""
    n_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n_jobs is None:
        return n_cores
    if n_jobs < 0:
        return max(1, n_cores + 1 + n_jobs)
    return max(1, int(n_jobs))


def resolve_knn_method(method: str, n_obs: int, device: torch.device) -> str:
    """Pick the search for ``method="auto"``: exact on a GPU or for small data, faiss HNSW otherwise.

    faiss's HNSW graph found the neighbours of 300,000 cells 3× faster than annoy and pynndescent's time was
    between, at a higher recall than annoy's (``benchmarks/knn.py``).
    """
    if method != "auto":
        return method
    if device.type == "cuda" or n_obs <= EXACT_MAX_CPU:
        return "exact"
    return "faiss"


def nearest_neighbors(
    X: np.ndarray,
    k: int,
    *,
    method: str = "auto",
    metric: str = "euclidean",
    n_jobs: int | None = None,
    device: torch.device | str = "cpu",
    random_state: int = 0,
    query: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """The ``k`` nearest other cells of every cell, or of every row of ``query`` among the rows of ``X``.

    Parameters
    ----------
    X
        Cells × features, float.
    k
        Neighbours per cell, not counting the cell itself (duplicated cells are neighbours at distance 0).
    method
        ``"exact"``, ``"annoy"``, ``"pynndescent"`` or ``"auto"`` (:func:`resolve_knn_method`).
    metric
        ``"euclidean"`` or ``"cosine"`` (distance 1 − cosine similarity); pynndescent takes its other metrics too.
    n_jobs
        Threads for annoy/pynndescent/torch on the CPU.
    device
        Where the exact search runs.
    random_state
        Seed of the approximate searches.
    query
        Search these rows (same features as ``X``) against ``X`` instead of ``X`` against itself; nothing is
        excluded then, and ``k`` may be as large as ``len(X)``.

    Returns
    -------
    indices
        ``(n, k)`` int64 (``n`` = rows of ``query`` when given), nearest first.
    distances
        ``(n, k)`` float32, ascending.
    method
        The method used.
    """
    device = torch.device(device)
    n = X.shape[0]
    k_max = n if query is not None else n - 1
    if not 1 <= k <= k_max:
        raise ValueError(f"k must lie in [1, {k_max}], got {k}.")
    method = resolve_knn_method(method, n, device)
    if method not in KNN_METHODS:
        raise ValueError(f"`method` must be one of {KNN_METHODS}, got {method!r}.")
    if method != "pynndescent" and metric not in METRICS:
        raise ValueError(f"`metric` must be one of {METRICS} for method={method!r}, got {metric!r}.")
    n_jobs = resolve_n_jobs(n_jobs)
    X = np.ascontiguousarray(X, dtype=np.float32)
    if query is not None:
        query = np.ascontiguousarray(query, dtype=np.float32)
    if method == "exact":
        idx, dist = _exact(X, k, metric=metric, device=device, n_jobs=n_jobs, query=query)
    elif method == "faiss":
        idx, dist = _faiss(X, k, metric=metric, n_jobs=n_jobs, random_state=random_state, query=query)
    elif method == "annoy":
        idx, dist = _annoy(X, k, metric=metric, n_jobs=n_jobs, random_state=random_state, query=query)
    else:
        idx, dist = _pynndescent(X, k, metric=metric, n_jobs=n_jobs, random_state=random_state, query=query)
    return idx, dist, method


def _exact(
    X: np.ndarray, k: int, *, metric: str, device: torch.device, n_jobs: int, query: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Brute force in row chunks so that memory stays O(chunk · n), never n².

    The ‖x‖² + ‖y‖² − 2x·y expansion only shortlists candidates: its rounding error grows with the norms, not the
    distances, and can swap neighbours whose distances differ by less than it. So ``k + margin`` candidates are
    kept and the ``k`` nearest are chosen by their distances recomputed directly, in float64 on a CPU.
    """
    n = X.shape[0]
    n_rows = n if query is None else query.shape[0]
    n_candidates = min(k + max(_EXACT_MARGIN_MIN, k // 4), n - 1 if query is None else n)
    on_cpu = device.type == "cpu"
    threads = torch.get_num_threads()
    if on_cpu:
        torch.set_num_threads(n_jobs)
    try:
        data = torch.from_numpy(X).to(device)
        if metric == "cosine":
            data = torch.nn.functional.normalize(data, dim=1)
        # distances do not depend on the origin: centring shrinks the norms and so the expansion's rounding error
        centre = data.mean(0)
        rows_data = data if query is None else torch.from_numpy(query).to(device)
        if query is not None and metric == "cosine":
            rows_data = torch.nn.functional.normalize(rows_data, dim=1)
        data, rows_data = data - centre, rows_data - centre
        sq_norms = (data * data).sum(1)
        rows_sq = (rows_data * rows_data).sum(1)
        chunk_bytes = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cpu"])
        # the distance block (chunk × n floats) and the recomputation's differences (chunk × candidates × features)
        chunk = min(chunk_bytes // (4 * n), chunk_bytes // (8 * n_candidates * data.shape[1]))
        chunk = max(1, min(n_rows, chunk))
        # the direct recomputation on a CPU runs in numpy, in float64, in the calling thread
        data_np, rows_np = (data.numpy(), rows_data.numpy()) if on_cpu else (None, None)
        indices = np.empty((n_rows, k), dtype=np.int64)
        distances = np.empty((n_rows, k), dtype=np.float32)
        for start in range(0, n_rows, chunk):
            stop = min(start + chunk, n_rows)
            d2 = torch.addmm(sq_norms[None, :], rows_data[start:stop], data.T, alpha=-2.0)
            d2.add_(rows_sq[start:stop, None])
            if query is None:
                rows = torch.arange(stop - start, device=device)
                d2[rows, rows + start] = float("inf")  # a cell is not its own neighbour, duplicates are
            _, candidates = torch.topk(d2, n_candidates, dim=1, largest=False, sorted=True)
            del d2
            if on_cpu:
                candidates = candidates.numpy()
                diff = rows_np[start:stop, None, :].astype(np.float64) - data_np[candidates]
                exact_d2 = np.einsum("ijk,ijk->ij", diff, diff)
                del diff
            else:
                exact_d2 = ((rows_data[start:stop, None, :] - data[candidates]) ** 2).sum(-1)
                candidates, exact_d2 = candidates.cpu().numpy(), exact_d2.cpu().numpy()
            # stable: equally distant candidates keep the shortlist's order
            order = np.argsort(exact_d2, axis=1, kind="stable")[:, :k]
            indices[start:stop] = np.take_along_axis(candidates, order, 1)
            distances[start:stop] = np.maximum(np.take_along_axis(exact_d2, order, 1), 0)
    finally:
        torch.set_num_threads(threads)
    if metric == "cosine":
        distances /= 2  # ‖a − b‖² / 2 = 1 − cos(a, b) for unit vectors
    else:
        np.sqrt(distances, out=distances)
    return indices, distances


def _drop_self(
    indices: np.ndarray, distances: np.ndarray, k: int, row_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each cell from its own k+1 neighbour list (or the farthest one where the search missed it).

    With duplicated cells the search may list a duplicate at distance 0 before the cell itself, so the cell's
    own index is dropped wherever it stands, not only from the first column. ``row_ids``: the cell of each query
    row (default: row i is cell i).
    """
    n = indices.shape[0]
    is_self = indices == (np.arange(n) if row_ids is None else row_ids)[:, None]
    missing = ~is_self.any(1)
    is_self[missing, -1] = True
    # a row holds the cell at most k + 1 times: a small integer type keeps this (n, k + 1) temporary small
    first_self = np.cumsum(is_self, axis=1, dtype=np.int16 if k < 2**15 else np.int64) == 1
    keep = ~(is_self & first_self)
    del is_self, first_self
    kept = indices[keep].reshape(n, k).astype(np.int64, copy=False)
    return kept, distances[keep].reshape(n, k).astype(np.float32, copy=False)


def _faiss(
    X: np.ndarray, k: int, *, metric: str, n_jobs: int, random_state: int, query: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The HNSW graph of faiss (``IndexHNSWFlat``): built once, searched for every row, in ``n_jobs`` threads."""
    import faiss

    if metric == "cosine":  # on unit vectors ‖a − b‖² = 2 (1 − cos): the L2 graph of the normalised rows
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        query = None if query is None else query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    dim = X.shape[1]
    threads_before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n_jobs)
    try:
        index = faiss.IndexHNSWFlat(dim, _HNSW_M)
        index.hnsw.efConstruction = _HNSW_EF_CONSTRUCTION
        index.hnsw.rng = faiss.RandomGenerator(int(random_state))  # the levels of the nodes
        index.add(np.ascontiguousarray(X, dtype=np.float32))
        width = k + 1 if query is None else k
        index.hnsw.efSearch = int(max(_HNSW_EF_SEARCH, width))
        d2, indices = index.search(np.ascontiguousarray(X if query is None else query, dtype=np.float32), width)
    finally:
        faiss.omp_set_num_threads(threads_before)
    missing = indices < 0  # fewer found than asked (tiny graphs): repeat the farthest one found, as for annoy
    if missing.any():
        last = np.maximum((~missing).sum(1) - 1, 0)
        rows = np.nonzero(missing)[0]
        indices[missing] = indices[rows, last[rows]]
        d2[missing] = d2[rows, last[rows]]
    d2 = np.maximum(d2, 0, out=d2)
    distances = d2 / 2 if metric == "cosine" else np.sqrt(d2, out=d2)
    if query is None:
        indices, distances = _drop_self(indices, distances, k)
    return indices, distances


def _annoy(
    X: np.ndarray, k: int, *, metric: str, n_jobs: int, random_state: int, query: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    from annoy import AnnoyIndex

    n, dim = X.shape
    index = AnnoyIndex(dim, "angular" if metric == "cosine" else "euclidean")
    index.set_seed(int(random_state))
    for i in range(n):
        index.add_item(i, X[i])
    # openTSNE's tree count (more trees for more points); its default search (search_k = n_trees·k) reaches only
    # ~0.85 recall on 50 PCs of real data, three times as many visited nodes reach ≥ 0.97 (benchmarks/README.md)
    n_trees = 5 + int(round(np.sqrt(n) / 20))
    index.build(n_trees, n_jobs=n_jobs)
    search_k = _ANNOY_SEARCH_FACTOR * n_trees * (k + 1)
    n_rows, width = (n, k + 1) if query is None else (query.shape[0], k)
    indices = np.empty((n_rows, width), dtype=np.int64)
    distances = np.empty((n_rows, width), dtype=np.float32)

    def search(rows: range) -> None:
        for i in rows:
            if query is None:
                nn, d = index.get_nns_by_item(i, width, search_k=search_k, include_distances=True)
            else:
                nn, d = index.get_nns_by_vector(query[i], width, search_k=search_k, include_distances=True)
            if len(nn) < width:  # annoy can return fewer on tiny indexes: repeat the farthest one found
                nn, d = nn + [nn[-1]] * (width - len(nn)), d + [d[-1]] * (width - len(d))
            indices[i], distances[i] = nn, d

    step = max(1, n_rows // (n_jobs * 8))
    with ThreadPoolExecutor(max_workers=n_jobs) as pool:  # annoy releases the GIL while it searches
        list(pool.map(search, [range(s, min(s + step, n_rows)) for s in range(0, n_rows, step)]))
    if query is None:
        indices, distances = _drop_self(indices, distances, k)
    if metric == "cosine":
        distances = distances**2 / 2  # annoy's angular distance is sqrt(2 (1 − cos))
    return indices, distances


def _pynndescent(
    X: np.ndarray, k: int, *, metric: str, n_jobs: int, random_state: int, query: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    from pynndescent import NNDescent

    index = NNDescent(
        X,
        n_neighbors=k + 1,
        metric=metric,
        random_state=int(random_state),
        n_jobs=n_jobs,
        n_trees=min(64, 5 + int(round(np.sqrt(X.shape[0]) / 20))),
        n_iters=max(5, int(round(np.log2(X.shape[0])))),
        compressed=True,
    )
    if query is not None:
        indices, distances = index.query(query, k=k)
        return indices.astype(np.int64), distances.astype(np.float32)
    indices, distances = index.neighbor_graph
    return _drop_self(indices, distances, k)
