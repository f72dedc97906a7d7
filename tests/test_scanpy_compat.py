"""scanpy 1.11 + pynndescent 0.7 broke ``sc.pp.neighbors`` beyond 4,096 cells; pyproject pins around it.

pynndescent 0.7's ``PyNNDescentTransformer`` returns a ``csr_array``, and scanpy 1.11's
``neighbors._common._ind_dist_shortcut`` calls ``.getnnz(axis=1)`` on it, which only the ``csr_matrix`` class has.
scanpy switches to pynndescent above 4,096 cells for non-euclidean metrics (8,192 for euclidean), so small tests
never see it. This test runs that path and then feeds the graph to ``se.pp.affinity``.
"""

from __future__ import annotations

import numpy as np
import scanpy as sc

import scembed as se


def test_scanpy_neighbors_above_4096_cells_with_pynndescent() -> None:
    adata = se.datasets.simulate_embedding(n_cells=4200, n_dims=10, n_celltypes=5, random_state=0)
    sc.pp.neighbors(adata, n_neighbors=31, use_rep="X_pca", metric="cosine", method="gauss", random_state=0)
    distances = adata.obsp["distances"]
    assert distances.shape == (4200, 4200)
    assert np.diff(distances.indptr).min() > 20  # ~30 neighbours per cell (pynndescent may merge duplicates)
    se.pp.affinity(adata, perplexity=10, neighbors_key="neighbors")
    P = adata.obsp["affinity"]
    assert adata.uns["affinity"]["method"] == "graph"
    assert abs(P.sum() - 1) < 1e-5 and abs(P - P.T).max() < 1e-9
