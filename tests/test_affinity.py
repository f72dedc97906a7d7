"""``se.pp.affinity`` against an independent float64 brute-force reference, its invariants and its error paths."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
from anndata import AnnData
from scipy import sparse

import scembed as se
from scembed._engine.affinity import calibrate_perplexity, padded_neighbors_from_graph
from scembed._engine.knn import nearest_neighbors


def reference_affinities(X: np.ndarray, perplexity: float, k: int) -> np.ndarray:
    """Dense float64 P: full distance matrix, per-row bisection on β over the k nearest, then symmetrised."""
    X = X.astype(np.float64)
    n = X.shape[0]
    D2 = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(D2, np.inf)
    P_cond = np.zeros((n, n))
    target = np.log(perplexity)
    for i in range(n):
        nn = np.argsort(D2[i], kind="stable")[:k]
        d = D2[i, nn] - D2[i, nn].min()
        lo, hi = 0.0, 1e12
        for _ in range(200):
            beta = (lo + hi) / 2 if hi < 1e12 else (lo * 2 if lo > 0 else 1.0)
            w = np.exp(-beta * d)
            p = w / w.sum()
            h = -(p[p > 0] * np.log(p[p > 0])).sum()
            if h > target:
                lo = beta
            else:
                hi = beta
        P_cond[i, nn] = p
    return (P_cond + P_cond.T) / (2 * n)


@pytest.fixture
def small() -> AnnData:
    return se.datasets.simulate_embedding(n_cells=300, n_dims=10, n_celltypes=4, random_state=1)


def conditional_entropy(P_cond_rows: np.ndarray) -> np.ndarray:
    p = np.where(P_cond_rows > 0, P_cond_rows, 1.0)
    return -(P_cond_rows * np.log(p)).sum(1)


@pytest.mark.parametrize("perplexity", [5.0, 30.0])
def test_exact_matches_float64_brute_force(small: AnnData, perplexity: float) -> None:
    se.pp.affinity(small, perplexity=perplexity, knn_method="exact")
    P = small.obsp["affinity"]
    ref = reference_affinities(small.obsm["X_pca"], perplexity, k=int(3 * perplexity))
    assert sparse.issparse(P) and P.dtype == np.float32
    assert np.abs(P.toarray() - ref).max() / ref.max() < 1e-4


@pytest.mark.parametrize("with_query", [False, True])
def test_exact_search_far_from_the_origin(with_query: bool) -> None:
    """Cells 300 units from the origin, 0.05 apart: the ‖x‖² + ‖y‖² − 2x·y expansion in float32 errs by more than
    the squared distances there, so the neighbours must be found as if by a float64 brute force all the same."""
    rng = np.random.default_rng(0)
    X = (300 + 0.05 * rng.normal(size=(400, 10))).astype(np.float32)
    Q = (300 + 0.05 * rng.normal(size=(50, 10))).astype(np.float32) if with_query else None
    idx, dist, _ = nearest_neighbors(X, 12, method="exact", query=Q)
    rows = (X if Q is None else Q).astype(np.float64)
    D = np.sqrt(((rows[:, None, :] - X[None, :, :].astype(np.float64)) ** 2).sum(-1))
    if Q is None:
        np.fill_diagonal(D, np.inf)
    ref_idx = np.argsort(D, axis=1, kind="stable")[:, :12]
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, np.take_along_axis(D, ref_idx, 1), rtol=1e-6)


def test_invariants(small: AnnData) -> None:
    se.pp.affinity(small, perplexity=20)
    P = small.obsp["affinity"]
    assert abs(P.sum() - 1) < 1e-5
    assert abs(P - P.T).max() < 1e-9
    assert P.diagonal().max() == 0
    assert (P.data > 0).all()
    # memory N·k: at most 2k stored entries per row
    assert P.nnz <= 2 * 60 * small.n_obs
    info = small.uns["affinity"]
    assert info["n_neighbors"] == 60 and info["method"] == "exact" and info["n_unconverged"] == 0
    assert info["params"]["perplexity"] == 20


def test_each_row_has_entropy_log_perplexity() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 8)).astype(np.float32)
    _, dist, _ = nearest_neighbors(X, 45, method="exact")
    P_cond, beta, n_bad = calibrate_perplexity(dist, 15.0, tol=1e-6)
    assert n_bad == 0
    np.testing.assert_allclose(P_cond.sum(1), 1, atol=1e-12)
    np.testing.assert_allclose(conditional_entropy(P_cond), np.log(15.0), atol=1e-6)
    # larger precision for cells in denser regions: β is positive and finite everywhere
    assert np.isfinite(beta).all() and (beta > 0).all()


def test_calibration_of_far_away_scales() -> None:
    """Rows whose distances differ by orders of magnitude all calibrate (the Newton/bisection guard)."""
    rng = np.random.default_rng(3)
    base = np.sort(rng.uniform(1, 2, size=(4, 30)), axis=1)
    dist = base * np.array([[1e-4], [1.0], [1e3], [1e6]])
    P_cond, _, n_bad = calibrate_perplexity(dist, 10.0)
    assert n_bad == 0
    np.testing.assert_allclose(conditional_entropy(P_cond), np.log(10.0), atol=1e-5)


def clustered(n: int, d: int = 20, seed: int = 0) -> np.ndarray:
    return se.datasets.simulate_embedding(n_cells=n, n_dims=d, n_celltypes=8, random_state=seed).obsm["X_pca"]


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(a, e)) for a, e in zip(approx, exact))
    return hits / exact.size


@pytest.mark.parametrize("method", ["annoy", "faiss"])
def test_approximate_recall_against_exact(method: str) -> None:
    X = clustered(3000)
    exact, _, _ = nearest_neighbors(X, 30, method="exact")
    approx, dist, used = nearest_neighbors(X, 30, method=method, random_state=0)
    assert used == method
    assert recall(approx, exact) >= 0.95
    assert (approx != np.arange(len(X))[:, None]).all()
    np.testing.assert_allclose(dist, np.linalg.norm(X[:, None] - X[approx], axis=-1), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_pynndescent_recall_against_exact() -> None:
    X = clustered(3000)
    exact, _, _ = nearest_neighbors(X, 30, method="exact")
    approx, _, used = nearest_neighbors(X, 30, method="pynndescent", random_state=0, n_jobs=1)
    assert used == "pynndescent"
    assert recall(approx, exact) >= 0.95


def test_approximate_affinity_close_to_exact() -> None:
    adata = AnnData(obsm={"X_pca": clustered(2000)})
    exact = se.pp.affinity(adata, perplexity=10, knn_method="exact", copy=True).obsp["affinity"]
    approx = se.pp.affinity(adata, perplexity=10, knn_method="annoy", copy=True).obsp["affinity"]
    assert abs(exact - approx).sum() < 0.05  # both sum to 1: total variation distance below 2.5 %


def test_cosine_metric(small: AnnData) -> None:
    X = small.obsm["X_pca"]
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    idx, dist, _ = nearest_neighbors(X, 10, method="exact", metric="cosine")
    np.testing.assert_allclose(dist, 1 - (unit[:, None] * unit[idx]).sum(-1), atol=1e-5)
    for method in ("annoy", "faiss"):
        approx_idx, approx_dist, _ = nearest_neighbors(X, 10, method=method, metric="cosine")
        assert recall(approx_idx, idx) > 0.95
        np.testing.assert_allclose(approx_dist, 1 - (unit[:, None] * unit[approx_idx]).sum(-1), atol=1e-4)


def test_reuse_scanpy_graph(small: AnnData) -> None:
    sc.pp.neighbors(small, n_neighbors=31, use_rep="X_pca", method="gauss", knn=True)
    se.pp.affinity(small, perplexity=10, neighbors_key="neighbors", key_added="from_graph")
    se.pp.affinity(small, perplexity=10, n_neighbors=30, knn_method="exact")
    assert small.uns["from_graph"]["method"] == "graph"
    np.testing.assert_allclose(small.obsp["from_graph"].toarray(), small.obsp["affinity"].toarray(), atol=1e-7)


def test_scanpy_graph_too_small_for_perplexity(small: AnnData) -> None:
    sc.pp.neighbors(small, n_neighbors=15, use_rep="X_pca", method="gauss")
    with pytest.raises(ValueError, match=r"perplexity=30.*neighbours"):
        se.pp.affinity(small, perplexity=30, neighbors_key="neighbors")
    with pytest.raises(KeyError, match="neighbors_key"):
        se.pp.affinity(small, perplexity=5, neighbors_key="nope")


def test_dense_and_sparse_X_give_the_same_result() -> None:
    rng = np.random.default_rng(0)
    X = rng.poisson(1.0, size=(200, 30)).astype(np.float32)
    dense, sp = AnnData(X), AnnData(sparse.csr_matrix(X))
    se.pp.affinity(dense, perplexity=10, use_rep="X")
    se.pp.affinity(sp, perplexity=10, use_rep="X")
    np.testing.assert_allclose(dense.obsp["affinity"].toarray(), sp.obsp["affinity"].toarray(), atol=1e-7)


def test_pca_computed_when_missing_and_not_stored() -> None:
    adata = se.datasets.simulate(n_cells=300, n_genes=200, random_state=0)
    sc.pp.log1p(adata)
    se.pp.affinity(adata, perplexity=10)
    assert "X_pca" not in adata.obsm
    assert adata.uns["affinity"]["params"]["use_rep"].startswith("pca(X")


def test_copy_and_n_pcs(small: AnnData) -> None:
    out = se.pp.affinity(small, perplexity=10, n_pcs=5, copy=True)
    assert isinstance(out, AnnData) and "affinity" in out.obsp and "affinity" not in small.obsp
    assert se.pp.affinity(small, perplexity=10, key_added="P5", n_pcs=5) is None
    np.testing.assert_array_equal(out.obsp["affinity"].toarray(), small.obsp["P5"].toarray())
    ref = reference_affinities(small.obsm["X_pca"][:, :5], 10, k=30)
    assert np.abs(small.obsp["P5"].toarray() - ref).max() / ref.max() < 1e-4


def test_duplicated_cells() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 5)).astype(np.float32)
    X = np.vstack([X, X[:20]])  # 20 exact duplicates: zero distances
    adata = AnnData(obsm={"X_pca": X})
    se.pp.affinity(adata, perplexity=10)
    P = adata.obsp["affinity"]
    assert np.isfinite(P.data).all() and abs(P.sum() - 1) < 1e-5
    assert P[0, 100] > 0  # a cell and its duplicate are neighbours


def test_h5ad_round_trip(small: AnnData, tmp_path) -> None:
    se.pp.affinity(small, perplexity=10)
    small.write_h5ad(tmp_path / "a.h5ad")
    back = sc.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_array_equal(back.obsp["affinity"].toarray(), small.obsp["affinity"].toarray())
    assert back.uns["affinity"]["params"]["perplexity"] == 10


@pytest.mark.parametrize("method", ["annoy", "faiss"])
def test_same_seed_same_result(method: str) -> None:
    adata = AnnData(obsm={"X_pca": clustered(1500)})
    kw = dict(perplexity=10, knn_method=method, random_state=3, n_jobs=2, copy=True)
    a = se.pp.affinity(adata, **kw).obsp["affinity"]
    b = se.pp.affinity(adata, **kw).obsp["affinity"]
    assert (a != b).nnz == 0


def test_auto_search_beyond_exact_is_faiss() -> None:
    import torch

    from scembed._engine.knn import EXACT_MAX_CPU, resolve_knn_method

    cpu = torch.device("cpu")
    assert resolve_knn_method("auto", EXACT_MAX_CPU, cpu) == "exact"
    assert resolve_knn_method("auto", EXACT_MAX_CPU + 1, cpu) == "faiss"
    assert resolve_knn_method("annoy", EXACT_MAX_CPU + 1, cpu) == "annoy"


def test_faiss_tiny_graph_and_threads_restored() -> None:
    import faiss

    before = faiss.omp_get_max_threads()
    X = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    idx, dist, _ = nearest_neighbors(X, 5, method="faiss", n_jobs=1)
    exact, exact_d, _ = nearest_neighbors(X, 5, method="exact")
    np.testing.assert_array_equal(np.sort(idx, 1), np.sort(exact, 1))  # all other cells: every row complete
    np.testing.assert_allclose(dist, exact_d, rtol=1e-5, atol=1e-5)
    assert faiss.omp_get_max_threads() == before


def snapshot(adata: AnnData) -> tuple:
    return set(adata.obsp), set(adata.uns), set(adata.obsm), adata.shape


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"perplexity": 0}, ValueError, "perplexity"),
        ({"perplexity": -3}, ValueError, "perplexity"),
        ({"perplexity": 299}, ValueError, "perplexity"),
        ({"perplexity": 30, "n_neighbors": 20}, ValueError, "perplexity"),
        ({"n_neighbors": 400}, ValueError, "n_neighbors"),
        ({"use_rep": "X_missing"}, KeyError, "use_rep"),
        ({"knn_method": "hnsw"}, ValueError, "knn_method"),
        ({"metric": "hamming"}, ValueError, "metric"),
        ({"n_pcs": 0}, ValueError, "n_pcs"),
        ({"n_pcs": 11}, ValueError, "n_pcs"),
        ({"key_added": ""}, TypeError, "key_added"),
        ({"device": "tpu"}, ValueError, "device"),
    ],
)
def test_bad_arguments_raise_and_leave_adata_unchanged(small: AnnData, kwargs, error, match) -> None:
    before = snapshot(small)
    with pytest.raises(error, match=match):
        se.pp.affinity(small, **kwargs)
    assert snapshot(small) == before


def test_nan_and_empty_input() -> None:
    X = np.ones((50, 4), dtype=np.float32)
    X[3, 1] = np.nan
    adata = AnnData(obsm={"X_pca": X})
    with pytest.raises(ValueError, match="NaN"):
        se.pp.affinity(adata, perplexity=5)
    assert "affinity" not in adata.obsp
    with pytest.raises(ValueError, match="adata"):
        se.pp.affinity(AnnData(np.zeros((0, 5), dtype=np.float32)), perplexity=5)
    with pytest.raises(TypeError, match="adata"):
        se.pp.affinity(np.zeros((10, 3)), perplexity=2)


@pytest.mark.gpu
def test_cuda_matches_cpu(small: AnnData) -> None:
    cpu = se.pp.affinity(small, perplexity=10, device="cpu", copy=True).obsp["affinity"]
    gpu = se.pp.affinity(small, perplexity=10, device="cuda", copy=True).obsp["affinity"]
    assert small.uns.get("affinity") is None
    assert abs(cpu - gpu).max() / cpu.max() < 1e-4


@pytest.mark.parametrize("method", ["exact", "annoy", "faiss"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_query_search_against_brute_force(method: str, metric: str) -> None:
    data = clustered(1500, seed=1)
    X, Q = data[:1200], data[1200:]  # new cells from the same populations
    if metric == "cosine":
        Xn, Qn = (A / np.linalg.norm(A, axis=1, keepdims=True) for A in (X, Q))
        D = 1 - Qn @ Xn.T
    else:
        D = np.linalg.norm(Q[:, None] - X[None], axis=-1)
    ref = np.argsort(D, axis=1)[:, :15]
    idx, dist, _ = nearest_neighbors(X, 15, method=method, metric=metric, query=Q)
    assert idx.shape == (300, 15)
    assert recall(idx, ref) >= (0.999 if method == "exact" else 0.95)
    np.testing.assert_allclose(dist, np.take_along_axis(D, idx, 1), atol=1e-4)


# ------------------------------------------------------------------- ties, duplicated cells, extreme distances
def reference_conditional(d2: np.ndarray, perplexity: float) -> np.ndarray:
    """One row of p_{j|i} in float64 by plain bisection on log β over [−700, 700]: with m ≥ perplexity neighbours
    tied at the smallest distance the entropy stays above log(perplexity), β runs to the top of the bracket and p
    becomes the uniform distribution over the tied set, the limit of the search."""
    s = d2 - d2.min()
    lo, hi = -700.0, 700.0
    for _ in range(200):
        log_beta = (lo + hi) / 2
        w = np.exp(-np.exp(log_beta) * s)
        p = w / w.sum()
        h = -(p[p > 0] * np.log(p[p > 0])).sum()
        if h > np.log(perplexity):
            lo = log_beta
        else:
            hi = log_beta
    return p


def duplicated_cells(n_copies: int = 40) -> AnnData:
    adata = se.datasets.simulate_embedding(n_cells=200, n_dims=10, n_celltypes=4, random_state=0)
    adata.obsm["X_pca"][:n_copies] = adata.obsm["X_pca"][0]
    return adata


def test_many_duplicated_cells_give_a_valid_affinity() -> None:
    """40 copies of one cell (39 neighbours at distance 0 ≥ perplexity 30): the calibration used to run β to
    infinity, turn those rows into NaN and drop them, so P summed to 0.8."""
    adata = duplicated_cells()
    se.pp.affinity(adata)
    P = adata.obsp["affinity"]
    assert np.isfinite(P.data).all()
    assert abs(P.sum() - 1) < 1e-5
    assert abs(P - P.T).max() < 1e-9
    ref = reference_affinities(adata.obsm["X_pca"], 30.0, k=90)

    def merge_copies(M: np.ndarray) -> np.ndarray:  # which copies fill the last places of a k-list is arbitrary
        M = np.vstack([M[:40].sum(0), M[40:]])
        return np.hstack([M[:, :40].sum(1, keepdims=True), M[:, 40:]])

    assert np.abs(merge_copies(P.toarray()) - merge_copies(ref)).max() / ref.max() < 1e-4
    # every copy spreads its mass evenly over the 39 others: each pair gets (1/39 + 1/39) / (2·200)
    np.testing.assert_allclose(P[0, 1:40].toarray(), 1 / (39 * 200), rtol=1e-5)

    X = adata.obsm["X_pca"]
    _, dist, _ = nearest_neighbors(X, 90, method="exact")
    P_cond, beta, n_bad = calibrate_perplexity(dist, 30.0)
    assert np.isfinite(P_cond).all()
    np.testing.assert_allclose(P_cond.sum(1), 1, atol=1e-12)
    # the copies sit at the tie limit (β = ∞) with entropy log 39 ≠ log 30: honestly counted as unconverged,
    # and so is any cell whose nearest neighbours are the 40 copies, tied at the same distance
    assert np.isinf(beta[:40]).all()
    tied = (dist == dist[:, :1]).sum(1)
    assert n_bad == adata.uns["affinity"]["n_unconverged"] == int((tied >= 30).sum()) >= 40
    np.testing.assert_allclose(conditional_entropy(P_cond[tied < 30]), np.log(30.0), atol=1e-5)


def test_ties_against_float64_bisection() -> None:
    rng = np.random.default_rng(5)
    d = np.sort(rng.uniform(1, 3, size=(7, 20)), axis=1)
    d[0, :12] = 0.0  # 12 neighbours at distance 0, more than the perplexity: uniform over the 12
    d[1, :12] = 0.5  # the same tie at a non-zero distance
    d[2, :10] = 0.0  # exactly `perplexity` tied: the limit has exactly the target entropy
    d[3, :8] = 0.0  # fewer tied than the perplexity: a finite (large) β reaches the target
    d[4] = 0.0  # all neighbours at distance 0: uniform over all of them
    d[5] = 2.0  # all at the same non-zero distance: the same
    d[6, :9] = 1.0 + 1e-9 * np.arange(9)  # near-ties: a finite β, nine orders of magnitude above the others
    P_cond, beta, n_bad = calibrate_perplexity(d, 10.0)
    assert np.isfinite(P_cond).all()
    np.testing.assert_allclose(P_cond.sum(1), 1, atol=1e-12)
    for i in range(len(d)):
        np.testing.assert_allclose(P_cond[i], reference_conditional(d[i] ** 2, 10.0), atol=1e-6, err_msg=f"row {i}")
    np.testing.assert_allclose(P_cond[0, :12], 1 / 12)
    np.testing.assert_allclose(P_cond[4], 1 / 20)
    assert np.isinf(beta[[0, 1, 2, 4, 5]]).all() and np.isfinite(beta[[3, 6]]).all()
    # rows 0, 1 (entropy log 12), 4 and 5 (log 20) miss log 10; row 2 is exact, rows 3 and 6 converge
    assert n_bad == 4
    np.testing.assert_allclose(conditional_entropy(P_cond[[2, 3, 6]]), np.log(10.0), atol=1e-5)


def test_all_zero_distance_rows_through_pp() -> None:
    rng = np.random.default_rng(2)
    X = rng.normal(size=(60, 4)).astype(np.float32)
    X[:12] = X[0]  # each copy has its 10 nearest neighbours all at distance 0
    adata = AnnData(obsm={"X_pca": X})
    se.pp.affinity(adata, perplexity=5, n_neighbors=10)
    P = adata.obsp["affinity"].toarray()
    assert np.isfinite(P).all() and abs(P.sum() - 1) < 1e-5
    # the copies and any cell whose nearest neighbours are copies, all tied at one distance, miss the target
    _, dist, _ = nearest_neighbors(X, 10, method="exact")
    assert adata.uns["affinity"]["n_unconverged"] == int(((dist == dist[:, :1]).sum(1) >= 5).sum()) >= 12
    # a copy's conditional row is uniform over its 10 neighbours, all copies: the copies' block holds 12/N
    P_cond, beta, _ = calibrate_perplexity(dist, 5.0)
    np.testing.assert_array_equal(P_cond[:12], 0.1)
    assert np.isinf(beta[:12]).all()
    assert abs(P[:12, :12].sum() - 12 / 60) < 1e-6


@pytest.mark.parametrize("scale", [1e-200, 1e-40, 1e40, 1e200])
def test_extreme_distance_scales(scale: float) -> None:
    """Distances whose squares (or the squares of those, in the Newton slope) leave float64's range."""
    rng = np.random.default_rng(3)
    d = np.sort(rng.uniform(1, 2, size=(5, 30)), axis=1)
    P_ref, beta_ref, _ = calibrate_perplexity(d, 10.0)
    P_cond, beta, n_bad = calibrate_perplexity(d * scale, 10.0)
    assert n_bad == 0
    np.testing.assert_allclose(P_cond, P_ref, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(conditional_entropy(P_cond), np.log(10.0), atol=1e-5)
    if 1e-150 < scale < 1e150:  # β itself in float64's range
        np.testing.assert_allclose(beta * scale**2, beta_ref, rtol=1e-6)
    P_sq, _, n_bad = calibrate_perplexity((d * np.sqrt(scale)) ** 2, 10.0, squared=True)
    assert n_bad == 0
    np.testing.assert_allclose(P_sq, P_ref, rtol=1e-6, atol=1e-12)


def test_n_unconverged_is_honest() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 6)).astype(np.float32)
    _, dist, _ = nearest_neighbors(X, 30, method="exact")
    target = np.log(10.0)
    P_cond, _, n_bad = calibrate_perplexity(dist, 10.0)
    assert n_bad == 0
    assert (np.abs(conditional_entropy(P_cond) - target) <= 1e-5).all()
    for max_iter in (0, 1, 2):
        P_cond, _, n_bad = calibrate_perplexity(dist, 10.0, max_iter=max_iter)
        missed = int((np.abs(conditional_entropy(P_cond) - target) > 1e-5).sum())
        assert n_bad == missed > 0
        np.testing.assert_allclose(P_cond.sum(1), 1, atol=1e-12)


