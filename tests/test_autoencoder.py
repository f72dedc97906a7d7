"""Tests of tl.autoencoder and the count-autoencoder engine it shares with scDeepCluster's pretraining."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
from anndata import AnnData, read_h5ad
from scipy import sparse, stats
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

import scembed as se
from scembed._engine import autoencoder as ae
from scembed._engine import scdeepcluster as sdc
from scembed._engine import zinb
from scembed._engine.counts import CountData
from scembed._utils import seeded_torch

FAST = dict(max_epochs=6, batch_size=64, show_progress=False)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def sim() -> AnnData:
    return se.datasets.simulate(300, 100, n_celltypes=4, de_fraction=0.2, de_scale=1.0, random_state=3)


@pytest.fixture(scope="module")
def fitted(sim):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    adata = sim.copy()
    model = se.tl.autoencoder(adata, n_latent=8, random_state=0, return_model=True, **FAST)
    torch.set_num_threads(threads)
    return adata, model


# ------------------------------------------------------------------------------------------------------ losses
def _random_counts(seed: int = 0, n: int = 30, g: int = 20, heads: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n, g, generator=gen, dtype=torch.float64) * 5)
    x[0, :4] = torch.tensor([0.0, 1.0, 80.0, 400.0], dtype=torch.float64)
    logits = torch.randn(n, heads * g, generator=gen, dtype=torch.float64) * 1.5
    sf = torch.rand(n, generator=gen, dtype=torch.float64) + 0.3
    return x, logits, sf


def test_nb_matches_scipy():
    x, logits, sf = _random_counts(heads=2)
    mean, disp = zinb.nb_heads(logits, x.shape[1])
    m = (mean * sf[:, None]).numpy()
    ref = -stats.nbinom.logpmf(x.numpy(), disp.numpy(), disp.numpy() / (disp.numpy() + m))
    np.testing.assert_allclose(zinb.nb_nll(x, mean, disp, sf).numpy(), ref, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(zinb.nb_nll_logits(logits, x, sf).item(), ref.mean(), rtol=1e-10)
    np.testing.assert_allclose(zinb.nb_nll_logits(logits.float(), x.float(), sf.float()).item(), ref.mean(), rtol=1e-4)


def test_zinb_matches_scipy_mixture():
    # ZINB = π·δ₀ + (1 − π)·NB: log-likelihood from scipy's NB log-pmf and the point mass at zero
    x, logits, sf = _random_counts(1)
    mean, disp, pi = zinb.zinb_heads(logits, x.shape[1])
    m, th, p, xx = (mean * sf[:, None]).numpy(), disp.numpy(), pi.numpy(), x.numpy()
    log_nb = stats.nbinom.logpmf(xx, th, th / (th + m))
    ref = -np.where(xx == 0, np.logaddexp(np.log(p), np.log1p(-p) + log_nb), np.log1p(-p) + log_nb)
    np.testing.assert_allclose(zinb.zinb_nll(x, mean, disp, pi, sf).numpy(), ref, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(zinb.zinb_nll_logits(logits, x, sf).item(), ref.mean(), rtol=1e-10)
    # NB is the ZINB with π → 0
    a, b, _ = logits.view(x.shape[0], 3, -1).unbind(1)
    no_dropout = torch.cat([a, b, torch.full_like(a, -60.0)], 1)
    np.testing.assert_allclose(
        zinb.zinb_nll_logits(no_dropout, x, sf).item(), zinb.nb_nll_logits(torch.cat([a, b], 1), x, sf).item()
    )


def _losses(likelihood: str):
    """The fused loss, the plain element-wise expression and the head split of ``likelihood`` ("zinb" or "nb")."""
    if likelihood == "zinb":
        return zinb.zinb_nll_logits, zinb.zinb_nll, zinb.zinb_heads
    return zinb.nb_nll_logits, zinb.nb_nll, zinb.nb_heads


@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
def test_fused_gradient_matches_autograd(likelihood):
    heads = zinb.N_HEADS[likelihood]
    x, logits, sf = _random_counts(2, heads=heads)
    fused, plain, split = _losses(likelihood)
    # against autograd through the plain expression
    lg = logits.clone().requires_grad_()
    fused(lg, x, sf).mul(2.0).backward()
    got = lg.grad.clone()
    lg.grad = None
    plain(x, *split(lg, x.shape[1]), sf).mean().mul(2.0).backward()
    np.testing.assert_allclose(got.numpy(), lg.grad.numpy(), rtol=1e-7, atol=1e-12)
    # and finite differences (float64, tiny)
    small = logits.view(x.shape[0], heads, -1)[:4, :, :3].reshape(4, heads * 3).clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fused(t, x[:4, :3], sf[:4]), (small,))


@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
def test_fused_gradient_through_a_retained_graph(likelihood):
    # the backward scales its saved gradient in place (no fresh rows × genes tensor per step): a second backward
    # through the retained graph, with another weight, a zero weight, and gradients accumulated across the three,
    # must still equal autograd's through the plain expression
    heads = zinb.N_HEADS[likelihood]
    x, logits, sf = _random_counts(3, heads=heads)
    fused, plain, split = _losses(likelihood)
    lg, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = fused(lg, x, sf)
    expected = plain(x, *split(ref, x.shape[1]), sf).mean()
    for weight in (2.0, -0.5, 0.0, 3.0):
        loss.mul(weight).backward(retain_graph=True)
        expected.mul(weight).backward(retain_graph=True)
        np.testing.assert_allclose(lg.grad.numpy(), ref.grad.numpy(), rtol=1e-7, atol=1e-12)


def _wide_range_counts(dtype: torch.dtype, seed: int = 7, n: int = 64, g: int = 50):
    """Counts 0–3,000 (every value 1–17 present, some non-integer ones), θ 1e-4–1e4 and means 1e-5–1e5."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.exp(torch.randn(n, g, generator=gen, dtype=torch.float64) * 1.5), generator=gen)
    x[0, :17] = torch.arange(1, 18, dtype=torch.float64)
    x[1, :6] = torch.tensor([0.5, 2.7, 16.0, 17.0, 300.0, 3000.0], dtype=torch.float64)
    a = torch.rand(n, g, generator=gen, dtype=torch.float64) * 23 - 11.5  # log means
    theta = 10 ** (torch.rand(n, g, generator=gen, dtype=torch.float64) * 8 - 4)
    b = theta + torch.log(-torch.expm1(-theta))  # softplus⁻¹
    c = torch.randn(n, g, generator=gen, dtype=torch.float64) * 2
    sf = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    return [t.to(dtype) for t in (x, a, b, c, sf)]


