"""Tests of tl.scdeepcluster and its engine: ZINB loss, DEC target/KL, clustering, batches, errors, model I/O."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from anndata import AnnData, read_h5ad
from scipy import sparse, stats
from sklearn.metrics import adjusted_rand_score

import scembed as se
from scembed._engine import counts
from scembed._engine import scdeepcluster as eng

FAST = dict(max_epochs=(25, 40), batch_size=128)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # the CI machine has 2 cores shared with other jobs: one torch thread avoids OpenMP spinning on tiny batches
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sim() -> AnnData:
    return se.datasets.simulate(400, 200, n_celltypes=4, de_fraction=0.2, de_scale=2.0, random_state=3)


@pytest.fixture(scope="module")
def fitted(sim):
    adata = sim.copy()
    model = se.tl.scdeepcluster(adata, n_clusters=4, random_state=0, return_model=True, **FAST)
    return adata, model


# ---------------------------------------------------------------------------------------------------- ZINB loss
def _random_zinb(seed: int = 0, n: int = 40, g: int = 30):
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n, g, generator=gen, dtype=torch.float64) * 4)
    x[0, :5] = torch.tensor([0.0, 1.0, 50.0, 300.0, 2.0], dtype=torch.float64)
    logits = torch.randn(n, 3 * g, generator=gen, dtype=torch.float64) * 2
    logits[1, :3] = torch.tensor([-30.0, 20.0, 0.5])  # mean below/above the clamps
    logits[2, g : g + 2] = torch.tensor([-15.0, 1e4 + 5])  # dispersion below/above the clamps
    sf = torch.rand(n, generator=gen, dtype=torch.float64) + 0.3
    return x, logits, sf


def _scipy_zinb(x, mean, disp, pi):
    nb = stats.nbinom.pmf(x, disp, disp / (disp + mean))
    return -np.log(np.where(x == 0, pi + (1 - pi) * nb, (1 - pi) * nb))


def test_zinb_nll_matches_scipy():
    x, logits, sf = _random_zinb()
    mean, disp, pi = eng.zinb_heads(logits, x.shape[1])
    ref = _scipy_zinb(x.numpy(), (mean * sf[:, None]).numpy(), disp.numpy(), pi.numpy())
    np.testing.assert_allclose(eng.zinb_nll(x, mean, disp, pi, sf).numpy(), ref, rtol=1e-8, atol=1e-10)
    fused = eng.zinb_nll_logits(logits, x, sf).item()
    np.testing.assert_allclose(fused, ref.mean(), rtol=1e-10)
    # float32 agrees too
    fused32 = eng.zinb_nll_logits(logits.float(), x.float(), sf.float()).item()
    np.testing.assert_allclose(fused32, ref.mean(), rtol=1e-4)


def test_zinb_fused_gradient_matches_autograd():
    x, logits, sf = _random_zinb(1)
    lg = logits.clone().requires_grad_()
    eng.zinb_nll_logits(lg, x, sf).mul(3.0).backward()
    fused = lg.grad.clone()
    lg.grad = None
    mean, disp, pi = eng.zinb_heads(lg, x.shape[1])
    eng.zinb_nll(x, mean, disp, pi, sf).mean().mul(3.0).backward()
    np.testing.assert_allclose(fused.numpy(), lg.grad.numpy(), rtol=1e-7, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda t: eng.zinb_nll_logits(t, x[:5, :4], sf[:5]), logits[:5, :12].clone().requires_grad_()
    )


def test_zinb_given_nonzero_equals_searched_and_clamp_paths_agree():
    # the loss takes the non-zeros' flat indices from a sparse batch instead of searching; and on a CPU it skips
    # the clamp masks when no logit is near a clamp: both shortcuts must give the plain computation's numbers
    x, logits, sf = _random_zinb(2, n=30, g=25)
    flat = x.view(-1).nonzero().squeeze(1)
    for lg in (logits, logits.clamp(-8.0, 8.0)):  # with clamped entries, and with none near a clamp
        out = []
        for nonzero in (None, flat, flat[torch.randperm(len(flat))]):
            t = lg.clone().requires_grad_()
            loss = eng.zinb_nll_logits(t, x, sf, nonzero)
            loss.backward()
            out.append((loss.item(), t.grad))
        ref = lg.clone().requires_grad_()
        ref_loss = eng.zinb_nll(x, *eng.zinb_heads(ref, x.shape[1]), sf).mean()
        ref_loss.backward()
        for loss, grad in out:
            np.testing.assert_allclose(loss, ref_loss.item(), rtol=1e-12)
            np.testing.assert_allclose(grad.numpy(), ref.grad.numpy(), rtol=1e-7, atol=1e-14)


@pytest.mark.parametrize("dense_share", [1.0, 0.0])
def test_sparse_minibatch_equals_dense(monkeypatch, dense_share):
    # sparse counts: only the non-zeros are transformed and sent, their flat indices from the CSR structure (or,
    # past DENSE_SHARE non-zeros, the rows densified first: dense_share 0 always, 1 never); the result must
    # equal the dense path, with explicit zeros dropped and a gene subset applied
    monkeypatch.setattr(counts, "DENSE_SHARE", dense_share)
    gen = np.random.default_rng(0)
    dense = gen.poisson(0.3, size=(60, 40)).astype(np.float32)
    dense[:, [0, 3]] += 1.0  # every cell has counts in the gene subset below (as the callers require)
    X = sparse.csr_matrix(dense)
    X.data[np.flatnonzero(X.indices > 3)[:7]] = 0.0  # stored zeros
    # and a duplicate entry (non-canonical CSR: the two add up), in row 0
    X = sparse.csr_matrix(
        (np.r_[X.data[:1], X.data], np.r_[X.indices[:1], X.indices], np.r_[0, X.indptr[1:] + 1]), shape=X.shape
    )
    assert not X.has_canonical_format
    dense = X.toarray()
    genes = np.array([0, 3, 4, 9, 12, 13, 20, 39])
    rows = np.array([5, 0, 59, 17, 17, 33])
    assert dense[0, X.indices[0]] == 2 * X.data[0] > 0
    for g in (np.arange(40), genes):
        sp_data = eng.CountData.fit(X, g)
        de_data = eng.CountData.fit(dense, g)
        np.testing.assert_allclose(sp_data.size_factors, de_data.size_factors, rtol=1e-6)
        sp, de = sp_data.batch(rows, torch.device("cpu")), de_data.batch(rows, torch.device("cpu"))
        assert de.nonzero is None
        np.testing.assert_array_equal(sp.counts.numpy(), dense[rows][:, g])
        np.testing.assert_allclose(sp.xin.numpy(), de.xin.numpy(), rtol=1e-6, atol=1e-6)
        expected = np.flatnonzero(dense[rows][:, g])
        np.testing.assert_array_equal(np.sort(sp.nonzero.numpy()), expected)
        assert sp.counts.dtype == sp.xin.dtype == torch.float32


def test_dense_ish_minibatch_same_bits_either_way(monkeypatch):
    # a sparse mini-batch with many non-zeros is densified before its transform (cheaper per entry than the
    # per-non-zero gathers): the two ways must give the same encoder input, counts and non-zeros to the bit,
    # so that training does not depend on the data's density; also with statistics per batch, unnormalised
    # values, a gene subset, explicit zeros and without counts (encoding)
    gen = np.random.default_rng(1)
    dense = gen.poisson(0.6, size=(90, 50)).astype(np.float32)
    dense[:, [1, 4]] += 1.0  # every cell has counts in the gene subset below (as the callers require)
    X = sparse.csr_matrix(dense)
    X.data[::11] = 0.0  # stored zeros
    codes = np.repeat([0, 1, 2], 30)
    rows = gen.permutation(90)[:40]
    density = X[rows].count_nonzero() / (40 * 50)
    assert counts.DENSE_SHARE < density < 1.0
    cases = [
        {},
        {"batch_codes": codes, "n_batches": 3, "standardize_per_batch": True, "scale": "gene"},
        {"normalize": False, "scale": "floor"},
    ]
    for kwargs, matrix in [(kw, X) for kw in cases] + [({}, X.astype(np.int64))]:  # integer counts too
        for genes in (np.arange(50), np.array([1, 4, 5, 17, 30, 49])):
            data = eng.CountData.fit(matrix, genes, **kwargs)
            for with_counts in (True, False):
                out = {}
                for share in (0.0, 1.0):
                    monkeypatch.setattr(counts, "DENSE_SHARE", share)
                    out[share] = data.batch(rows, torch.device("cpu"), counts=with_counts)
                dense_way, sparse_way = out[0.0], out[1.0]
                assert torch.equal(dense_way.xin, sparse_way.xin)
                assert torch.equal(dense_way.nonzero, sparse_way.nonzero)
                if with_counts:
                    assert torch.equal(dense_way.counts, sparse_way.counts)
                else:
                    assert dense_way.counts is None and sparse_way.counts is None


def test_zinb_float32_keeps_precision_for_near_poisson_genes():
    # θ up to the 1e4 clamp with small means, as for genes without overdispersion: the float32 loss and its
    # dispersion gradient must stay close to float64 there (a difference of two float32 logarithms would not)
    gen = torch.Generator().manual_seed(3)
    n, g = 256, 200
    a = torch.randn(n, g, generator=gen, dtype=torch.float64) * 1.5 - 1
    theta = 10 ** (torch.rand(n, g, generator=gen, dtype=torch.float64) * 4)
    b = theta + torch.log(-torch.expm1(-theta))  # softplus⁻¹
    c = torch.randn(n, g, generator=gen, dtype=torch.float64) - 2
    x = torch.poisson(torch.exp(a), generator=gen)
    sf = torch.ones(n, dtype=torch.float64)
    logits = torch.cat([a, b, c], 1)

    def loss_and_grad(lg, x, sf):
        lg = lg.clone().requires_grad_()
        loss = eng.zinb_nll_logits(lg, x, sf)
        loss.backward()
        return loss.item(), lg.grad.double()

    loss64, g64 = loss_and_grad(logits, x, sf)
    loss32, g32 = loss_and_grad(logits.float(), x.float(), sf.float())
    np.testing.assert_allclose(loss32, loss64, rtol=1e-6)
    for head in range(3):
        cols = slice(head * g, (head + 1) * g)
        for where in (theta > 1e3, theta <= 1e3):
            ref, got = g64[:, cols][where], g32[:, cols][where]
            assert float((got - ref).norm() / ref.norm()) < 1e-4, (head, where.float().mean())


# ---------------------------------------------------------------------------------------------------- DEC parts
def test_soft_assign_target_and_kl_by_hand():
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    mu = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    q = eng.soft_assign(z, mu).numpy()
    d2 = np.array([[0.0, 25.0], [1.0, 20.0], [25.0, 0.0]])
    q_ref = 1 / (1 + d2)
    q_ref /= q_ref.sum(1, keepdims=True)
    np.testing.assert_allclose(q, q_ref, rtol=1e-12)
    p_ref = q_ref**2 / q_ref.sum(0)
    p_ref /= p_ref.sum(1, keepdims=True)
    p = eng.target_distribution(torch.from_numpy(q_ref)).numpy()
    np.testing.assert_allclose(p, p_ref, rtol=1e-12)
    kl_ref = np.mean(np.sum(p_ref * np.log(p_ref / (q_ref + 1e-6)), 1))
    kl = eng.kl_divergence(torch.from_numpy(p_ref), torch.from_numpy(q_ref)).item()
    np.testing.assert_allclose(kl, kl_ref, rtol=1e-12)


def test_assignments_in_chunks_equal_full(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    z, mu = torch.randn(50, 3, generator=gen), torch.randn(4, 3, generator=gen)
    q_full = eng.soft_assign(z, mu)
    p_full = eng.target_distribution(q_full)
    monkeypatch.setattr(eng, "INFER_BATCH", 7)
    q, p = eng.assignments(z, mu)
    torch.testing.assert_close(q, q_full)
    torch.testing.assert_close(p, p_full)


def test_fuzzy_connectivities_calibrated_and_symmetric():
    X = np.random.default_rng(0).normal(size=(120, 5)).astype(np.float32)
    idx, dist, _ = se._engine.knn.nearest_neighbors(X, 9, method="exact")
    W = eng.fuzzy_connectivities(idx, dist, 10)
    dense = W.toarray()
    np.testing.assert_allclose(dense, dense.T, atol=1e-12)
    assert dense.max() <= 1 + 1e-12 and dense.min() >= 0 and np.diag(dense).max() == 0
    # directed memberships: exp(−(d − ρ)/σ) sums to log2(k) per cell (UMAP's smooth kNN calibration); the fuzzy
    # union a + b − ab is at least the directed weight
    rho = dist[:, :1]
    directed = np.exp(-(dist - rho) / _sigma_bisect(dist - rho, np.log2(10))[:, None])
    np.testing.assert_allclose(directed.sum(1), np.log2(10), rtol=1e-4)
    assert (dense[np.arange(120)[:, None], idx] >= directed - 1e-5).all()  # float32, as scanpy's graph


def _sigma_bisect(d: np.ndarray, target: float) -> np.ndarray:
    out = np.empty(len(d))
    for i, row in enumerate(d):
        lo, hi = 1e-8, 1e3
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if np.exp(-row / mid).sum() > target else (mid, hi)
        out[i] = mid
    return out


def test_gene_selection_criterion():
    adata = se.datasets.simulate(300, 150, dropout=0.3, random_state=0)
    X = adata.X
    sel = eng.select_genes_by_zero_rate(X, 40)
    assert 25 <= len(sel) <= 55
    dense = X.toarray()
    sel_dense = eng.select_genes_by_zero_rate(dense, 40)
    np.testing.assert_array_equal(sel, sel_dense)


# ---------------------------------------------------------------------------------------------------- public API
def test_clusters_simulated_types(fitted, sim):
    adata, _ = fitted
    assert adjusted_rand_score(sim.obs["celltype"], adata.obs["scdeepcluster"]) > 0.9
    u = adata.uns["scdeepcluster"]
    assert u["n_clusters"] == 4 and u["n_clusters_method"] == "given"
    assert adata.obs["scdeepcluster"].dtype == "category"
    assert adata.obsm["X_scdeepcluster"].shape == (400, 32) and adata.obsm["X_scdeepcluster"].dtype == np.float32
    proba = adata.obsm["scdeepcluster_proba"]
    assert proba.shape == (400, 4)
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-5)
    np.testing.assert_array_equal(proba.argmax(1).astype(str), adata.obs["scdeepcluster"].astype(str))
    curves = {"pretrain_zinb", "pretrain_validation_zinb", "cluster_loss", "cluster_zinb", "cluster_kl"}
    assert set(u["history"]) == curves  # with the default held-out cells, their loss too
    assert len(u["history"]["pretrain_validation_zinb"]) == u["n_epochs_pretrain"]
    assert len(u["history"]["cluster_loss"]) == u["n_epochs_cluster"] and len(u["delta_label"]) >= 1
    assert u["params"]["max_epochs"] == [25, 40] and u["params"]["n_latent"] == 32
    assert len(u["history"]["pretrain_zinb"]) == 25
    assert u["history"]["pretrain_zinb"][-1] < u["history"]["pretrain_zinb"][0]
    assert 1 <= u["n_epochs_cluster"] <= 40
    assert sim.X.nnz == adata.X.nnz and "scdeepcluster" not in sim.obs  # the simulated input was copied


def test_h5ad_round_trip(fitted, tmp_path):
    adata, _ = fitted
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = read_h5ad(tmp_path / "a.h5ad")
    assert back.uns["scdeepcluster"]["n_clusters"] == 4
    np.testing.assert_array_equal(back.obs["scdeepcluster"], adata.obs["scdeepcluster"])


def test_model_predict_save_load(fitted, tmp_path):
    adata, model = fitted
    labels, proba, latent = model.predict(adata)
    np.testing.assert_array_equal(labels.astype(str), adata.obs["scdeepcluster"].astype(str))
    np.testing.assert_allclose(latent, adata.obsm["X_scdeepcluster"], rtol=1e-5, atol=1e-5)
    # new cells, one at a time agree with all at once
    lab1, _, _ = model.predict(adata[:7].copy())
    np.testing.assert_array_equal(lab1, labels[:7])
    model.save(tmp_path / "m.pt")
    loaded = se.tl.ScDeepClusterModel.load(tmp_path / "m.pt")
    lab2, proba2, _ = loaded.predict(adata)
    np.testing.assert_array_equal(lab2, labels)
    np.testing.assert_allclose(proba2, proba, rtol=1e-6)
    wrong = adata[:, ::-1].copy()
    with pytest.raises(ValueError, match="features"):
        model.predict(wrong)


def test_dense_sparse_and_copy(sim):
    small = sim[:200].copy()
    dense = small.copy()
    dense.X = dense.X.toarray()
    kw = dict(n_clusters=3, max_epochs=5, random_state=1)
    out_sparse = se.tl.scdeepcluster(small, copy=True, **kw)
    out_dense = se.tl.scdeepcluster(dense, copy=True, **kw)
    assert "scdeepcluster" not in small.obs and "scdeepcluster" not in dense.obs
    np.testing.assert_allclose(
        out_sparse.obsm["X_scdeepcluster"], out_dense.obsm["X_scdeepcluster"], rtol=1e-3, atol=1e-3
    )
    assert adjusted_rand_score(out_sparse.obs["scdeepcluster"], out_dense.obs["scdeepcluster"]) > 0.95


def test_same_seed_same_labels_and_no_global_side_effects(sim):
    small = sim[:200].copy()
    kw = dict(n_clusters=0, max_epochs=5, n_neighbors=10)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    dtype = torch.get_default_dtype()
    a = se.tl.scdeepcluster(small, copy=True, random_state=7, **kw)
    torch.testing.assert_close(torch.rand(3), expected)  # the global RNG was not advanced
    assert torch.get_default_dtype() == dtype
    b = se.tl.scdeepcluster(small, copy=True, random_state=7, **kw)
    np.testing.assert_array_equal(a.obs["scdeepcluster"], b.obs["scdeepcluster"])
    np.testing.assert_array_equal(a.obsm["X_scdeepcluster"], b.obsm["X_scdeepcluster"])
    assert a.uns["scdeepcluster"]["n_clusters_method"] == "leiden"
    assert a.uns["scdeepcluster"]["n_clusters"] >= 2


def test_same_seed_same_result_with_two_threads(two_torch_threads):
    """Bit-identical with several threads, batch one-hot and clustering stage included (no gradient accumulated by
    parallel atomic adds, whose order varies)."""
    adata = se.datasets.simulate(n_cells=1200, n_genes=300, n_celltypes=4, n_batches=2, random_state=0)
    kw = dict(n_clusters=4, batch_key="batch", max_epochs=(3, 6), batch_size=256, random_state=0, copy=True)
    first, second = se.tl.scdeepcluster(adata, **kw), se.tl.scdeepcluster(adata, **kw)
    np.testing.assert_array_equal(first.obsm["X_scdeepcluster"], second.obsm["X_scdeepcluster"])
    np.testing.assert_array_equal(first.obs["scdeepcluster"], second.obs["scdeepcluster"])


def test_scale_sets_the_encoder_input_and_the_model_reuses_it(sim):
    # scale="gene" z-scores every gene (the original's input); "global" divides every centred gene by one number,
    # the root mean gene variance of the log-normalised counts (ddof 1); "floor" by the larger of the two; the
    # model applies the same to new cells
    small = sim[:150].copy()
    x = small.X.toarray().astype(np.float64)
    lib = x.sum(1, keepdims=True)
    log = np.log1p(x * np.median(lib) / lib)
    std = log.std(0, ddof=1)
    typical = np.sqrt((std**2).mean())  # the root mean gene variance
    for scale, expected in (("gene", std), ("global", np.full_like(std, typical)), ("floor", np.maximum(std, typical))):
        a = small.copy()
        model = se.tl.scdeepcluster(a, 3, scale=scale, max_epochs=(3, 2), return_model=True, show_progress=False)
        assert a.uns["scdeepcluster"]["params"]["scale"] == scale
        np.testing.assert_allclose(model.gene_std, expected, rtol=1e-5)
        np.testing.assert_allclose(model.gene_mean, log.mean(0), rtol=1e-5, atol=1e-6)
        _, _, latent = model.predict(a)
        np.testing.assert_allclose(latent, a.obsm["X_scdeepcluster"], rtol=1e-5, atol=1e-5)


def test_layer_and_n_top_genes(sim):
    adata = sim[:200].copy()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sparse.csr_matrix(np.log1p(adata.X.toarray()))  # not counts: must read the layer
    se.tl.scdeepcluster(adata, 3, layer="counts", n_top_genes=60, max_epochs=3, key_added="sdc")
    u = adata.uns["sdc"]
    assert 30 <= u["n_genes_used"] <= 90
    assert u["params"]["layer"] == "counts" and "X_sdc" in adata.obsm and "sdc_proba" in adata.obsm


def test_batch_aware(tmp_path):
    adata = se.datasets.simulate(300, 150, n_celltypes=3, n_batches=2, batch_scale=0.8, de_scale=2.0, random_state=5)
    model = se.tl.scdeepcluster(adata, 3, batch_key="batch", max_epochs=10, random_state=0, return_model=True)
    assert model.net.encoder[0].in_features == 150  # the batch one-hot enters the decoder only
    assert model.net.decoder[0].in_features == 32 + 2
    assert model.batch_categories == ["batch0", "batch1"]
    history = adata.uns["scdeepcluster"]["history"]  # the batch penalty ran in both stages, one value per epoch
    assert len(history["pretrain_batch_mmd"]) == 10
    assert len(history["cluster_batch_mmd"]) == adata.uns["scdeepcluster"]["n_epochs_cluster"]
    assert model.gene_mean.shape == model.gene_std.shape == (2, 150)  # the input is standardised per batch
    _, _, z = model.predict(adata)
    np.testing.assert_allclose(z, adata.obsm["X_scdeepcluster"], rtol=1e-5, atol=1e-5)
    flipped = adata.copy()
    flipped.obs["batch"] = flipped.obs["batch"].map({"batch0": "batch1", "batch1": "batch0"})
    _, _, z_flipped = model.predict(flipped)
    assert np.abs(z - z_flipped).max() > 1e-3  # a cell is standardised with its own batch's statistics
    model.save(tmp_path / "m.pt")
    loaded = se.tl.ScDeepClusterModel.load(tmp_path / "m.pt")
    assert not loaded.net.batch_encoder and loaded.gene_mean.shape == (2, 150)
    np.testing.assert_array_equal(loaded.predict(adata)[2], z)
    unknown = adata.copy()
    unknown.obs["batch"] = "batch9"
    with pytest.raises(ValueError, match="not trained on"):
        model.predict(unknown)


def _neighbour_shares(z: np.ndarray, batch: np.ndarray, types: np.ndarray, k: int) -> tuple[float, float, float]:
    """Other-batch share among each cell's k nearest (mean), its expectation under full mixing, k-NN type accuracy."""
    from sklearn.neighbors import NearestNeighbors

    idx = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z, return_distance=False)[:, 1:]
    other = float((batch[idx] != batch[:, None]).mean())
    # under full mixing a cell's neighbours are drawn from the other cells of its type, whatever their batch
    expected = np.mean([(batch[types == t] != b).sum() / max((types == t).sum() - 1, 1) for b, t in zip(batch, types)])
    votes = np.array([np.bincount(row, minlength=types.max() + 1).argmax() for row in types[idx]])
    return other, float(expected), float((votes == types).mean())


