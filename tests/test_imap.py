"""Tests of se.tl.imap_integrate and its engine (iMAP)."""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import torch
from scipy import sparse
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

import scembed as se
from scembed._engine import imap as engine
from scembed._engine.nn import mlp

FAST = dict(
    use_hvg=False,
    max_epochs=4,
    batch_size=(32, 64),
    n_latent=16,
    n_sample=200,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _dense(m):
    """A layer as a dense array (sparse input may give a sparse or a dense corrected layer)."""
    return m.toarray() if sparse.issparse(m) else np.asarray(m)


def _data(n_cells=240, n_genes=60, n_batches=2, batch_scale=0.5, seed=0):
    a = se.datasets.simulate(
        n_cells, n_genes, n_batches=n_batches, n_celltypes=3, batch_scale=batch_scale, de_scale=1.5, random_state=seed
    )
    sc.pp.normalize_total(a)
    sc.pp.log1p(a)
    return a


@pytest.fixture(scope="module")
def run():
    torch.set_num_threads(1)
    a = _data()
    b, model = se.tl.imap_integrate(a, copy=True, return_model=True, **FAST)
    return a, b, model


def _lisi(Z, labels, k=30):
    idx = NearestNeighbors(n_neighbors=k).fit(Z).kneighbors(return_distance=False)
    lab = np.asarray(labels)[idx]
    p = np.stack([(lab == c).mean(1) for c in np.unique(labels)], 1)
    return float(np.mean(1 / (p**2).sum(1)))


# ---------------------------------------------------------------- engine pieces against independent references
def test_trained_networks_keep_no_gradients(run):
    # the last step's gradients are as large as the networks: freed before the corrected layer is allocated
    model = run[2]
    networks = [model.encoder, model.decoder, *model.generators.values()]
    assert len(networks) == 3
    assert all(p.grad is None for net in networks for p in net.parameters())


def test_stage1_losses_decrease(run):
    hist = run[1].uns["imap"]["stage1"]
    assert len(hist["loss"]) == FAST["max_epochs"]
    declared = run[1].uns["imap"]["history"]
    np.testing.assert_array_equal(declared["stage1_loss"], hist["loss"])
    assert declared["stage2_critic"].shape[1] == FAST["max_epochs"]
    assert hist["loss"][-1] < hist["loss"][0]
    assert hist["recon"][-1] < hist["recon"][0]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_mnn_pairs_match_brute_force(metric):
    rng = np.random.default_rng(0)
    A, Q = rng.normal(size=(80, 5)), rng.normal(size=(70, 5)) + 0.3
    k = 6
    pa, pq = engine.mutual_pairs(A, Q, k, method="exact", metric=metric)
    if metric == "cosine":
        An, Qn = A / np.linalg.norm(A, axis=1, keepdims=True), Q / np.linalg.norm(Q, axis=1, keepdims=True)
        D = 1 - An @ Qn.T
    else:
        D = np.linalg.norm(A[:, None] - Q[None], axis=2)
    a_to_q = np.argsort(D, axis=1)[:, :k]
    q_to_a = np.argsort(D, axis=0)[:k].T
    ref = {(a, q) for a in range(80) for q in a_to_q[a] if a in q_to_a[q]}
    assert set(zip(pa.tolist(), pq.tolist(), strict=True)) == ref
    assert len(ref) > 0


def test_mutual_knn_graph_brute_force():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 4))
    indptr, indices = engine.mutual_knn_graph(X, 5, method="exact", metric="euclidean")
    D = np.linalg.norm(X[:, None] - X[None], axis=2)
    np.fill_diagonal(D, np.inf)
    knn = np.argsort(D, axis=1)[:, :5]
    for i in range(50):
        ref = {j for j in knn[i] if i in knn[j]} | {i}
        assert set(indices[indptr[i] : indptr[i + 1]].tolist()) == ref