def _loss_and_grads(heads, x, sf, likelihood):
    heads = [h.clone().requires_grad_() for h in heads]
    loss = _losses(likelihood)[0](heads, x, sf)
    loss.backward()
    return loss.item(), [h.grad.double() for h in heads]


@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
def test_count_terms_as_finite_sums_equal_the_special_functions(likelihood, monkeypatch):
    # on a CPU the gamma and digamma differences of counts ≤ SMALL_COUNT_MAX are finite sums of small terms; larger
    # and non-integer counts, and other devices, use lgamma and digamma in float64: both ways must agree, in
    # float64 to rounding, and the sums in float32 with the float64 result
    assert zinb.SMALL_COUNT_MAX == 16  # the counts below straddle it
    x, a, b, c, sf = _wide_range_counts(torch.float64)
    heads = [a, b, c] if likelihood == "zinb" else [a, b]
    loss_sums, grads_sums = _loss_and_grads(heads, x, sf, likelihood)
    monkeypatch.setattr(zinb, "TERM_SUMS_ON_CPU", False)
    loss_special, grads_special = _loss_and_grads(heads, x, sf, likelihood)
    np.testing.assert_allclose(loss_sums, loss_special, rtol=1e-12)
    for got, ref in zip(grads_sums, grads_special, strict=True):
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-9, atol=1e-15)
    # and against the plain expression (autograd through lgamma and digamma), on the terms of the non-zero counts
    plain_heads = [h.clone().requires_grad_() for h in heads]
    _losses(likelihood)[1](x, *_losses(likelihood)[2](plain_heads, x.shape[1]), sf).mean().backward()
    np.testing.assert_allclose(grads_sums[1].numpy(), plain_heads[1].grad.numpy(), rtol=1e-6, atol=1e-15)
    monkeypatch.setattr(zinb, "TERM_SUMS_ON_CPU", True)
    x32, a32, b32, c32, sf32 = _wide_range_counts(torch.float32)
    loss32, grads32 = _loss_and_grads([a32, b32, c32] if likelihood == "zinb" else [a32, b32], x32, sf32, likelihood)
    np.testing.assert_allclose(loss32, loss_special, rtol=1e-6)
    for got, ref in zip(grads32, grads_special, strict=True):
        assert float((got - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
def test_loss_in_blocks_of_rows_equals_one_pass(likelihood, monkeypatch):
    # on a CPU the loss runs over blocks of rows (BLOCK_ENTRIES entries); blocks of a few rows, an uneven last block
    # and the non-zeros' indices given in another order than row by row must give the one-pass loss and gradients
    x, a, b, c, sf = _wide_range_counts(torch.float64, n=23, g=30)
    heads = [a, b, c] if likelihood == "zinb" else [a, b]
    fused = _losses(likelihood)[0]
    assert zinb.BLOCK_ENTRIES > x.numel()
    whole_loss, whole_grads = _loss_and_grads(heads, x, sf, likelihood)
    flat = x.view(-1).nonzero().squeeze(1)
    monkeypatch.setattr(zinb, "BLOCK_ENTRIES", 4 * x.shape[1])  # 4 rows per block: 6 blocks, the last of 3 rows
    for nonzero in (None, flat, flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))]):
        hs = [h.clone().requires_grad_() for h in heads]
        loss = fused(hs, x, sf, nonzero)
        loss.backward()
        np.testing.assert_allclose(loss.item(), whole_loss, rtol=1e-12)
        for h, ref in zip(hs, whole_grads, strict=True):
            np.testing.assert_allclose(h.grad.numpy(), ref.numpy(), rtol=1e-12, atol=1e-300)
    # the heads stacked side by side in one tensor (strided column blocks) go through the blocks alike
    stacked = torch.cat(heads, 1).requires_grad_()
    loss = fused(stacked, x, sf)
    loss.backward()
    np.testing.assert_allclose(loss.item(), whole_loss, rtol=1e-12)
    np.testing.assert_allclose(stacked.grad.numpy(), torch.cat(whole_grads, 1).numpy(), rtol=1e-12, atol=1e-300)


def test_count_terms_of_a_block_without_small_or_without_large_counts():
    # only counts above SMALL_COUNT_MAX, only small ones, or a single non-zero: either way of evaluating the
    # terms may cover the whole block alone, and the loss must still be the plain expression's
    x, a, b, c, sf = _wide_range_counts(torch.float64, n=8, g=20)
    one = torch.zeros_like(x)
    one[2, 5] = 4.0
    for counts in (torch.where(x > 0, x + 40, x), x.clamp(max=3), one):
        ref = zinb.zinb_nll(counts, *zinb.zinb_heads([a, b, c], counts.shape[1]), sf).mean()
        np.testing.assert_allclose(zinb.zinb_nll_logits([a, b, c], counts, sf).item(), ref.item(), rtol=1e-10)


@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
def test_loss_of_separate_heads_equals_the_stacked_logits(likelihood):
    # the decoder's heads arrive as separate rows × G tensors; the same numbers stacked side by side give the
    # same loss and, column block by column block, the same gradient
    heads = zinb.N_HEADS[likelihood]
    x, logits, sf = _random_counts(5, heads=heads)
    fused = _losses(likelihood)[0]
    stacked = logits.clone().requires_grad_()
    parts = [p.clone().requires_grad_() for p in logits.split(x.shape[1], dim=1)]
    fused(stacked, x, sf).backward()
    fused(parts, x, sf).backward()
    # (a strided view and a contiguous tensor may take different vector paths: equal to the last few bits)
    np.testing.assert_allclose(torch.cat([p.grad for p in parts], 1).numpy(), stacked.grad.numpy(), rtol=1e-12)
    assert fused(parts, x, sf).item() == pytest.approx(fused(logits, x, sf).item(), rel=1e-13)
    with pytest.raises(ValueError, match=f"expected {heads} heads"):
        fused(parts[:1], x, sf)
    with pytest.raises(ValueError, match="shape"):
        fused(logits[:, :-1], x, sf)