def test_batch_aware_latent_mixes_batches_within_types():
    # two batches with a strong per-gene batch effect: without a correction the latent (and the clusters) split
    # every type by batch; with batch_key the batches mix within a type, the types stay apart and the automatic
    # number of clusters is the number of types
    adata = se.datasets.simulate(
        400, 150, n_celltypes=3, n_batches=2, batch_scale=1.0, de_fraction=0.2, de_scale=2.0, random_state=5
    )
    se.tl.scdeepcluster(adata, 0, batch_key="batch", random_state=0, **FAST)
    batch = adata.obs["batch"].cat.codes.to_numpy()
    types = adata.obs["celltype"].cat.codes.to_numpy()
    other, expected, accuracy = _neighbour_shares(adata.obsm["X_scdeepcluster"], batch, types, k=15)
    assert other > expected - 0.15, (other, expected)
    assert accuracy > 0.95
    assert adata.uns["scdeepcluster"]["n_clusters"] == 3  # Leiden's K on the pretrained latent space


def test_mixed_type_batch_labels_are_refused(sim):
    adata = sim[:60].copy()
    adata.obs["b"] = pd.Series([1] * 30 + ["1"] * 30, index=adata.obs_names, dtype=object)
    with pytest.raises(ValueError, match=r"adata.obs\['b'\] mixes label types"):
        se.tl.scdeepcluster(adata, 2, batch_key="b", max_epochs=1)
    assert "scdeepcluster" not in adata.obs
    adata.obs["b"] = pd.Series([1] * 30 + [2] * 30, index=adata.obs_names)  # one type: fine, two batches
    model = se.tl.scdeepcluster(adata, 2, batch_key="b", max_epochs=1, return_model=True)
    assert model.batch_categories == ["1", "2"]