@pytest.mark.parametrize("perplexity", [0.5, 0.0, -2.0, float("nan")])
def test_perplexity_below_one_is_refused(perplexity: float) -> None:
    d = np.sort(np.random.default_rng(0).uniform(1, 2, size=(4, 10)), axis=1)
    with pytest.raises(ValueError, match=r"`perplexity` must be at least 1"):
        calibrate_perplexity(d, perplexity)


def test_perplexity_one_is_the_nearest_neighbour() -> None:
    d = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    P_cond, beta, n_bad = calibrate_perplexity(d, 1.0)
    np.testing.assert_array_equal(P_cond[0], [1, 0, 0])
    np.testing.assert_array_equal(P_cond[1], [0.5, 0.5, 0])  # two tied nearest: entropy log 2, reported
    assert np.isinf(beta).all() and n_bad == 1


def test_perplexity_above_the_neighbour_count_is_refused(small: AnnData) -> None:
    d = np.sort(np.random.default_rng(0).uniform(1, 2, size=(4, 10)), axis=1)
    d[2, 6:] = np.inf  # padding: cell 2 has only 6 neighbours
    with pytest.raises(ValueError, match=r"`perplexity=7` is larger than the number of neighbours of cell 2 \(6\)"):
        calibrate_perplexity(d, 7)
    P_cond, _, n_bad = calibrate_perplexity(d, 6)  # as many as its neighbours: the uniform limit, β → 0
    assert abs(conditional_entropy(P_cond[2:3])[0] - np.log(6)) < 1e-5
    assert n_bad == 0
    with pytest.raises(ValueError, match="NaN or negative"):
        calibrate_perplexity(np.where(d == d[0, 0], np.nan, d), 3)
    with pytest.raises(ValueError, match="perplexity"):
        se.pp.affinity(small, perplexity=0.5)