def test_heads_are_one_stacked_linear_layer():
    # the heads' initial weights are those of one Linear(16, 3G) from the same random state, their outputs that
    # layer's column blocks, and the state dict holds them stacked (loading splits them back; strict checks)
    g, hidden = 7, 16
    torch.manual_seed(3)
    heads = ae.Heads(hidden, g, 3)
    torch.manual_seed(3)
    one = torch.nn.Linear(hidden, 3 * g)
    state = heads.state_dict()
    assert sorted(state) == ["bias", "weight"] and heads.out_features == 3 * g
    np.testing.assert_array_equal(state["weight"].numpy(), one.weight.detach().numpy())
    np.testing.assert_array_equal(state["bias"].numpy(), one.bias.detach().numpy())
    h = torch.randn(5, hidden)
    for got, want in zip(heads(h), one(h).split(g, dim=1)):
        np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-6, atol=1e-6)
    # each head is its own parameter, so that its gradient is its own rows × G block
    assert [tuple(p.shape) for p in heads.parameters()] == [(g, hidden), (g,)] * 3
    other = ae.Heads(hidden, g, 3)
    other.load_state_dict({"weight": state["weight"] * 2, "bias": state["bias"]})
    np.testing.assert_array_equal(other.weight_2.detach().numpy(), 2 * one.weight.detach()[2 * g :].numpy())
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict({"weight": state["weight"]})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        other.load_state_dict({**state, "weight_0": state["bias"]})
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict({"weight": state["weight"][:-1], "bias": state["bias"]})


@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
@pytest.mark.parametrize("blocks", [False, True])
def test_gene_dispersion_gradient_matches_autograd(likelihood, blocks, monkeypatch):
    # dispersion="gene": the dispersion logit is one parameter per gene, broadcast to rows × G in the decoder's
    # output; every parameter's gradient through the fused loss (which returns a rows × G gradient for the
    # broadcast view, summed over the rows by autograd) must equal autograd's through the plain expression
    if blocks:
        monkeypatch.setattr(zinb, "BLOCK_ENTRIES", 64)  # several blocks of rows on a CPU
    x, _, sf = _random_counts(6, n=40, g=12)
    torch.manual_seed(0)
    net = ae.Autoencoder(12, 3, (8,), likelihood=likelihood, dispersion="gene").double()
    assert net.heads.n_heads == zinb.N_HEADS[likelihood] - 1 and net.dispersion_logit.shape == (12,)
    with torch.no_grad():
        net.dispersion_logit.copy_(torch.linspace(-3.0, 4.0, 12, dtype=torch.float64))  # θ from 0.05 to 4
    inp = torch.log1p(x)
    fused, plain, split = _losses(likelihood)
    out = net(inp)
    assert all(h.shape == x.shape for h in out)
    np.testing.assert_array_equal(out[1][7].detach().numpy(), net.dispersion_logit.detach().numpy())
    fused(list(out), x, sf).mul(3.0).backward()
    got = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    plain(x, *split(list(net(inp)), 12), sf).mean().mul(3.0).backward()
    assert set(got) == {n for n, _ in net.named_parameters()} and "dispersion_logit" in got
    for name, p in net.named_parameters():
        np.testing.assert_allclose(got[name].numpy(), p.grad.numpy(), rtol=1e-8, atol=1e-12, err_msg=name)


def test_gene_dispersion_network_shape_and_description():
    for likelihood, heads in (("zinb", 2), ("nb", 1)):
        net = ae.Autoencoder(9, 2, (4,), likelihood=likelihood, dispersion="gene")
        assert net.heads.n_heads == heads and "dispersion_logit" in net.state_dict()
    # the MSE has no dispersion: one description whatever was asked
    assert ae.Autoencoder(9, 2, (4,), likelihood="mse", dispersion="gene").dispersion == "cell"
    assert ae.Autoencoder(9, 2, (4,)).dispersion == "cell" and not hasattr(
        ae.Autoencoder(9, 2, (4,)), "dispersion_logit"
    )
    with pytest.raises(ValueError, match="dispersion"):
        ae.Autoencoder(9, 2, (4,), dispersion="batch")


def test_mse_and_dispatch():
    gen = torch.Generator().manual_seed(0)
    out, x = torch.randn(5, 7, generator=gen), torch.rand(5, 7, generator=gen)
    ref = float(((out - x) ** 2).mean())
    assert zinb.reconstruction_loss("mse", out, x, torch.ones(5)).item() == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError, match="likelihood"):
        zinb.reconstruction_loss("poisson", out, x, torch.ones(5))