def test_one_stage_may_be_skipped_and_progress(sim, capfd):
    adata = sim[:100].copy()
    se.tl.scdeepcluster(adata, 2, max_epochs=(2, 0), show_progress=True)
    err = capfd.readouterr().err
    assert "scDeepCluster pretraining" in err
    assert adata.uns["scdeepcluster"]["n_epochs_pretrain"] == 2 and adata.uns["scdeepcluster"]["n_epochs_cluster"] == 0
    se.tl.scdeepcluster(adata, 2, max_epochs=1, show_progress=False)
    assert "scDeepCluster" not in capfd.readouterr().err


# -------------------------------------------------------------------------------------------- pretraining stop
def test_more_pretraining_epochs_do_not_change_an_early_stopped_result(sim):
    # pretraining stops on the held-out loss: once the stop comes before the cap, a larger max_epochs[0] gives the
    # same network, latent space and clusters (a fixed schedule, validation_fraction=0, trains on and changes them)
    settings = dict(n_clusters=4, batch_size=128, validation_fraction=0.2, patience=3, random_state=0)
    runs = {}
    for cap in (150, 300):
        a = sim.copy()
        se.tl.scdeepcluster(a, max_epochs=(cap, 30), show_progress=False, **settings)
        runs[cap] = a
    u = runs[150].uns["scdeepcluster"]
    assert u["n_epochs_pretrain"] < 150  # stopped on the held-out cells
    assert len(u["history"]["pretrain_validation_zinb"]) == u["n_epochs_pretrain"]
    np.testing.assert_array_equal(runs[150].obsm["X_scdeepcluster"], runs[300].obsm["X_scdeepcluster"])
    np.testing.assert_array_equal(runs[150].obs["scdeepcluster"], runs[300].obs["scdeepcluster"])
    fixed = {}
    for cap in (30, 60):
        a = sim.copy()
        se.tl.scdeepcluster(
            a, max_epochs=(cap, 30), show_progress=False, **{**settings, "validation_fraction": 0, "patience": None}
        )
        assert a.uns["scdeepcluster"]["n_epochs_pretrain"] == cap  # every epoch of the fixed schedule runs
        assert "pretrain_validation_zinb" not in a.uns["scdeepcluster"]["history"]
        fixed[cap] = a.obsm["X_scdeepcluster"]
    assert not np.array_equal(fixed[30], fixed[60])


