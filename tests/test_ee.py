"""tl.ee and its engine: objective/gradient against dense float64 references, optimiser invariants, API."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from scipy import sparse

import scembed as se
from scembed._engine.ee import SpectralDirection, optimize_ee, rescale, spectral_init
from scembed._engine.ee_objective import EEObjective, exp_neg_


def _random_problem(n: int = 120, D: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, D))
    P = sparse.random(n, n, density=0.08, random_state=seed, format="csr")
    P = P + P.T
    return X, (P / P.sum()).tocsr()


def _dense_reference(Y: np.ndarray, P, X: np.ndarray, lam: float, repulsion: str):
    """E and ∇E by autograd on dense float64 matrices (independent of the tiled code)."""
    Yt = torch.tensor(Y, dtype=torch.float64, requires_grad=True)
    n = Y.shape[0]
    D2 = ((Yt[:, None] - Yt[None]) ** 2).sum(-1)
    if repulsion == "uniform":
        Wn = (1 - torch.eye(n, dtype=torch.float64)) / (n * (n - 1))
    else:
        Xt = torch.tensor(X, dtype=torch.float64)
        Wn = ((Xt[:, None] - Xt[None]) ** 2).sum(-1)
        Wn = Wn / Wn.sum()
    E = (torch.tensor(P.toarray(), dtype=torch.float64) * D2).sum() + lam * (Wn * torch.exp(-D2)).sum()
    E.backward()
    return float(E.detach()), Yt.grad.numpy()


@pytest.fixture(scope="module")
def emb() -> ad.AnnData:
    a = se.datasets.simulate_embedding(n_cells=200, n_dims=10, n_celltypes=4, random_state=1)
    se.pp.affinity(a, perplexity=10.0)
    return a


FAST = {"maxiter": 25, "repulsion": "uniform"}


@pytest.mark.parametrize("repulsion", ["uniform", "distance"])
@pytest.mark.parametrize(("d", "scale"), [(2, 1e-3), (2, 3.0), (2, 8.0), (3, 0.5), (5, 1.0)])
def test_objective_and_gradient_match_dense_float64(repulsion, d, scale):
    X, P = _random_problem()
    Y = np.random.default_rng(1).normal(size=(X.shape[0], d)) * scale
    Y = Y.astype(np.float32).astype(np.float64)  # the objective sees float32 coordinates
    obj = EEObjective(P, lam=1.7, repulsion=repulsion, X=X)
    E, G = obj(torch.tensor(Y, dtype=torch.float32))
    E_ref, G_ref = _dense_reference(Y, P, X, 1.7, repulsion)
    assert float(E) == pytest.approx(E_ref, rel=1e-6)
    assert np.linalg.norm(G.double().numpy() - G_ref) <= 1e-5 * np.linalg.norm(G_ref)


def test_attraction_resolves_small_changes_of_a_large_shifted_embedding():
    """The trace form 2 tr(Yᵀ L⁺ Y) must not lose the local distances to cancellation (offset 1e4, spread 1e2)."""
    X, P = _random_problem()
    rng = np.random.default_rng(2)
    Y = (rng.normal(size=(X.shape[0], 2)) * 100 + 1e4).astype(np.float32)
    step = (rng.normal(size=Y.shape) * 0.01).astype(np.float32)
    obj = EEObjective(P, repulsion="uniform")
    Pc = P.tocoo()

    def edges(Z):  # Σ W⁺ ‖y_n − y_m‖² over the stored pairs, float64
        Z = Z.astype(np.float64)
        return float((Pc.data * ((Z[Pc.row] - Z[Pc.col]) ** 2).sum(1)).sum())

    e0, e1 = float(obj.attractive(torch.from_numpy(Y))[0]), float(obj.attractive(torch.from_numpy(Y + step))[0])
    assert e0 == pytest.approx(edges(Y), rel=1e-10)
    assert e1 - e0 == pytest.approx(edges(Y + step) - edges(Y), rel=1e-6)


def test_exp_neg_never_returns_subnormals():
    # far pairs (d² past ~87) would give float32 subnormals, which the CPU computes 20-50x slower
    d2 = torch.tensor([0.0, 1.0, 59.0, 88.0, 200.0, 1e30, float("inf")])
    out = exp_neg_(d2.clone())
    assert torch.all(out >= torch.finfo(torch.float32).tiny)
    torch.testing.assert_close(out[:3], torch.exp(-d2[:3]))
    assert torch.all(out[3:] <= 1e-26)


def test_objective_tiles_agree_with_one_tile(monkeypatch):
    X, P = _random_problem(n=200)
    Y = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    obj = EEObjective(P, repulsion="distance", X=X)
    E1, G1 = obj(Y)
    monkeypatch.setattr(obj, "_block_size", lambda: 7)
    E2, G2 = obj(Y)
    assert float(E1) == pytest.approx(float(E2), rel=1e-9)
    torch.testing.assert_close(G1, G2, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("solver", ["splu", "cg"])
def test_spectral_direction_solves_the_system(solver):
    _, P = _random_problem(n=150)
    sd = SpectralDirection(P, solver=solver)
    g = torch.randn(150, 2, generator=torch.Generator().manual_seed(3))
    g = g - g.mean(0)  # gradients of EE sum to zero over cells
    p = sd(g).double().numpy()
    L = sparse.csgraph.laplacian(P.astype(np.float64))
    B = 4 * L + sd.mu * sparse.identity(150)
    residual = np.linalg.norm(B @ p + g.double().numpy()) / np.linalg.norm(g.double().numpy())
    assert residual < (1e-6 if solver == "splu" else 2e-3)  # p is returned in float32
    assert float((g.double().numpy() * p).sum()) < 0  # a descent direction


def test_spectral_init_matches_dense_eigenvectors():
    _, P = _random_problem(n=400, seed=2)
    Y = spectral_init(P, 2)
    W = P.toarray().astype(np.float64)
    deg = W.sum(1)
    _, vecs = np.linalg.eigh(W / np.sqrt(np.outer(deg, deg)))
    ref = vecs[:, ::-1][:, 1:3] / np.sqrt(deg)[:, None]
    for j in range(2):
        c = abs(np.corrcoef(Y[:, j], ref[:, j])[0, 1])
        assert c > 0.999


def test_recorded_objective_never_increases_and_converges(emb):
    se.tl.ee(emb, maxiter=25)
    obj = np.asarray(emb.uns["ee"]["objective"])
    assert len(obj) == emb.uns["ee"]["n_iter"] + 1
    assert np.all(np.diff(obj) <= 0)
    assert obj[-1] < 0.5 * obj[0]
    # the recorded final objective is the objective of the stored embedding
    check = EEObjective(emb.obsp["affinity"], repulsion="distance", X=emb.obsm["X_pca"])
    assert check.value(torch.as_tensor(emb.obsm["X_ee"])) == pytest.approx(obj[-1], rel=1e-5)


def test_spectral_direction_beats_gradient_descent(emb):
    P, X = emb.obsp["affinity"], emb.obsm["X_pca"]
    obj = EEObjective(P, repulsion="uniform", X=X)
    Y0 = torch.as_tensor(rescale(spectral_init(P, 2), 1e-2), dtype=torch.float32)
    _, sd = optimize_ee(obj, Y0, P=P, direction="spectral", maxiter=20, tol=0)
    _, gd = optimize_ee(obj, Y0, direction="gradient", maxiter=20, tol=0)
    assert sd["objective"][-1] < gd["objective"][-1]
    assert np.all(np.diff(gd["objective"]) <= 0)


def test_line_search_falls_back_to_the_gradient():
    """A direction that is descent by its slope but whose descent is buried under a stiff orthogonal component (like
    the near-null modes of 4L⁺ moving whole clusters) fails the line search; the optimiser then takes a gradient
    step instead of stopping. Quadratic E = (y₁² + 1e20·y₂²)/2 from (1, 0), direction (−1e-12, 1)."""
    curvature = torch.tensor([1.0, 1e20], dtype=torch.float64)

    def objective(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 0.5 * (curvature * Y * Y).sum(), curvature * Y

    def stiff(G: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[-1e-12, 1.0]], dtype=torch.float64)

    _, info = optimize_ee(objective, torch.tensor([[1.0, 0.0]], dtype=torch.float64), direction=stiff, maxiter=1, tol=0)
    assert info["n_gradient_fallbacks"] == 1
    assert info["objective"][-1] < 0.5 * info["objective"][0]
    # a gradient run has nothing to fall back to
    _, plain = optimize_ee(objective, torch.tensor([[1.0, 0.0]]).double(), direction="gradient", maxiter=1, tol=0)
    assert plain["n_gradient_fallbacks"] == 0


def test_line_search_stops_when_the_decrease_is_below_float32_resolution():
    """A float32 objective flat to rounding (E = 1 + 1e-10‖Y‖², which rounds to 1) is converged: the line search must
    give up after a few evaluations instead of backtracking ~40 times per direction (each ~20 s at 60k cells)."""

    def flat(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 1.0 + 1e-10 * (Y * Y).sum(), 2e-10 * Y

    def newton(G: torch.Tensor) -> torch.Tensor:
        return -G / 2e-10

    Y0 = torch.ones((50, 2), dtype=torch.float32)
    for direction in ("gradient", newton):
        Y, info = optimize_ee(flat, Y0, direction=direction, maxiter=20, tol=0)
        assert info["stop_reason"].startswith("line search failed")
        assert info["n_iter"] == 0 and info["n_evaluations"] <= 4
        torch.testing.assert_close(Y, Y0)
    # in float64 the same decrease is resolvable, and the Newton direction reaches the minimum in one step
    Y, info64 = optimize_ee(flat, Y0.double(), direction=newton, maxiter=20, tol=0)
    assert info64["n_iter"] >= 1 and info64["objective"][1] == pytest.approx(1.0, abs=1e-15)


def test_splu_and_cg_reach_the_same_objective(emb):
    P = emb.obsp["affinity"]
    obj = EEObjective(P, repulsion="uniform")
    Y0 = torch.as_tensor(rescale(spectral_init(P, 2)), dtype=torch.float32)
    _, a = optimize_ee(obj, Y0, P=P, solver="splu", maxiter=100)
    _, b = optimize_ee(obj, Y0, P=P, solver="cg", maxiter=100)
    assert b["solver"] == "cg" and len(b["cg_iterations"]) >= b["n_iter"]
    assert a["objective"][-1] == pytest.approx(b["objective"][-1], rel=1e-3)


def test_embedding_separates_cell_types(emb):
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    se.tl.ee(emb, **FAST)
    labels = emb.obs["celltype"].to_numpy()
    acc = cross_val_score(KNeighborsClassifier(10), emb.obsm["X_ee"], labels, cv=3).mean()
    rand = cross_val_score(KNeighborsClassifier(10), np.random.default_rng(0).normal(size=(200, 2)), labels, cv=3)
    assert acc > 0.9 > rand.mean()


def test_random_init_is_optimised():
    # a random start of scale 1e-4 makes E ≈ 1 − O(1e-8): the line search must resolve decreases far below
    # float32 eps · E (the repulsion's constant Σ W⁻ = 1 is added exactly), or the run stops before its first step
    # (it did: n_iter 0 on this connected, count-derived graph)
    import scanpy as sc
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    a = se.datasets.simulate(n_cells=1000, n_genes=300, n_celltypes=5, random_state=0)
    sc.pp.normalize_total(a)
    sc.pp.log1p(a)
    sc.pp.pca(a, n_comps=20)
    se.pp.affinity(a, perplexity=30.0)
    se.tl.ee(a, init="random", **FAST)
    info = a.uns["ee"]
    assert info["n_iter"] == FAST["maxiter"] and info["objective"][-1] < 0.5 * info["objective"][0]
    labels = a.obs["celltype"].to_numpy()
    assert cross_val_score(KNeighborsClassifier(10), a.obsm["X_ee"], labels, cv=3).mean() > 0.9


def test_rounding_scale_of_a_tiny_embedding():
    X, P = _random_problem()
    obj = EEObjective(P, repulsion="distance", X=X)
    tiny = torch.as_tensor(np.random.default_rng(0).normal(size=(X.shape[0], 2)) * 1e-4, dtype=torch.float32)
    E, _ = obj(tiny)
    assert float(E) == pytest.approx(1.0, abs=1e-6) and 0 < obj.rounding_scale < 1e-6  # the O(d²) terms only
    E, _ = obj(tiny * 1e5)
    assert obj.rounding_scale == pytest.approx(float(E), rel=1e-6)  # spread out: every term is rounded


def test_same_seed_same_embedding_and_inits(emb):
    a = se.tl.ee(emb, init="random", random_state=3, copy=True, maxiter=10, repulsion="uniform")
    b = se.tl.ee(emb, init="random", random_state=3, copy=True, maxiter=10, repulsion="uniform")
    c = se.tl.ee(emb, init="random", random_state=4, copy=True, maxiter=2, repulsion="uniform")
    np.testing.assert_array_equal(a.obsm["X_ee"], b.obsm["X_ee"])
    assert not np.allclose(a.obsm["X_ee"][:, 0], c.obsm["X_ee"][:, 0])
    for init in ["pca", "spectral", emb.obsm["X_pca"][:, :2] * 1e-3]:
        out = se.tl.ee(emb, init=init, copy=True, maxiter=3, repulsion="uniform")
        assert out.obsm["X_ee"].shape == (200, 2) and np.isfinite(out.obsm["X_ee"]).all()
    emb.obsm["start"] = emb.obsm["X_pca"][:, :3] * 1e-3
    out = se.tl.ee(emb, n_components=3, init="start", copy=True, maxiter=3, repulsion="uniform")
    assert out.obsm["X_ee"].shape == (200, 3)
    assert out.uns["ee"]["params"]["init"] == "obsm['start']"
    del emb.obsm["start"]


def test_computes_affinity_when_missing_and_copy(emb):
    a = ad.AnnData(emb.X.copy(), obs=emb.obs.copy())
    a.obsm["X_pca"] = emb.obsm["X_pca"].copy()
    out = se.tl.ee(a, perplexity=10.0, copy=True, **FAST)
    assert "affinity" not in a.obsp and "X_ee" not in a.obsm and "ee" not in a.uns  # copy leaves the input alone
    assert "affinity" in out.obsp and "X_ee" in out.obsm
    assert out.uns["affinity"]["params"]["perplexity"] == 10.0
    # the same affinities as pp.affinity computes
    np.testing.assert_allclose(out.obsp["affinity"].toarray(), emb.obsp["affinity"].toarray(), rtol=1e-4, atol=1e-9)
    assert se.tl.ee(a, perplexity=10.0, maxiter=2) is None
    assert "affinity" in a.obsp and "X_ee" in a.obsm


def test_sparse_and_dense_input_agree():
    a = se.datasets.simulate(n_cells=120, n_genes=30, n_celltypes=3, random_state=0)  # < 50 genes: X is used
    b = a.copy()
    b.X = b.X.toarray()
    se.tl.ee(a, perplexity=10.0, maxiter=10)  # "distance" repulsion: uses X itself
    se.tl.ee(b, perplexity=10.0, maxiter=10)
    np.testing.assert_allclose(a.obsm["X_ee"], b.obsm["X_ee"], rtol=1e-4, atol=1e-4)


def test_h5ad_round_trip_and_key_added(emb, tmp_path):
    out = se.tl.ee(emb, key_added="ee2", repulsion="uniform", solver="cg", copy=True, maxiter=5)
    assert "X_ee2" in out.obsm and "ee2" in out.uns
    np.testing.assert_array_equal(out.uns["ee2"]["history"]["objective"], out.uns["ee2"]["objective"])
    path = tmp_path / "ee.h5ad"
    out.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.obsm["X_ee2"], out.obsm["X_ee2"])
    np.testing.assert_allclose(back.uns["ee2"]["objective"], out.uns["ee2"]["objective"])
    assert back.uns["ee2"]["params"]["repulsion"] == "uniform"
    assert back.uns["ee2"]["solver"] == "cg"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lam": -1.0}, ValueError, "lam"),
        ({"lam": float("nan")}, TypeError, "lam"),
        ({"n_components": 0}, ValueError, "n_components"),
        ({"n_components": 1.5}, TypeError, "n_components"),
        ({"maxiter": 0}, ValueError, "maxiter"),
        ({"tol": -1}, ValueError, "tol"),
        ({"repulsion": "cauchy"}, ValueError, "repulsion"),
        ({"solver": "qr"}, ValueError, "solver"),
        ({"init": "umap"}, KeyError, "init"),
        ({"init": np.zeros((5, 2))}, ValueError, "init"),
        ({"init": 3}, TypeError, "init"),
        ({"key_added": ""}, TypeError, "key_added"),
        ({"key_added": "X_ee"}, ValueError, "without the 'X_' prefix"),
        ({"device": "tpu"}, ValueError, "device"),
        ({"n_components": 200}, ValueError, "n_components=200.*init='spectral'"),
    ],
)
def test_bad_parameters_raise_before_work(emb, kwargs, error, match):
    before = (set(emb.obsm), set(emb.uns), set(emb.obsp))
    with pytest.raises(error, match=match):
        se.tl.ee(emb, **kwargs)
    assert (set(emb.obsm), set(emb.uns), set(emb.obsp)) == before


def test_missing_affinity_and_representation_raise_and_leave_adata_unchanged():
    a = se.datasets.simulate_embedding(n_cells=50, n_dims=5, random_state=0)
    del a.obsm["X_pca"]
    snapshot = a.copy()
    with pytest.raises(KeyError, match="use_rep"):
        se.tl.ee(a, affinity_key="nope", use_rep="X_missing", perplexity=5.0)
    a.X[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        se.tl.ee(a, perplexity=5.0)
    with pytest.raises(ValueError, match="perplexity"):
        se.tl.ee(snapshot.copy(), perplexity=80.0)
    assert set(a.obsm) == set(snapshot.obsm) and set(a.obsp) == set(snapshot.obsp) and set(a.uns) == set(snapshot.uns)


def test_nan_init_and_bad_affinities_raise(emb):
    bad = emb.obsm["X_pca"][:, :2].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        se.tl.ee(emb, init=bad)
    a = emb.copy()
    a.obsp["affinity"] = -a.obsp["affinity"]
    with pytest.raises(ValueError, match="negative"):
        se.tl.ee(a)
    assert "X_ee" not in a.obsm or np.array_equal(a.obsm["X_ee"], emb.obsm.get("X_ee", a.obsm["X_ee"]))


@pytest.mark.gpu
def test_ee_on_cuda_matches_cpu(emb):
    cpu = se.tl.ee(emb, device="cpu", repulsion="uniform", copy=True, maxiter=30)
    gpu = se.tl.ee(emb, device="cuda", repulsion="uniform", copy=True, maxiter=30)
    assert gpu.uns["ee"]["params"]["device"].startswith("cuda")
    assert gpu.uns["ee"]["objective"][-1] == pytest.approx(cpu.uns["ee"]["objective"][-1], rel=1e-2)
    again = se.tl.ee(emb, device="cuda", repulsion="uniform", copy=True, maxiter=30)
    np.testing.assert_array_equal(gpu.obsm["X_ee"], again.obsm["X_ee"])


@pytest.mark.gpu
def test_cg_solver_on_cuda(emb):
    out = se.tl.ee(emb, device="cuda", solver="cg", copy=True, maxiter=20)
    assert out.uns["ee"]["solver"] == "cg" and np.all(np.diff(out.uns["ee"]["objective"]) <= 0)


def test_spectral_init_never_returns_fewer_columns():
    small = se.datasets.simulate_embedding(n_cells=12, n_dims=4, random_state=0)
    with pytest.raises(ValueError, match=r"n_components=12.*at most n_obs - 1 = 11"):
        se.tl.ee(small, n_components=12, perplexity=3.0)
    assert "X_ee" not in small.obsm
    out = se.tl.ee(small, n_components=11, perplexity=3.0, maxiter=3, copy=True)  # n - 1: every eigenvector
    assert out.obsm["X_ee"].shape == (12, 11)
    out = se.tl.ee(small, n_components=12, init="random", perplexity=3.0, maxiter=3, copy=True)
    assert out.obsm["X_ee"].shape == (12, 12)
    with pytest.raises(ValueError, match="at most n - 1"):
        spectral_init(out.obsp["affinity"], 12)


def test_computed_affinities_are_pp_affinity(emb):
    a = emb.copy()
    del a.obsp["affinity"], a.uns["affinity"]
    se.tl.ee(a, perplexity=10.0, maxiter=2, show_progress=False)
    b = se.pp.affinity(a, perplexity=10.0, copy=True)
    assert (a.obsp["affinity"] != b.obsp["affinity"]).nnz == 0


def test_show_progress(emb, capfd):
    se.tl.ee(emb, maxiter=2, copy=True, show_progress=True)
    assert "EE" in capfd.readouterr().err
    se.tl.ee(emb, maxiter=2, copy=True, show_progress=False)
    assert capfd.readouterr().err == ""


def test_initial_embedding_dispatch_in_the_engine() -> None:
    """The engine's one init dispatch: each name equals its builder, rescaled; bad names and inputs are refused."""
    from scembed._engine.ee import initial_embedding, pca_init, random_init, rescale, spectral_init

    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 5))
    P = sparse.random(60, 60, density=0.2, random_state=0, format="csr")
    P = P + P.T
    np.testing.assert_allclose(initial_embedding("spectral", 2, P=P, random_state=3), rescale(spectral_init(P, 2, 3)))
    np.testing.assert_allclose(initial_embedding("pca", 2, X=X), rescale(pca_init(X, 2)))
    np.testing.assert_allclose(initial_embedding("random", 2, X=X, random_state=1), rescale(random_init(60, 2, 1)))
    with pytest.raises(ValueError, match="init"):
        initial_embedding("umap", 2, P=P)
    with pytest.raises(ValueError, match="needs the affinities"):
        initial_embedding("spectral", 2, X=X)