# ------------------------------------------------------------------------------------------------ shared engine
@pytest.mark.parametrize("batched", [False, True])
def test_scdeepcluster_pretraining_and_autoencoder_share_the_engine(sim, batched):
    # scDeepCluster's pretraining, called as tl.scdeepcluster calls it, and tl.autoencoder with the same seed and
    # settings (every cell, no early stopping) end with identical weights and latent coordinates; with batches
    # too (input standardised per batch, the batch one-hot in the decoder only)
    seed, epochs, batch_size, noise, z_dim, hidden = 5, 3, 64, 2.5, 6, (32, 16)
    sim = sim.copy()
    codes, n_batches = None, 0
    if batched:
        codes, n_batches = np.random.default_rng(0).integers(2, size=sim.n_obs), 2
        sim.obs["batch"] = pd.Categorical.from_codes(codes, ["a", "b"])
    X = sim.X.tocsr()
    genes = np.arange(sim.n_vars)
    dev = torch.device("cpu")
    data = sdc.CountData.fit(X, genes, codes, n_batches, standardize_per_batch=True)
    with seeded_torch(seed, dev) as noise_gen:
        batch_gen = torch.Generator().manual_seed(seed)
        net = sdc.ZINBAutoencoder(len(genes), z_dim, hidden, n_batches).to(dev)
        hist = sdc.pretrain(
            net, data, epochs=epochs, batch_size=batch_size, sigma=noise, device=dev, generator=batch_gen,
            noise_generator=noise_gen, batch_penalty=1.0,
        )  # fmt: skip
        z_sdc = sdc.encode_all(net.eval(), data, dev).numpy()
    adata = sim.copy()
    model = se.tl.autoencoder(
        adata, z_dim, hidden=hidden, noise=noise, scale="gene", max_epochs=epochs, batch_size=batch_size, lr=1e-3,
        validation_fraction=0.0, patience=None, random_state=seed, show_progress=False, return_model=True,
        batch_key="batch" if batched else None,
    )  # fmt: skip
    ours, theirs = model.net.state_dict(), net.state_dict()
    assert set(theirs) - set(ours) == {"centroids"}
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], rtol=0, atol=0, msg=name)
    np.testing.assert_array_equal(adata.obsm["X_autoencoder"], z_sdc)
    assert adata.uns["autoencoder"]["history"]["loss"] == hist["zinb"]
    # the batch-alignment penalty (default weight 1) ran in both, with batches only
    assert adata.uns["autoencoder"]["history"].get("batch_mmd", []) == hist.get("batch_mmd", [])
    assert len(hist.get("batch_mmd", [])) == (epochs if batched else 0)


def test_scdeepcluster_early_stopped_pretraining_is_the_autoencoders(sim):
    # with held-out cells, tl.scdeepcluster's pretraining stops where tl.autoencoder (same engine, same settings)
    # stops, on the same held-out loss, and keeps the same best weights: identical latent coordinates and curves
    # scDeepCluster's input: z-scored genes and its noise of 2.5 (tl.autoencoder's defaults are "global" and 1)
    settings = dict(hidden=(32, 16), batch_size=64, validation_fraction=0.2, patience=5, random_state=5, noise=2.5)
    a, b = sim.copy(), sim.copy()
    se.tl.scdeepcluster(a, 4, n_latent=6, max_epochs=(100, 0), show_progress=False, **settings)
    se.tl.autoencoder(b, 6, scale="gene", max_epochs=100, show_progress=False, **settings)
    ours, theirs = a.uns["scdeepcluster"], b.uns["autoencoder"]
    assert ours["n_epochs_pretrain"] == theirs["n_epochs"] < 100  # stopped early
    assert ours["history"]["pretrain_validation_zinb"] == theirs["history"]["validation_loss"]
    assert ours["history"]["pretrain_zinb"] == theirs["history"]["loss"]
    np.testing.assert_array_equal(a.obsm["X_scdeepcluster"], b.obsm["X_autoencoder"])
    # the weights kept are the best epoch's, not the last: its held-out loss is the curve's minimum
    best = theirs["best_epoch"]
    assert best < theirs["n_epochs"] - 1
    assert theirs["history"]["validation_loss"][best] == min(theirs["history"]["validation_loss"])


def _old_fuzzy_connectivities(indices, distances, n_neighbors):
    # the hand-written UMAP fuzzy graph that scembed used before scanpy's (reference for the Leiden labels)
    n, k = indices.shape
    rho = distances[:, 0].astype(np.float64)
    d = np.maximum(distances.astype(np.float64) - rho[:, None], 0.0)
    target = np.log2(n_neighbors)
    lo, hi, sigma = np.zeros(n), np.full(n, np.inf), np.ones(n)
    for _ in range(64):
        too_big = np.exp(-d / sigma[:, None]).sum(1) > target
        hi = np.where(too_big, sigma, hi)
        lo = np.where(too_big, lo, sigma)
        sigma = np.where(np.isinf(hi), sigma * 2, (lo + hi) / 2)
    sigma = np.maximum(sigma, 1e-3 * np.where(rho > 0, distances.mean(1), distances.mean()))
    W = sparse.csr_matrix((np.exp(-d / sigma[:, None]).ravel(), indices.ravel(), np.arange(0, n * k + 1, k)), (n, n))
    return sparse.csr_matrix(W + W.T - W.multiply(W.T))


def test_leiden_on_scanpy_graph_equals_former_graph(monkeypatch):
    # Leiden's graph is now scanpy's UMAP connectivities; on blobs the graph agrees with the former hand-written
    # one to float32 precision, and the labels (hence K) are the same
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(c, 1.0, size=(80, 6)) for c in (0.0, 2.5, 5.0, 8.0)]).astype(np.float32)
    idx, dist, _ = se._engine.knn.nearest_neighbors(z, 14, method="exact")
    new = sdc.fuzzy_connectivities(idx, dist, 15)
    old = _old_fuzzy_connectivities(idx, dist, 15)
    assert abs(new - old).max() < 1e-5 and new.nnz == old.nnz
    labels = sdc.leiden_labels(z, knn=15, resolution=0.5, random_state=0)
    monkeypatch.setattr(sdc, "fuzzy_connectivities", _old_fuzzy_connectivities)
    before = sdc.leiden_labels(z, knn=15, resolution=0.5, random_state=0)
    np.testing.assert_array_equal(labels, before)
    assert labels.max() + 1 >= 2


# ------------------------------------------------------------------------------------------------------ public API
def test_writes_fields_and_h5ad(fitted, tmp_path):
    adata, _ = fitted
    z = adata.obsm["X_autoencoder"]
    assert z.shape == (adata.n_obs, 8) and z.dtype == np.float32 and np.isfinite(z).all()
    u = adata.uns["autoencoder"]
    assert u["params"]["likelihood"] == "zinb" and u["params"]["max_epochs"] == 6
    assert len(u["history"]["loss"]) == len(u["history"]["validation_loss"]) == u["n_epochs"] <= 6
    assert u["history"]["validation_loss"][u["best_epoch"]] == min(u["history"]["validation_loss"])
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_array_equal(back.obsm["X_autoencoder"], z)
    assert list(back.uns["autoencoder"]["history"]["loss"]) == u["history"]["loss"]