def test_drop_self_wherever_it_stands() -> None:
    from scembed._engine.knn import _drop_self

    idx = np.array([[0, 1, 2, 3], [0, 2, 1, 3], [5, 4, 1, 0]])  # self first, self third, self missing
    dist = np.array([[0, 1, 2, 3], [0, 0, 0, 1], [1, 2, 3, 4]], dtype=np.float32)
    kept, kept_d = _drop_self(idx, dist, 3)
    np.testing.assert_array_equal(kept, [[1, 2, 3], [0, 2, 3], [5, 4, 1]])
    np.testing.assert_array_equal(kept_d, [[1, 2, 3], [0, 0, 1], [1, 2, 3]])


@pytest.mark.parametrize("method", ["exact", "annoy", "faiss"])
def test_knn_with_duplicated_cells(method: str) -> None:
    rng = np.random.default_rng(4)
    X = rng.normal(size=(300, 5)).astype(np.float32)
    X[:30] = X[0]
    X[100:103] = X[100]
    idx, dist, _ = nearest_neighbors(X, 10, method=method)
    assert (idx != np.arange(300)[:, None]).all()
    assert all(len(set(row)) == 10 for row in idx)
    np.testing.assert_allclose(dist, np.linalg.norm(X[:, None] - X[idx], axis=-1), atol=1e-5)
    assert (dist[:30] == 0).all() and (idx[:30] < 30).all()
    assert set(idx[100, :2]) == {101, 102} and (dist[100, :2] == 0).all()