def test_random_walk_stays_on_graph():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 3))
    ga = engine.mutual_knn_graph(X, 4, method="exact", metric="euclidean")
    pa, pq = np.arange(5), np.arange(5, 10)
    va, vq = engine.random_walk_pairs(pa, pq, ga, ga, 7, torch.Generator().manual_seed(0))
    assert va.shape == vq.shape == (35,)
    np.testing.assert_array_equal(va[:5], pa)
    edges = {(i, j) for i in range(40) for j in ga[1][ga[0][i] : ga[0][i + 1]]}
    for v in (va, vq):
        steps = v.reshape(7, 5)
        assert all((int(a), int(b)) in edges for a, b in zip(steps[:-1].ravel(), steps[1:].ravel(), strict=True))


@pytest.mark.parametrize("n_batches", [2, 3])
def test_stage1_losses_equal_the_full_translation(n_batches):
    """Decoding only the cells sent to another batch gives the losses and gradients of decoding every cell."""
    torch.manual_seed(0)
    encoder = mlp((20, 16, 8), activation=torch.nn.Mish).double()
    decoder = engine.BatchDecoder(8, n_batches, 20).double()
    x = torch.rand(24, 20, dtype=torch.float64)
    batch = torch.arange(n_batches).repeat_interleave(24 // n_batches)
    other = torch.randint(n_batches, (24,))
    assert (other == batch).any() and (other != batch).any()
    params = [*encoder.parameters(), *decoder.parameters()]

    recon, content = engine.stage1_losses(encoder, decoder, x, batch, other)
    grads = torch.autograd.grad(recon + 3 * content, params)

    code = encoder(x)  # the original's formula: translate every cell
    ref_recon = torch.nn.functional.mse_loss(decoder(code, batch), x)
    ref_content = torch.nn.functional.mse_loss(code, encoder(decoder(code, other)))
    ref_grads = torch.autograd.grad(ref_recon + 3 * ref_content, params)
    assert recon.item() == pytest.approx(ref_recon.item(), rel=1e-12)
    assert content.item() == pytest.approx(ref_content.item(), rel=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_critic_losses_hand_computed():
    torch.manual_seed(0)
    real, fake = torch.randn(6, 4), torch.randn(6, 4)
    eps = torch.rand(6, 1)
    # a critic without activations is the linear map x ↦ w₂ᵀ(W₁x + b₁) + b₂: its gradient is W₁ᵀw₂ everywhere, so the
    # penalty is (‖W₁ᵀw₂‖ − 1)² and the Wasserstein estimate is w₂ᵀW₁(mean real − mean fake)
    critic = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    W1, w2 = critic[0].weight.detach(), critic[1].weight.detach().ravel()
    w_dist, gp = engine.critic_losses(critic, real, fake, eps)
    assert gp.item() == pytest.approx(float((W1.T @ w2).norm() - 1) ** 2, rel=1e-5)
    assert w_dist.item() == pytest.approx(float(w2 @ W1 @ (real.mean(0) - fake.mean(0))), rel=1e-5)


@pytest.mark.parametrize("n", [9, 400])
def test_critic_losses_equal_the_direct_formula(n):
    # the shared first layer and either way of taking the norm (rows g W₁ for few cells, the Gram matrix for many)
    # give the same losses and parameter gradients as evaluating the critic on real, fake and the detached
    # interpolate x̂ and differentiating at x̂ (float64)
    torch.manual_seed(1)
    critic = engine.make_critic(7).double()
    assert engine._gram_is_cheaper(n, critic[0].weight.shape[0]) == (n == 400)
    real, fake = torch.randn(n, 7, dtype=torch.float64), torch.randn(n, 7, dtype=torch.float64)
    eps = torch.rand(n, 1, dtype=torch.float64)
    params = list(critic.parameters())
    w_dist, gp = engine.critic_losses(critic, real, fake, eps)
    grads = torch.autograd.grad(-w_dist + 10 * gp, params)

    ref_w = critic(real).mean() - critic(fake).mean()
    mixed = (eps * real + (1 - eps) * fake).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    ref_gp = ((g.norm(2, dim=1) - 1) ** 2).mean()
    ref_grads = torch.autograd.grad(-ref_w + 10 * ref_gp, params)
    assert w_dist.item() == pytest.approx(ref_w.item(), rel=1e-12)
    assert gp.item() == pytest.approx(ref_gp.item(), rel=1e-10)
    for got, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


def test_generator_from_projected_pool_equals_direct():
    # critic steps gather the generator's first layer from the projected pool; in training mode (BatchNorm on the
    # batch's own statistics) this is the generator applied to the batch, and training gives the same networks
    torch.manual_seed(2)
    pool = torch.rand(12, 9, dtype=torch.float64)
    gen = engine.ResidualGenerator(9, latent_dim=4).double().train()
    rows = torch.randint(12, (16,))
    torch.testing.assert_close(gen.from_first(pool[rows], gen.first(pool)[rows]), gen(pool[rows]), rtol=1e-12, atol=0)

    anchors, weights = torch.rand(10, 9), torch.rand(12, dtype=torch.float64) + 0.1
    results = []
    for project in (True, False):
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        gen, hist = engine.train_generator(
            pool.float(), anchors, weights, torch.ones(10, dtype=torch.float64), n_epochs=3, steps_per_epoch=4,
            batch_size=16, n_critic=3, latent_dim=4, generator=g, show_progress=False, project_pool=project,
        )  # fmt: skip
        results.append((gen.eval()(pool.float()), hist))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    for key in results[0][1]:
        np.testing.assert_allclose(results[0][1][key], results[1][1][key], rtol=1e-4, atol=1e-6)


def _shifted_types(n=400, d=60, seed=0):
    """Anchor and query cells of 4 types; the query carries a constant shift on half of the genes."""
    rng = np.random.default_rng(seed)
    centers = rng.gamma(2, 0.5, size=(4, d))
    types = rng.integers(0, 4, size=2 * n)
    X = np.clip(centers[types] + rng.normal(0, 0.3, size=(2 * n, d)), 0, None).astype(np.float32)
    X[n:, : d // 2] += 0.8
    return torch.from_numpy(X[:n]), torch.from_numpy(X[n:]), types[n:]


@pytest.mark.parametrize("size", [0.0, 0.9])
def test_batch_shift_estimate(size):
    # shift² ≈ d_MNN² − d_within²: cells of 5 types with their own variation; the query's expression moved by a
    # known vector. Pairs and graphs are built as stage II does, on ideal codes (the shift removed).
    rng = np.random.default_rng(0)
    n, d = 600, 100
    centers = rng.gamma(2, 1.0, size=(5, d))
    shift = np.zeros(d, dtype=np.float32)
    shift[:20] = size
    A = (centers[rng.integers(0, 5, n)] + rng.normal(0, 0.5, (n, d))).astype(np.float32)
    Q = (centers[rng.integers(0, 5, n)] + shift + rng.normal(0, 0.5, (n, d))).astype(np.float32)
    kw = {"method": "exact", "metric": "euclidean"}
    pairs = engine.mutual_pairs(A, Q - shift, 10, **kw)
    graphs = engine.mutual_knn_graph(A, 20, **kw), engine.mutual_knn_graph(Q, 20, **kw)
    est = engine.batch_shift(
        lambda i: torch.from_numpy(A[i]), lambda i: torch.from_numpy(Q[i]), pairs, *graphs, torch.Generator()
    )
    truth = float(np.linalg.norm(shift))
    assert est["pair_distance"] > est["within_distance"] * (1.1 if size else 0.9)
    if size:
        assert est["shift"] == pytest.approx(truth, rel=0.15)
    else:
        assert est["shift"] < 0.3 * est["within_distance"]


def test_transport_cost_moves_cells_least():
    # The adversarial loss is met by any map onto the anchor; the transport cost ‖G(x) − x‖² / (2 reach) picks the
    # one that moves cells least: a displacement shared by the cells of a type (the batch effect here), not one
    # that scatters them. A vanishing reach pins G to the identity.
    anchor, query, types = _shifted_types()
    weights = torch.ones(len(query), dtype=torch.float64)
    pair_distance = float(torch.cdist(query, anchor).min(1).values.median())
    gap0 = float(torch.linalg.vector_norm(query.mean(0) - anchor.mean(0)))
    out = {}
    for reach in (None, pair_distance, 1e-3):
        gen, _ = engine.train_generator(
            query, anchor, weights, weights, n_epochs=30, batch_size=64, n_critic=5,
            generator=torch.Generator().manual_seed(0), show_progress=False, reach=reach,
        )  # fmt: skip
        with torch.no_grad():
            disp = (gen(query) - query).numpy()
        per_type = [disp[types == t] - disp[types == t].mean(0) for t in range(4)]
        scatter = np.mean([np.linalg.norm(d, axis=1).mean() for d in per_type])
        gap = float(np.linalg.norm(query.numpy().mean(0) + disp.mean(0) - anchor.numpy().mean(0)))
        out[reach] = scatter, gap, float(np.linalg.norm(disp, axis=1).mean())
    (s_free, g_free, _), (s_cost, g_cost, _), (_, g_pinned, moved_pinned) = out.values()
    assert s_cost < 0.6 * s_free  # the cells of a type move together
    assert g_cost < min(g_free, 0.3 * gap0)  # and the batch shift is still removed
    assert moved_pinned < 0.1 * gap0 and g_pinned > 0.9 * gap0


def test_row_source_sparse_equals_dense():
    rng = np.random.default_rng(3)
    X = sparse.random(30, 12, density=0.3, format="csr", random_state=3, dtype=np.float32)
    rows = rng.integers(30, size=50)
    np.testing.assert_array_equal(engine.RowSource(X)(rows).numpy(), X.toarray()[rows])
    np.testing.assert_array_equal(engine.RowSource(X.toarray())(rows).numpy(), X.toarray()[rows])


# ---------------------------------------------------------------- the public function
def test_outputs_in_input_order(run):
    a, b, model = run
    X = a.X.toarray()
    assert b.obsm["X_imap"].shape == (a.n_obs, FAST["n_latent"])
    assert b.obsm["X_imap"].dtype == np.float32
    np.testing.assert_allclose(model.encode(a.X), b.obsm["X_imap"], rtol=1e-5, atol=1e-5)
    L = _dense(b.layers["imap"])
    anchor = b.uns["imap"]["anchor"]
    is_anchor = (a.obs["batch"].astype(str) == anchor).to_numpy()
    np.testing.assert_array_equal(L[is_anchor], X[is_anchor])  # anchor cells unchanged, in place
    query = b.uns["imap"]["order"][1]
    is_q = (a.obs["batch"].astype(str) == query).to_numpy()
    np.testing.assert_allclose(model.correct(a.X[is_q], query), L[is_q], rtol=1e-5, atol=1e-5)
    assert not np.allclose(L[is_q], X[is_q])
    assert (L >= 0).all()
    assert list(b.obs_names) == list(a.obs_names)
    assert b.var["imap_used"].all()


def test_caller_unchanged_and_copy_false(run):
    a = run[0]
    assert "imap" not in a.layers and "X_imap" not in a.obsm and "imap_used" not in a.var
    c = _data()
    X0, var0, obs0 = c.X.copy(), c.var.copy(), c.obs_names.copy()
    assert se.tl.imap_integrate(c, **{**FAST, "max_epochs": 1}) is None
    assert (c.X != X0).nnz == 0
    assert list(c.obs_names) == list(obs0)
    assert c.var.drop(columns="imap_used").equals(var0)
    assert "imap" in c.layers and "X_imap" in c.obsm


def test_sparse_and_dense_same_result():
    a = _data(n_cells=120, n_genes=40)
    d = a.copy()
    d.X = d.X.toarray()
    kw = {**FAST, "max_epochs": 2}
    rs = se.tl.imap_integrate(a, copy=True, **kw)
    rd = se.tl.imap_integrate(d, copy=True, **kw)
    np.testing.assert_array_equal(rs.obsm["X_imap"], rd.obsm["X_imap"])
    assert isinstance(rd.layers["imap"], np.ndarray)
    np.testing.assert_array_equal(_dense(rs.layers["imap"]), rd.layers["imap"])
    # sparse input: CSR unless more than half of the entries are non-zero (all 120 rows decide here)
    mostly_nonzero = 2 * np.count_nonzero(rd.layers["imap"]) > rd.layers["imap"].size
    assert sparse.issparse(rs.layers["imap"]) != mostly_nonzero
    # same seed → same result
    rs2 = se.tl.imap_integrate(a, copy=True, **kw)
    np.testing.assert_array_equal(_dense(rs.layers["imap"]), _dense(rs2.layers["imap"]))


def test_integer_labels_hvg_order_incremental_and_h5ad(tmp_path):
    a = _data(n_cells=180, n_genes=80, n_batches=3, seed=4)
    a.obs["b"] = a.obs["batch"].cat.codes.astype(int)  # integer labels
    a.var["keep"] = 1
    var0 = a.var.copy()
    kw = {**FAST, "use_hvg": True, "n_top_genes": 30, "max_epochs": 1}
    b = se.tl.imap_integrate(a, "b", order=[2, 0, 1], incremental=True, copy=True, **kw)
    assert b.uns["imap"]["order"] == ["2", "0", "1"]
    assert b.var["imap_used"].sum() == 30
    assert a.var.equals(var0) and "highly_variable" not in a.var
    X = a.X.toarray()
    L = _dense(b.layers["imap"])
    unused = ~b.var["imap_used"].to_numpy()
    np.testing.assert_array_equal(L[:, unused], X[:, unused])  # genes not integrated keep their input values
    assert b.uns["imap"]["stage2"]["critic"].shape == (2, 1)
    path = tmp_path / "imap.h5ad"
    b.write_h5ad(path)
    r = ad.read_h5ad(path)
    assert list(r.uns["imap"]["order"]) == ["2", "0", "1"]
    np.testing.assert_array_equal(r.obsm["X_imap"], b.obsm["X_imap"])


def test_small_batch_warns_and_works(caplog):
    a = _data(n_cells=150, n_genes=40)
    small = np.flatnonzero(a.obs["batch"] == "batch1")[:6]
    keep = np.r_[np.flatnonzero(a.obs["batch"] == "batch0"), small]
    a = a[keep].copy()
    b = se.tl.imap_integrate(a, copy=True, **{**FAST, "max_epochs": 1})
    assert b.uns["imap"]["params"]["k_within"] == 5
    assert any("lowered" in r.getMessage() for r in caplog.records)


def test_errors_before_any_work():
    a = _data(n_cells=60, n_genes=20)
    a.obs["one"] = "x"
    before = a.copy()
    with pytest.raises(ValueError, match="single batch"):
        se.tl.imap_integrate(a, "one")
    with pytest.raises(KeyError, match="batch_key='nope'"):
        se.tl.imap_integrate(a, "nope")
    with pytest.raises(KeyError, match="layer"):
        se.tl.imap_integrate(a, layer="nope")
    with pytest.raises(ValueError, match="order"):
        se.tl.imap_integrate(a, order=["batch0", "zzz"])
    with pytest.raises(ValueError, match="metric"):
        se.tl.imap_integrate(a, metric="manhattan")
    with pytest.raises(ValueError, match=r"`max_epochs` \(stage I stage\) must be ≥ 0"):
        se.tl.imap_integrate(a, max_epochs=(-1, 3))
    with pytest.raises(TypeError, match=r"`batch_size` must be an int or a pair \(stage I, stage II\)"):
        se.tl.imap_integrate(a, batch_size=(32, 64, 128))
    with pytest.raises(ValueError, match=r"`batch_size` \(stage II stage\) must be ≥ 2"):
        se.tl.imap_integrate(a, batch_size=(32, 1))
    with pytest.raises(ValueError, match="without the 'X_' prefix"):
        se.tl.imap_integrate(a, key_added="X_imap")
    for old, new in [
        ("stage1_epochs", "max_epochs[0]"),
        ("stage2_epochs", "max_epochs[1]"),
        ("stage1_batch_size", "batch_size[0]"),
        ("stage2_batch_size", "batch_size[1]"),
        ("latent_dim", "n_latent"),
    ]:
        with pytest.raises(TypeError, match=re.escape(f"`{old}` was renamed `{new}`")):
            se.tl.imap_integrate(a, **{old: 3})
    a.obs.loc[a.obs_names[0], "one"] = np.nan
    with pytest.raises(ValueError, match="missing"):
        se.tl.imap_integrate(a, "one")
    assert a.layers.keys() == before.layers.keys() and a.obsm.keys() == before.obsm.keys()
    assert a.var.equals(before.var)


def test_batch_mixing_rises_and_celltypes_kept():
    a = _data(n_cells=400, n_genes=60, batch_scale=0.6, seed=5)
    b = se.tl.imap_integrate(a, copy=True, **{**FAST, "max_epochs": (8, 15), "n_critic": 2, "batch_size": (32, 128)})
    pcs0 = PCA(10, random_state=0).fit_transform(a.X.toarray())
    pcs1 = PCA(10, random_state=0).fit_transform(_dense(b.layers["imap"]))
    ilisi0, ilisi1 = _lisi(pcs0, a.obs["batch"]), _lisi(pcs1, a.obs["batch"])
    clisi0, clisi1 = _lisi(pcs0, a.obs["celltype"]), _lisi(pcs1, a.obs["celltype"])
    assert ilisi1 > ilisi0 + 0.02  # weak: few GAN steps in a test
    assert clisi1 < clisi0 + 0.15


@pytest.mark.gpu
def test_gpu_runs_and_is_seeded():
    a = _data()
    r1 = se.tl.imap_integrate(a, copy=True, device="cuda", **FAST)
    r2 = se.tl.imap_integrate(a, copy=True, device="cuda", **FAST)
    assert r1.uns["imap"]["params"]["device"].startswith("cuda")
    np.testing.assert_array_equal(r1.obsm["X_imap"], r2.obsm["X_imap"])


def test_no_stage_two_writes_no_corrected_layer(capfd):
    a = _data(n_cells=120, n_genes=30)
    kw = {**FAST, "max_epochs": (2, 0)}
    b, model = se.tl.imap_integrate(a, copy=True, return_model=True, show_progress=True, **kw)
    err = capfd.readouterr().err
    assert "iMAP stage I" in err and "stage II" not in err
    assert "X_imap" in b.obsm and "imap" not in b.layers and "imap_used" not in b.var
    assert b.uns["imap"]["params"]["max_epochs"] == [2, 0] and model.generators == {}
    assert b.uns["imap"]["stage2"]["critic"].shape[1] == 0
    se.tl.imap_integrate(a, copy=True, show_progress=False, **{**FAST, "max_epochs": 1})
    assert "iMAP" not in capfd.readouterr().err


def test_same_seed_same_result_with_two_threads(two_torch_threads):
    """Bit-identical with several threads: no gradient is accumulated by parallel atomic adds (whose order varies)."""
    a = se.datasets.simulate(n_cells=1200, n_genes=300, n_celltypes=4, n_batches=2, random_state=0)
    sc.pp.normalize_total(a)
    sc.pp.log1p(a)
    kw = dict(batch_key="batch", max_epochs=(1, 1), batch_size=(128, 256), random_state=0, copy=True)
    first, second = se.tl.imap_integrate(a, **kw), se.tl.imap_integrate(a, **kw)
    np.testing.assert_array_equal(first.obsm["X_imap"], second.obsm["X_imap"])
    layers = [x.layers["imap"] for x in (first, second)]
    np.testing.assert_array_equal(*(_dense(m) for m in layers))


@pytest.mark.parametrize(("n_obs", "n_vars", "n_genes"), [(300, 40, 40), (300, 60, 25), (1, 4, 2), (0, 5, 3)])
@pytest.mark.parametrize("offset", [-0.5, 1.0])
def test_output_is_assembled_block_by_block(monkeypatch, n_obs, n_vars, n_genes, offset):
    # the corrected columns of the integrated genes and the input's other columns, in the input's gene order, equal
    # to assembling it densely, whatever the block size (here a few rows per block). Sparse input gives CSR while at
    # most half of the entries are non-zero (offset -0.5: ~31 % of the corrected values), else a dense array
    # (offset 1: ~84 %), which is then the smaller; the sample rows that decide are asked for before the blocks
    from scembed.tl import _imap

    rng = np.random.default_rng(n_obs + n_vars)
    X = sparse.random(n_obs, n_vars, density=0.3, format="csr", dtype=np.float32, random_state=1)
    genes = np.sort(rng.choice(n_vars, n_genes, replace=False))
    corrected = np.maximum(rng.normal(size=(n_obs, n_genes)) + offset, 0).astype(np.float32)
    monkeypatch.setattr(_imap, "ASSEMBLE_BLOCK", 3 * n_vars + 1)
    asked = []

    def correct(rows):
        asked.append(rows)
        return corrected[rows]

    out = _imap._assemble(X, correct, genes)
    expected = X.toarray()
    expected[:, genes] = corrected
    blocks = asked[1:] if n_obs else asked  # the first call: the rows that decide the format
    if n_obs:
        np.testing.assert_array_equal(asked[0], np.arange(n_obs))  # fewer rows than FORMAT_SAMPLE: all of them
    assert np.array_equal(np.concatenate(blocks) if blocks else np.zeros(0, int), np.arange(n_obs))
    assert all(len(r) <= max(1, _imap.ASSEMBLE_BLOCK // n_vars) for r in blocks)
    assert sparse.issparse(out) == (2 * np.count_nonzero(expected) <= expected.size)
    assert out.dtype == np.float32
    if sparse.issparse(out):
        assert out.format == "csr" and out.has_sorted_indices and out.nnz == np.count_nonzero(expected)
    np.testing.assert_array_equal(_dense(out), expected)
    # dense input: a dense output with the same values
    dense = _imap._assemble(X.toarray(), lambda rows: corrected[rows], genes)
    assert isinstance(dense, np.ndarray)
    np.testing.assert_array_equal(dense, expected)


def test_output_format_is_decided_on_rows_spread_over_the_data(monkeypatch):
    # rows sorted by batch: the first rows (an anchor batch left as it is) are sparse, the rest dense; the sample
    # spread evenly over all rows sees both, so a mostly non-zero result is stored dense
    from scembed.tl import _imap

    monkeypatch.setattr(_imap, "FORMAT_SAMPLE", 10)
    X = sparse.csr_matrix(np.eye(100, 8, dtype=np.float32))
    genes = np.arange(8)
    corrected = np.where(np.arange(100)[:, None] < 20, np.eye(100, 8), 1.0).astype(np.float32)
    asked = []

    def correct(rows):
        asked.append(rows)
        return corrected[rows]

    out = _imap._assemble(X, correct, genes)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, corrected)
    np.testing.assert_array_equal(asked[0], np.linspace(0, 99, 10).astype(int))