def test_default_pretraining_budget_follows_n(sim):
    # max_epochs=None: the autoencoder's budget, about 20,000 steps over the training cells (at most 400 epochs),
    # the clustering stage at most 2,000 epochs; the resolved numbers are recorded
    from scembed._engine.autoencoder import default_max_epochs

    a = sim[:200].copy()
    se.tl.scdeepcluster(a, 3, max_epochs=None, batch_size=64, patience=2, show_progress=False)
    params = a.uns["scdeepcluster"]["params"]
    n_train = 200 - round(0.1 * 200)
    assert params["max_epochs"] == [default_max_epochs(n_train, 64), 2000]
    assert (params["validation_fraction"], params["patience"]) == (0.1, 2)
    assert a.uns["scdeepcluster"]["n_epochs_pretrain"] <= params["max_epochs"][0]


def test_batch_penalty_keeps_the_fixed_pretraining_schedule():
    # the held-out loss measures the reconstruction only: with a batch penalty acting, the defaults pretrain every
    # cell for 300 epochs (the schedule the penalty was measured under); without one, or with the penalty off, the
    # held-out stop and the autoencoder's budget; an explicit validation_fraction is honoured either way
    from scembed._engine.autoencoder import default_max_epochs
    from scembed.tl._scdeepcluster import _resolve_pretraining

    def resolved(n_batches, penalty, fraction=None, max_epochs=(None, 2000)):
        o = dict(validation_fraction=fraction, patience=20, batch_penalty=penalty, max_epochs=max_epochs,
                 batch_size=256)  # fmt: skip
        _resolve_pretraining(o, 1000, n_batches, 0)
        return o["max_epochs"], o["validation_fraction"], o["patience"], len(o["rows"][1])

    assert resolved(2, 1.0) == ((300, 2000), 0.0, None, 0)
    assert resolved(2, 0.0) == ((default_max_epochs(900, 256), 2000), 0.1, 20, 100)
    assert resolved(0, 1.0) == ((default_max_epochs(900, 256), 2000), 0.1, 20, 100)
    assert resolved(2, 1.0, fraction=0.2) == ((default_max_epochs(800, 256), 2000), 0.2, 20, 200)
    assert resolved(2, 1.0, max_epochs=(40, 10)) == ((40, 10), 0.0, None, 0)
    # end to end: batches and the penalty, the given epochs all run on every cell
    adata = se.datasets.simulate(120, 40, n_celltypes=2, n_batches=2, random_state=0)
    se.tl.scdeepcluster(adata, 2, batch_key="batch", max_epochs=(6, 2), show_progress=False)
    u = adata.uns["scdeepcluster"]
    assert u["n_epochs_pretrain"] == 6 and "pretrain_validation_zinb" not in u["history"]
    assert (u["params"]["validation_fraction"], u["params"]["patience"]) == (0.0, 0)