def test_transform_save_load_and_gene_check(fitted, tmp_path):
    adata, model = fitted
    assert "AutoencoderModel" in repr(model) and model.var_names == list(adata.var_names)
    np.testing.assert_array_equal(model.transform(adata), adata.obsm["X_autoencoder"])
    model.save(tmp_path / "m.pt")
    loaded = se.tl.AutoencoderModel.load(tmp_path / "m.pt", device="cpu")
    np.testing.assert_array_equal(loaded.transform(adata), adata.obsm["X_autoencoder"])
    # a subset of cells embeds as in the full call
    np.testing.assert_allclose(loaded.transform(adata[:37]), adata.obsm["X_autoencoder"][:37], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="var_names"):
        model.transform(adata[:, ::-1])
    with pytest.raises(ValueError, match="var_names"):
        model.transform(adata[:, :50])
    torch.save({"format": "other"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a model saved by scembed"):
        se.tl.AutoencoderModel.load(tmp_path / "x.pt")


def test_passes_over_dense_counts_read_bounded_slices(monkeypatch):
    """Dense storage is read at most INFER_ELEMENTS entries at a time; the statistics equal a one-shot reference."""
    from scembed._engine import counts

    rng = np.random.default_rng(0)
    X = rng.poisson(0.8, size=(300, 40)).astype(np.float32)
    X[:, 0] += 1  # every cell has counts
    assert counts._pass_rows(sparse.csr_matrix(X), 10**6) == counts.INFER_BATCH
    assert counts._pass_rows(X, 10**6) == counts.infer_rows(10**6) < counts.INFER_BATCH
    monkeypatch.setattr(counts, "INFER_ELEMENTS", 32 * X.shape[1])  # 32 rows per slice of the dense matrix
    seen = []
    read = counts._read

    def spy(M, rows, genes=None):
        seen.append((sparse.issparse(M), rows.stop - rows.start))
        return read(M, rows, genes)

    monkeypatch.setattr(counts, "_read", spy)
    genes = np.arange(X.shape[1])
    dense = CountData.fit(X, genes, scale="gene")
    assert seen and max(n for is_sparse, n in seen if not is_sparse) == 32
    sparse_fit = CountData.fit(sparse.csr_matrix(X), genes, scale="gene")
    lib = X.sum(1)
    logn = np.log1p(X / lib[:, None] * np.median(lib))
    np.testing.assert_allclose(dense.gene_mean, logn.mean(0), rtol=1e-5)
    np.testing.assert_allclose(dense.gene_std, logn.std(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(dense.gene_mean, sparse_fit.gene_mean, rtol=1e-6)
    np.testing.assert_allclose(dense.size_factors, sparse_fit.size_factors, rtol=1e-6)


def test_take_of_dense_counts_in_memory_equals_the_read():
    """A dense array in memory is indexed where it is; its mini-batches equal those of the copying read."""
    from scembed._engine import counts

    rng = np.random.default_rng(1)
    X = rng.poisson(0.8, size=(120, 30)).astype(np.float32)
    X[:, 0] += 1
    genes = np.array([0, 2, 3, 5, 7, 11, 13, 17, 19, 23])
    data = CountData.fit(X, genes, scale="global")
    rows = rng.permutation(120)[:70]
    taken = data.take(rows, 16)
    assert isinstance(taken.X, counts._DenseRows) and taken.X.shape == (70, len(genes))
    read = counts._read_rows(X, rows, genes, 16)
    idx = rng.permutation(70)[:25]
    np.testing.assert_array_equal(taken.X[idx], read[idx])
    copied = CountData(**{**taken.__dict__, "X": read})
    a, b = taken.batch(idx, torch.device("cpu")), copied.batch(idx, torch.device("cpu"))
    torch.testing.assert_close(a.xin, b.xin, rtol=0, atol=0)
    torch.testing.assert_close(a.counts, b.counts, rtol=0, atol=0)


def test_trained_network_keeps_no_gradients(fitted):
    assert all(p.grad is None for p in fitted[1].net.parameters())


def test_encoding_many_genes_reads_bounded_rows(fitted, monkeypatch):
    """Encoding takes at most INFER_ELEMENTS dense entries per pass and never forms the dense counts."""
    from scembed._engine import counts

    adata, model = fitted
    n_genes = adata.n_vars
    assert counts.infer_rows(n_genes) == min(counts.INFER_BATCH, counts.INFER_ELEMENTS // n_genes)
    assert counts.infer_rows(10**9) == 1
    monkeypatch.setattr(counts, "INFER_ELEMENTS", 64 * n_genes)  # 64 rows per pass
    seen = []
    batch = CountData.batch

    def spy(self, rows, device, **kw):
        mb = batch(self, rows, device, **kw)
        seen.append((mb.xin.shape[0], mb.counts))
        return mb

    monkeypatch.setattr(CountData, "batch", spy)
    z = model.transform(adata)
    assert len(seen) == -(-adata.n_obs // 64) and max(n for n, _ in seen) == 64
    assert all(c is None for _, c in seen)
    np.testing.assert_allclose(z, adata.obsm["X_autoencoder"], rtol=1e-5, atol=1e-6)
    # the encoder input is the same with or without the counts
    data = model._data(adata, None)
    cpu = torch.device("cpu")
    full, lean = batch(data, slice(0, 50), cpu), batch(data, slice(0, 50), cpu, counts=False)
    torch.testing.assert_close(full.xin, lean.xin, rtol=0, atol=0)
    assert lean.counts is None and full.counts is not None


def test_early_stopping_and_best_weights(sim):
    # converged fixture: with a vanishing learning rate the validation loss cannot improve, so training stops
    # after `patience` epochs without improvement
    adata = sim.copy()
    se.tl.autoencoder(adata, n_latent=4, lr=1e-12, patience=3, max_epochs=50, batch_size=64, show_progress=False)
    u = adata.uns["autoencoder"]
    assert u["n_epochs"] == 4 and u["best_epoch"] == 0
    # with a large learning rate, the weights kept are those of the best validation epoch
    X = sim.X.tocsr()
    data = CountData.fit(X, np.arange(sim.n_vars))
    train_rows, val_rows = ae.split_validation(sim.n_obs, 0.2, 0)
    assert len(val_rows) == 60 and np.intersect1d(train_rows, val_rows).size == 0
    dev = torch.device("cpu")
    with seeded_torch(0, dev) as noise_gen:
        net = ae.Autoencoder(sim.n_vars, 4, (16,))
        hist, n_run = ae.train_autoencoder(
            net, data, max_epochs=12, batch_size=32, noise=2.5, lr=0.1, device=dev,
            generator=torch.Generator().manual_seed(0), noise_generator=noise_gen, train_rows=train_rows,
            validation_rows=val_rows, patience=None,
        )  # fmt: skip
    assert n_run == 12 and np.argmin(hist["validation_loss"]) < 11  # the last epoch is not the best one here
    final = ae.evaluate(net, data, val_rows, dev, 32, noise=2.5, seed=0)
    assert final == pytest.approx(min(hist["validation_loss"]), rel=1e-6)


def test_default_epochs_rule():
    assert ae.default_max_epochs(2_000, 256) == 400
    assert ae.default_max_epochs(51_200, 256) == 100
    assert ae.default_max_epochs(1_000_000, 256) == 5
    adata = se.datasets.simulate(40, 30, random_state=0)
    se.tl.autoencoder(adata, n_latent=2, hidden=(8,), patience=1, show_progress=False)  # N below the batch size
    assert adata.uns["autoencoder"]["params"]["max_epochs"] == 400
    assert adata.obsm["X_autoencoder"].shape == (40, 2)


def test_with_a_batch_penalty_every_cell_trains_without_an_early_stop():
    """The held-out loss measures the reconstruction only: with a penalty acting the defaults hold out no cell, never
    stop early and cap the epochs at 300; without a penalty (or one batch) 10 % are held out as before."""
    adata = se.datasets.simulate(40, 30, n_batches=2, batch_scale=1.0, random_state=0)
    se.tl.autoencoder(adata, n_latent=2, hidden=(8,), batch_key="batch", show_progress=False)
    params = adata.uns["autoencoder"]["params"]
    assert params["validation_fraction"] == 0.0 and params["patience"] == 0 and params["max_epochs"] == 300
    assert adata.uns["autoencoder"]["n_epochs"] == 300
    se.tl.autoencoder(adata, n_latent=2, hidden=(8,), batch_key="batch", batch_penalty=0, max_epochs=3)
    assert adata.uns["autoencoder"]["params"]["validation_fraction"] == 0.1
    se.tl.autoencoder(adata, n_latent=2, hidden=(8,), max_epochs=3, show_progress=False)
    assert adata.uns["autoencoder"]["params"]["validation_fraction"] == 0.1


def _knn_accuracy(Y, labels):
    return cross_val_score(KNeighborsClassifier(n_neighbors=10), Y, labels, cv=5).mean()


def test_latent_separates_cell_types_as_well_as_pca(sim):
    # 10-NN accuracy of the simulated cell types (5-fold CV) in the latent space, against PCA-10 of the
    # log-normalised counts; enough steps for the denoising autoencoder to learn (a larger lr, a smaller net)
    adata = sim.copy()
    labels = adata.obs["celltype"].to_numpy()
    se.tl.autoencoder(adata, n_latent=10, hidden=(128, 32), lr=5e-3, max_epochs=60, batch_size=32, show_progress=False)
    ref = adata.copy()
    sc.pp.normalize_total(ref)
    sc.pp.log1p(ref)
    sc.pp.pca(ref, n_comps=10, random_state=0)
    acc_ae, acc_pca = _knn_accuracy(adata.obsm["X_autoencoder"], labels), _knn_accuracy(ref.obsm["X_pca"], labels)
    assert acc_pca > 0.9  # the reference separates the types
    assert acc_ae >= acc_pca - 0.01, (acc_ae, acc_pca)  # as well as PCA, up to one cell in a hundred


def test_sparse_and_dense_input_agree(sim):
    a, b = sim.copy(), sim.copy()
    b.X = b.X.toarray()
    se.tl.autoencoder(a, n_latent=4, hidden=(32,), **FAST)
    se.tl.autoencoder(b, n_latent=4, hidden=(32,), **FAST)
    np.testing.assert_allclose(a.obsm["X_autoencoder"], b.obsm["X_autoencoder"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(a.uns["autoencoder"]["history"]["loss"], b.uns["autoencoder"]["history"]["loss"], 1e-4)


def test_input_standardised_within_each_batch():
    # with standardize_per_batch, each gene is z-scored with the mean and sd (ddof 1) of its cell's batch, from
    # sparse and dense counts alike; without it (or without batches) the statistics are global, as before
    adata = se.datasets.simulate(120, 30, n_batches=3, batch_scale=1.0, random_state=1)
    X, genes = adata.X.tocsr(), np.arange(30)
    codes = adata.obs["batch"].cat.codes.to_numpy().astype(np.int64)
    lib = np.asarray(X.sum(1)).ravel()
    logn = np.log1p(X.toarray() / (lib / np.median(lib))[:, None])
    for counts in (X, X.toarray()):
        data = CountData.fit(counts, genes, codes, 3, standardize_per_batch=True)
        assert data.gene_mean.shape == data.gene_std.shape == (3, 30)
        for b in range(3):
            std = logn[codes == b].std(0, ddof=1)
            np.testing.assert_allclose(data.gene_mean[b], logn[codes == b].mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(data.gene_std[b], np.where(std == 0, 1, std), rtol=1e-5, atol=1e-6)
        xin = data.batch(np.arange(120), torch.device("cpu")).xin.numpy()
        expected = (logn - data.gene_mean[codes]) / data.gene_std[codes]
        np.testing.assert_allclose(xin, expected, rtol=1e-4, atol=1e-5)
        for b in range(3):  # within a batch: mean 0, sd 1 for every gene that varies there
            varies = logn[codes == b].std(0) > 0
            np.testing.assert_allclose(xin[codes == b][:, varies].mean(0), 0, atol=1e-5)
            np.testing.assert_allclose(xin[codes == b][:, varies].std(0, ddof=1), 1, rtol=1e-4)
    for plain in (CountData.fit(X, genes, codes, 3), CountData.fit(X, genes, None, 0, standardize_per_batch=True)):
        assert plain.gene_mean.shape == (30,)
        np.testing.assert_allclose(plain.gene_mean, logn.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_encoder", [False, True])
def test_batch_one_hot(batch_encoder):
    adata = se.datasets.simulate(200, 60, n_batches=2, batch_scale=1.0, random_state=2)
    model = se.tl.autoencoder(
        adata, n_latent=4, hidden=(16,), batch_key="batch", batch_encoder=batch_encoder, return_model=True, **FAST
    )
    net = model.net
    assert net.n_batches == 2 and net.encoder[0].in_features == 60 + (2 if batch_encoder else 0)
    assert net.decoder[0].in_features == 4 + 2
    np.testing.assert_array_equal(model.transform(adata), adata.obsm["X_autoencoder"])
    # the batch changes the decoder's output; the latent only when the encoder sees it
    data = CountData.fit(adata.X, np.arange(60), np.zeros(200, dtype=np.int64), 2)
    other = CountData.fit(adata.X, np.arange(60), np.ones(200, dtype=np.int64), 2)
    with torch.no_grad():
        a, b = data.batch(np.arange(10), "cpu"), other.batch(np.arange(10), "cpu")
        assert torch.equal(net.encode(a.xin, a.onehot), net.encode(b.xin, b.onehot)) != batch_encoder
        assert not torch.equal(torch.cat(net(a.xin, a.onehot), 1), torch.cat(net(b.xin, b.onehot), 1))
    bad = adata.copy()
    bad.obs["batch"] = bad.obs["batch"].astype(str).replace({bad.obs["batch"].astype(str).iloc[0]: "new"})
    with pytest.raises(ValueError, match="not trained on"):
        model.transform(bad)


def test_nb_and_mse_likelihoods_and_gene_selection(sim):
    a = sim.copy()
    model = se.tl.autoencoder(a, n_latent=3, hidden=(16,), likelihood="nb", n_top_genes=40, return_model=True, **FAST)
    assert model.net.heads.out_features == 2 * a.uns["autoencoder"]["n_genes_used"]
    assert 25 <= a.uns["autoencoder"]["n_genes_used"] <= 55
    b = sim.copy()
    b.layers["counts"] = b.X.copy()
    sc.pp.normalize_total(b)
    sc.pp.log1p(b)
    model = se.tl.autoencoder(b, n_latent=3, hidden=(16,), likelihood="mse", n_top_genes=30, return_model=True, **FAST)
    assert model.net.heads.out_features == 30 and np.isfinite(b.obsm["X_autoencoder"]).all()
    np.testing.assert_array_equal(model.transform(b), b.obsm["X_autoencoder"])


def test_gene_dispersion_through_the_public_api(sim, tmp_path):
    a = sim.copy()
    model = se.tl.autoencoder(a, n_latent=3, hidden=(16,), dispersion="gene", return_model=True, **FAST)
    g = a.uns["autoencoder"]["n_genes_used"]
    assert a.uns["autoencoder"]["params"]["dispersion"] == "gene" and model.net.heads.out_features == 2 * g
    assert "dispersion='gene'" in repr(model) and np.isfinite(a.obsm["X_autoencoder"]).all()
    # the dispersion trained: no longer its initial 0
    assert model.net.dispersion_logit.detach().abs().max() > 1e-3
    model.save(tmp_path / "gene.pt")
    loaded = se.tl.AutoencoderModel.load(tmp_path / "gene.pt", device="cpu")
    assert loaded.net.dispersion == "gene"
    np.testing.assert_array_equal(
        loaded.net.dispersion_logit.detach().numpy(), model.net.dispersion_logit.detach().numpy()
    )
    np.testing.assert_array_equal(loaded.transform(a), a.obsm["X_autoencoder"])
    # a model described without the choice (saved before it existed) is the per-cell network
    meta = {k: v for k, v in model.metadata.items() if k != "dispersion"}
    from scembed._engine.models.autoencoder import build_network

    assert build_network(meta).dispersion == "cell"
    # the default stays per cell, as scDeepCluster's network
    b = sim.copy()
    se.tl.autoencoder(b, n_latent=3, hidden=(16,), **FAST)
    assert b.uns["autoencoder"]["params"]["dispersion"] == "cell"


def _snapshot(adata):
    return (
        adata.X.copy(), list(adata.obs.columns), list(adata.obsm.keys()), list(adata.uns.keys()),
        list(adata.layers.keys()),
    )  # fmt: skip


def _neg(a):
    a.X = a.X.astype(np.float32)
    a.X.data[0] = -1.0


def _frac(a):
    a.layers["counts"] = a.X.astype(np.float32)
    a.layers["counts"].data[3] = 0.5


def _nan(a):
    a.X = a.X.astype(np.float32)
    a.X.data[1] = np.nan


def _one_batch(a):
    a.obs["batch"] = "b0"


def _empty_genes(a):
    a.X = a.X.astype(np.float32) * 0


@pytest.mark.parametrize(
    ("mutate", "kwargs", "err", "match"),
    [
        (_neg, {}, ValueError, r"adata\.X must hold raw counts.*negative"),
        (_frac, {"layer": "counts"}, ValueError, r"adata\.layers\['counts'\] must hold raw \(integer\) counts"),
        (_nan, {}, ValueError, r"adata\.X contains 1 NaN"),
        (_one_batch, {"batch_key": "batch"}, ValueError, "one batch"),
        (_empty_genes, {}, ValueError, "no gene with counts"),
        (_neg, {"likelihood": "mse"}, ValueError, "non-negative"),
        (None, {"layer": "missing"}, KeyError, "layer"),
        (None, {"likelihood": "poisson"}, ValueError, "likelihood"),
        (None, {"dispersion": "batch"}, ValueError, "`dispersion`"),
        (None, {"n_latent": 0}, ValueError, "n_latent"),
        (None, {"validation_fraction": 1.0}, ValueError, "validation_fraction"),
        (None, {"n_top_genes": 1000}, ValueError, "n_top_genes"),
        (None, {"hidden": "64"}, TypeError, "hidden"),
        (None, {"hidden": ()}, TypeError, "hidden"),
        (None, {"scale": "none"}, ValueError, "scale"),
    ],
)
def test_errors_leave_adata_unchanged(sim, mutate, kwargs, err, match):
    adata = sim.copy()
    if mutate is not None:
        mutate(adata)
    before = _snapshot(adata)
    with pytest.raises(err, match=match):
        se.tl.autoencoder(adata, **{**FAST, **kwargs})
    after = _snapshot(adata)
    assert (abs(before[0] - after[0]).sum() == 0 or np.isnan(before[0].data).any()) and before[1:] == after[1:]


def test_global_scale_keeps_relative_gene_variances(sim):
    """``scale="global"``: one divisor for every gene, the root mean gene variance (unit variance on average)."""
    X = sparse.csr_matrix(sim.X)
    genes = np.arange(X.shape[1])
    per_gene = CountData.fit(X, genes)
    common = CountData.fit(X, genes, scale="global")
    np.testing.assert_allclose(common.gene_mean, per_gene.gene_mean)
    np.testing.assert_allclose(common.gene_std, np.sqrt(np.mean(per_gene.gene_std.astype(np.float64) ** 2)), rtol=1e-5)
    xin = common.batch(np.arange(X.shape[0]), torch.device("cpu")).xin.double().numpy()
    var = xin.var(0, ddof=1)
    assert var.mean() == pytest.approx(1.0, rel=1e-4)
    ratio = var / per_gene.gene_std.astype(np.float64) ** 2  # the same factor for every gene
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-3)
    # the default of tl.autoencoder (scDeepCluster keeps the z-score: its engine default is "gene")
    adata = sim.copy()
    model = se.tl.autoencoder(adata, n_latent=4, return_model=True, **FAST)
    assert adata.uns["autoencoder"]["params"]["scale"] == "global"
    # the default noise is the root mean square spread of the genes of that input (docstring of `noise`)
    assert adata.uns["autoencoder"]["params"]["noise"] == pytest.approx(np.sqrt(var.mean()), rel=1e-3)
    std = np.asarray(model.metadata["gene_std"])
    np.testing.assert_allclose(std, common.gene_std, rtol=1e-5)


def test_no_genes_is_refused():
    adata = AnnData(np.zeros((10, 0), dtype=np.float32))
    with pytest.raises(ValueError, match="no variables"):
        se.tl.autoencoder(adata)


def test_copy_and_seed(sim):
    a = se.tl.autoencoder(sim, n_latent=3, hidden=(16,), copy=True, **FAST)
    assert "X_autoencoder" not in sim.obsm and a is not sim
    b = se.tl.autoencoder(sim, n_latent=3, hidden=(16,), copy=True, **FAST)
    np.testing.assert_array_equal(a.obsm["X_autoencoder"], b.obsm["X_autoencoder"])
    c = se.tl.autoencoder(sim, n_latent=3, hidden=(16,), copy=True, random_state=1, **FAST)
    assert not np.array_equal(a.obsm["X_autoencoder"], c.obsm["X_autoencoder"])


@pytest.mark.gpu
def test_gpu_matches_cpu(sim):
    # the fused NB/ZINB loss on CUDA (clamp masks always built there) equals the CPU's; training runs there
    for likelihood in ("zinb", "nb"):
        x, logits, sf = _random_counts(4, heads=zinb.N_HEADS[likelihood])
        fused = _losses(likelihood)[0]
        cpu = fused(logits, x, sf).item()
        np.testing.assert_allclose(fused(logits.cuda(), x.cuda(), sf.cuda()).item(), cpu, rtol=1e-10)
    adata = sim.copy()
    model = se.tl.autoencoder(adata, n_latent=4, hidden=(32,), device="cuda", return_model=True, **FAST)
    np.testing.assert_array_equal(model.transform(adata, device="cuda"), adata.obsm["X_autoencoder"])


def _artefact_of_one_type(seed: int) -> AnnData:
    """Two batches; in the second, 30 genes of the first cell type read about 8x higher (a protocol artefact of one
    type, which per-batch standardisation of every gene cannot remove)."""
    adata = se.datasets.simulate(
        600, 200, n_celltypes=3, n_batches=2, batch_scale=0.2, de_fraction=0.2, random_state=seed
    )
    X = adata.X.toarray() if sparse.issparse(adata.X) else np.array(adata.X)
    rng = np.random.default_rng(seed)
    genes = rng.permutation(adata.n_vars)[:30]
    batch, types = adata.obs["batch"], adata.obs["celltype"]
    cells = ((batch == batch.cat.categories[1]) & (types == types.cat.categories[0])).to_numpy()
    X[np.ix_(cells, genes)] = rng.poisson(8 * X[np.ix_(cells, genes)] + 8)
    adata.X = X
    return adata


def test_batch_penalty_mixes_what_standardisation_leaves_and_keeps_the_types():
    """Without the penalty the affected type's cells sit apart by batch; with it they mix, types stay separate."""
    adata = _artefact_of_one_type(1)
    types = adata.obs["celltype"].to_numpy()
    batch = adata.obs["batch"].to_numpy()
    first = types == adata.obs["celltype"].cat.categories[0]
    shares, accuracy = {}, {}
    for weight in (0.0, 1.0):
        se.tl.autoencoder(adata, batch_key="batch", n_latent=8, max_epochs=150, batch_penalty=weight, random_state=1)
        emb = adata.obsm["X_autoencoder"]
        idx = NearestNeighbors(n_neighbors=16).fit(emb).kneighbors(emb, return_distance=False)[:, 1:]
        shares[weight] = float((batch[idx] != batch[:, None]).mean(1)[first].mean())
        accuracy[weight] = cross_val_score(KNeighborsClassifier(15), emb, types, cv=3).mean()
        mmd = adata.uns["autoencoder"]["history"].get("batch_mmd", [])
        assert len(mmd) == (adata.uns["autoencoder"]["n_epochs"] if weight else 0)
    assert shares[0.0] < 0.05  # the artefact separates the batches within the type
    assert shares[1.0] > 0.2  # aligned (ideal: the other batch's share, about 0.5)
    assert accuracy[1.0] >= 0.95 and accuracy[0.0] >= 0.95
