"""``se.datasets``: counts that look like single-cell data, generated in chunks, reproducibly."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
from scipy import sparse
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import scembed as se


def log_pca_kmeans(adata, k: int) -> np.ndarray:
    a = adata.copy()
    sc.pp.normalize_total(a)
    sc.pp.log1p(a)
    sc.pp.pca(a, n_comps=20, random_state=0)
    return KMeans(k, n_init=5, random_state=0).fit_predict(a.obsm["X_pca"])


def test_simulate_counts_structure() -> None:
    adata = se.datasets.simulate(n_cells=1500, n_genes=300, n_celltypes=4, n_batches=3, random_state=0)
    assert adata.shape == (1500, 300)
    assert sparse.issparse(adata.X)
    values = adata.X.data
    assert (values >= 0).all() and np.array_equal(values, np.round(values))
    assert adata.obs["celltype"].dtype == "category" and adata.obs["celltype"].nunique() == 4
    assert adata.obs["batch"].dtype == "category" and adata.obs["batch"].nunique() == 3
    libsize = np.asarray(adata.X.sum(1)).ravel()
    assert libsize.std() / libsize.mean() > 0.2  # varied library sizes
    # the batch effect dominates uncorrected data (what integration methods must remove) ...
    assert adjusted_rand_score(adata.obs["batch"], log_pca_kmeans(adata, 3)) > 0.7
    # ... and without it the cell-type programmes separate the cells after log-normalisation
    one_batch = se.datasets.simulate(n_cells=1500, n_genes=300, n_celltypes=4, random_state=0)
    assert adjusted_rand_score(one_batch.obs["celltype"], log_pca_kmeans(one_batch, 4)) > 0.9


def test_simulate_batch_effect_and_dropout() -> None:
    kw = {"n_cells": 1000, "n_genes": 200, "n_celltypes": 3, "random_state": 1}
    no_batch = se.datasets.simulate(n_batches=2, batch_scale=0.0, **kw)
    batch = se.datasets.simulate(n_batches=2, batch_scale=1.0, **kw)

    def batch_gap(a) -> float:
        X = np.log1p(a.X.toarray())
        b = a.obs["batch"].cat.codes.to_numpy()
        return float(np.linalg.norm(X[b == 0].mean(0) - X[b == 1].mean(0)))

    assert batch_gap(batch) > 2 * batch_gap(no_batch)
    dense = se.datasets.simulate(dropout=0.0, **kw)
    dropped = se.datasets.simulate(dropout=0.5, **kw)
    assert dropped.X.nnz < 0.8 * dense.X.nnz


def test_simulate_is_reproducible_and_chunking_invariant() -> None:
    a = se.datasets.simulate(n_cells=700, n_genes=100, random_state=5, chunk_size=700)
    b = se.datasets.simulate(n_cells=700, n_genes=100, random_state=5, chunk_size=700)
    assert (a.X != b.X).nnz == 0
    c = se.datasets.simulate(n_cells=700, n_genes=100, random_state=6)
    assert (a.X != c.X).nnz > 0
    chunked = se.datasets.simulate(n_cells=700, n_genes=100, random_state=5, chunk_size=128)
    assert chunked.shape == a.shape and sparse.issparse(chunked.X)
    np.testing.assert_array_equal(a.obs["celltype"], chunked.obs["celltype"])


def test_simulate_embedding() -> None:
    adata = se.datasets.simulate_embedding(n_cells=2000, n_dims=50, n_celltypes=6, random_state=0)
    X = adata.obsm["X_pca"]
    assert X.shape == (2000, 50) and X.dtype == np.float32 and np.isfinite(X).all()
    assert adata.obs["celltype"].nunique() == 6
    labels = KMeans(6, n_init=5, random_state=0).fit_predict(X)
    assert adjusted_rand_score(adata.obs["celltype"], labels) > 0.5


@pytest.mark.parametrize(("kwargs", "match"), [({"n_cells": 0}, "n_cells"), ({"n_genes": -1}, "n_genes")])
def test_simulate_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        se.datasets.simulate(**kwargs)
