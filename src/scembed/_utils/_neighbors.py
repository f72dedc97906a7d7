"""scanpy's UMAP connectivities of a kNN graph found elsewhere (scembed's own, possibly GPU, search)."""

from __future__ import annotations

import numpy as np
from scipy import sparse


class _PrecomputedNeighbors:
    """A kNN transformer (:class:`sklearn.neighbors.KNeighborsTransformer`'s protocol) returning a given graph.

    Each row holds the cell itself first, at distance 0, then its nearest other cells, as sklearn's does.
    """

    def __init__(self, indices: np.ndarray, distances: np.ndarray):
        n, k = indices.shape
        self.n_neighbors = k + 1
        self._graph = sparse.csr_matrix(
            (
                np.column_stack([np.zeros(n), distances]).ravel().astype(np.float64),
                np.column_stack([np.arange(n), indices]).ravel(),
                np.arange(0, n * (k + 1) + 1, k + 1),
            ),
            shape=(n, n),
        )

    def get_params(self, deep: bool = True) -> dict:
        return {"n_neighbors": self.n_neighbors}

    def set_params(self, **params) -> _PrecomputedNeighbors:
        return self

    def fit(self, x, y=None) -> _PrecomputedNeighbors:
        return self

    def transform(self, x) -> sparse.csr_matrix:
        return self._graph

    def fit_transform(self, x, y=None) -> sparse.csr_matrix:
        return self._graph


def umap_connectivities(indices: np.ndarray, distances: np.ndarray, n_neighbors: int) -> sparse.csr_matrix:
    """UMAP's fuzzy simplicial set of a kNN graph, as ``scanpy.pp.neighbors`` computes it (its connectivities).

    Parameters
    ----------
    indices, distances
        Cells × k: each cell's k nearest other cells (the cell itself excluded) and their distances, nearest
        first.
    n_neighbors
        Neighbourhood size counting the cell itself (k + 1), as in ``scanpy.pp.neighbors``.

    Returns
    -------
    The symmetric connectivities (CSR, float), with scanpy's public ``sc.pp.neighbors`` on the given graph
    (through a precomputed kNN transformer), so the graph is scanpy's own.
    """
    import anndata as ad
    import scanpy as sc

    indices = np.asarray(indices, dtype=np.int64)
    distances = np.asarray(distances, dtype=np.float64)
    n, k = indices.shape
    if n_neighbors != k + 1:
        raise ValueError(f"`n_neighbors` ({n_neighbors}) must count the cell and its {k} neighbours ({k + 1}).")
    tmp = ad.AnnData(np.zeros((n, 1), dtype=np.float32))  # the data is never read: the graph is given
    verbosity = sc.settings.verbosity
    sc.settings.verbosity = 0
    try:
        sc.pp.neighbors(tmp, use_rep="X", transformer=_PrecomputedNeighbors(indices, distances))
    finally:
        sc.settings.verbosity = verbosity
    return sparse.csr_matrix(tmp.obsp["connectivities"])