def test_graph_with_stored_zero_distances() -> None:
    # row 0: a stored self-loop (dropped) and a duplicate stored at distance 0 (kept); row 1 likewise
    graph = sparse.csr_matrix(
        (np.array([0.0, 0.0, 2.0, 0.0, 3.0, 2.0, 1.0]), np.array([0, 1, 2, 0, 2, 0, 1]), np.array([0, 3, 5, 7])),
        shape=(3, 3),
    )
    indices, distances = padded_neighbors_from_graph(graph)
    np.testing.assert_array_equal(indices, [[1, 2], [0, 2], [0, 1]])
    np.testing.assert_array_equal(distances, [[0, 2], [0, 3], [2, 1]])


def test_scanpy_graph_of_duplicated_cells() -> None:
    """scanpy stores duplicates at distance 0 (and, when a duplicate comes first, the cell itself): the zero
    edges are neighbours and must survive, the self-loop must not."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 5)).astype(np.float32)
    X[:5] = X[0]
    adata = AnnData(obsm={"X_pca": X})
    sc.pp.neighbors(adata, n_neighbors=10, use_rep="X_pca")
    indices, distances = padded_neighbors_from_graph(adata.obsp["distances"])
    assert (indices != np.arange(100)[:, None]).all()
    D = adata.obsp["distances"]
    for i in range(5):
        stored = {j for j in D[i].indices if j != i}
        assert set(indices[i][indices[i] >= 0]) == stored and len(stored) >= 8
        assert (distances[i][np.isin(indices[i], range(5))] == 0).all()
    se.pp.affinity(adata, perplexity=2, neighbors_key="neighbors")
    P = adata.obsp["affinity"]
    assert abs(P.sum() - 1) < 1e-5 and np.isfinite(P.data).all()
    assert P[0, 1] > 0 and P[0, 0] == 0