# ---------------------------------------------------------------------------------------------------- errors
def _snapshot(adata: AnnData):
    return (set(adata.obs.columns), set(adata.obsm), set(adata.uns), adata.X.copy())


@pytest.mark.parametrize(
    ("mutate", "kwargs", "err", "match"),
    [
        (lambda a: a.X.data.__setitem__(0, -1.0), {}, ValueError, "negative"),
        (lambda a: a.X.data.__setitem__(0, 0.5), {}, ValueError, "integer"),
        (lambda a: a.X.data.__setitem__(0, np.nan), {}, ValueError, "NaN"),
        (None, {"n_clusters": 10_000}, ValueError, "n_clusters"),
        (None, {"n_clusters": -1}, ValueError, "n_clusters"),
        (None, {"batch_key": "nope"}, KeyError, "batch_key"),
        (None, {"layer": "nope"}, KeyError, "layer"),
        (None, {"n_top_genes": 10_000}, ValueError, "n_top_genes"),
        (None, {"n_top_genes": 0}, ValueError, "n_top_genes"),
        (None, {"hidden": ()}, TypeError, "hidden"),
        (None, {"tol": 2.0}, ValueError, "tol"),
        (None, {"n_neighbors": 1}, ValueError, "n_neighbors"),
        (None, {"max_epochs": (1, 2, 3)}, TypeError, r"pair \(pretraining, clustering\)"),
        (None, {"max_epochs": (1, -1)}, ValueError, r"clustering stage\) must be ≥ 0"),
        (None, {"key_added": "X_sdc"}, ValueError, "without the 'X_' prefix"),
        (None, {"pretrain_epochs": 5}, TypeError, r"`pretrain_epochs` was renamed `max_epochs\[0\]`"),
        (None, {"maxiter": 5}, TypeError, r"`maxiter` was renamed `max_epochs\[1\]`"),
        (None, {"sigma": 1.0}, TypeError, "`sigma` was renamed `noise`"),
        (None, {"z_dim": 8}, TypeError, "`z_dim` was renamed `n_latent`"),
        (None, {"knn": 8}, TypeError, "`knn` was renamed `n_neighbors`"),
        (None, {"select_genes": 8}, TypeError, "`select_genes` was renamed `n_top_genes`"),
        (None, {"encoder": (8,)}, TypeError, "`encoder` was renamed `hidden`"),
        (None, {"resolution": 0}, ValueError, "resolution"),
        (None, {"validation_fraction": 1.0}, ValueError, "validation_fraction"),
        (None, {"validation_fraction": -0.1}, ValueError, "validation_fraction"),
        (None, {"validation_fraction": "0.1"}, TypeError, "validation_fraction"),
        (None, {"patience": 0}, ValueError, "patience"),
        (None, {"scale": "none"}, ValueError, "scale"),
    ],
)
def test_errors_leave_adata_unchanged(sim, mutate, kwargs, err, match):
    adata = sim[:50].copy()
    if mutate is not None:
        mutate(adata)
    before = _snapshot(adata)
    with pytest.raises(err, match=match):
        se.tl.scdeepcluster(adata, **{"max_epochs": 1, **kwargs})
    after = _snapshot(adata)
    assert before[:3] == after[:3]
    np.testing.assert_array_equal(before[3].toarray(), after[3].toarray())


def test_error_names_layer_and_empty_cells(sim):
    adata = sim[:50].copy()
    adata.layers["counts"] = adata.X.copy()
    adata.layers["counts"].data[0] = 1.5
    with pytest.raises(ValueError, match="counts"):
        se.tl.scdeepcluster(adata, layer="counts")
    empty = sim[:50].copy()
    keep = np.ones((50, 1), dtype=np.float32)
    keep[3] = 0
    empty.X = sparse.csr_matrix(empty.X.multiply(keep))
    with pytest.raises(ValueError, match="without counts"):
        se.tl.scdeepcluster(empty)


@pytest.mark.gpu
def test_gpu_runs(sim):
    adata = sim.copy()
    model = se.tl.scdeepcluster(adata, 4, device="cuda", return_model=True, **FAST)
    assert adjusted_rand_score(sim.obs["celltype"], adata.obs["scdeepcluster"]) > 0.9
    assert adata.uns["scdeepcluster"]["device"].startswith("cuda")
    labels, _, _ = model.predict(adata, device="cuda")
    np.testing.assert_array_equal(labels.astype(str), adata.obs["scdeepcluster"].astype(str))
