"""Tests of iMAP's training budget, early stopping and divergence errors (engine level, tiny data, one thread)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import sparse

from scembed._engine import imap as engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _dense(m):
    """A layer as a dense array (sparse input may give a sparse or a dense corrected layer)."""
    return m.toarray() if sparse.issparse(m) else np.asarray(m)


def _groups(sizes):
    bounds = np.cumsum([0, *sizes])
    return [np.arange(a, b) for a, b in itertools.pairwise(bounds)]


# ---------------------------------------------------------------- the budget rule
def test_budget_small_data_draws_few_cells_per_step():
    # 499 cells in two batches: the original's 3,000 steps of 2 × 512 mixup cells are ~6,200 passes over the data;
    # the default runs the floor of 1,500 steps of the floor of 64 cells per batch: 16 times less work
    epochs, bs1 = engine.default_budget(499, 2, smallest_batch=225)
    assert epochs == (engine.MIN_STAGE1_EPOCHS, 150) == (75, 150)
    assert bs1 == engine.MIN_BUDGET_BATCH == 64
    work, original = epochs[0] * engine.STAGE1_STEPS * 2 * bs1, 150 * 20 * 2 * 512
    assert work * 16 == original
    # a batch smaller than the floor: never more cells per step than it holds
    assert engine.default_budget(100, 2, smallest_batch=40)[1] == 40
    # the tutorial's 1,200 cells in two batches: the floor of 1,500 steps
    assert engine.default_budget(1_200, 2) == ((75, 150), 64)


def test_budget_stage1_steps_follow_the_passes_between_the_floor_and_the_original():
    steps = engine.STAGE1_STEPS
    # 50 passes over 3,000 cells per batch at 64 cells per step: ceil(2,343.75 / 20) = 118 epochs
    epochs, bs1 = engine.default_budget(6_000, 2)
    assert epochs[0] == math.ceil(engine.STAGE1_PASSES * 3_000 / (engine.MIN_BUDGET_BATCH * steps)) == 118
    assert bs1 == engine.MIN_BUDGET_BATCH
    passes = epochs[0] * steps * bs1 / 3_000
    assert engine.STAGE1_PASSES <= passes < engine.STAGE1_PASSES + steps * bs1 / 3_000
    # more cells per batch, more epochs, up to the original's 150 from 3,840 cells per batch on; fewer batches of the
    # same cells, more cells per batch
    assert engine.default_budget(2 * 3_840, 2)[0][0] == 150 > engine.default_budget(2 * 3_800, 2)[0][0]
    assert engine.default_budget(6_000, 3)[0][0] < epochs[0]
    # 14,000 cells in two batches (kang_ifnb_2batches' size): the original's 3,000 steps of 117 cells, as before
    assert engine.default_budget(13_999, 2) == ((150, 150), 117)
    # never below the floor, and stage II always the original's 150
    assert engine.default_budget(4, 2)[0] == (engine.MIN_STAGE1_EPOCHS, 150)
    for n in (10, 1_000, 10_000, 100_000, 10_000_000):
        e1, e2 = engine.default_budget(n, 2)[0]
        assert engine.MIN_STAGE1_EPOCHS <= e1 <= 150 and e2 == 150


def test_budget_follows_the_passes_between_the_bounds():
    n, n_b = 20_000, 2
    steps = engine.DEFAULT_EPOCHS[0] * engine.STAGE1_STEPS
    epochs, bs1 = engine.default_budget(n, n_b, (512, 1024))
    assert epochs == engine.DEFAULT_EPOCHS
    assert bs1 == math.ceil(engine.STAGE1_PASSES * n / (n_b * steps))
    assert engine.MIN_BUDGET_BATCH < bs1 < 512
    # the passes it makes are the stated ones, up to the rounding of one cell per step
    passes = steps * n_b * bs1 / n
    assert engine.STAGE1_PASSES <= passes < engine.STAGE1_PASSES + steps * n_b / n
    # more cells, more cells per step; the same cells in more batches, fewer per batch
    assert engine.default_budget(2 * n, n_b)[1] > bs1
    assert engine.default_budget(n, 4)[1] < bs1
    # a smaller batch_size given is the most a step draws
    assert engine.default_budget(n, n_b, (100, 1024))[1] == 100


def test_budget_large_data_is_the_original():
    assert engine.default_budget(1_000_000, 2) == ((150, 150), 512)
    # the original's size is reached from ~30,700 cells per batch on
    assert engine.default_budget(2 * 30_720, 2)[1] == 512 > engine.default_budget(2 * 30_000, 2)[1]


def test_stage2_batch_follows_the_pool():
    # 1,500 critic steps, 100 passes over the pool's distinct cells: 3,000 cells → 200 per step; small pools the
    # floor, never more than the pool; large pools the batch_size given
    steps, passes = 150 * engine.STAGE2_STEPS, engine.STAGE2_PASSES
    assert engine.budget_batch_size(3000, steps, passes, 1024, 3000) == 200
    assert engine.budget_batch_size(300, steps, passes, 1024, 300) == engine.MIN_BUDGET_BATCH
    assert engine.budget_batch_size(40, steps, passes, 1024, 40) == 40
    assert engine.budget_batch_size(50_000, steps, passes, 1024, 50_000) == 1024
    assert engine.budget_batch_size(1, steps, passes, 1024, 1) == 2  # BatchNorm needs two cells


def _stage1(X, groups, **kw):
    kw = {"latent_dim": 4, "batch_size": 16, "show_progress": False, **kw}
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    return engine.train_stage1(engine.RowSource(X), groups, **kw)


def _steps(encoder) -> int:
    # the encoder runs twice per training step (the mixup cells and their translations) in training mode, and its
    # first BatchNorm counts the batches it normalised
    return int(encoder[1].num_batches_tracked) // 2


def _counts(n, n_genes=12, seed=0):
    rng = np.random.default_rng(seed)
    return np.log1p(rng.poisson(1.0, size=(n, n_genes))).astype(np.float32)


def test_explicit_epochs_run_exactly():
    encoder, _, hist = _stage1(_counts(60), _groups([30, 30]), n_epochs=3)
    assert len(hist["loss"]) == 3 and "val_loss" not in hist
    assert _steps(encoder) == 3 * engine.STAGE1_STEPS


# ---------------------------------------------------------------- early stopping
def test_validation_split_per_batch():
    groups = _groups([100, 40, 10])
    train_rows, val_rows = engine.split_validation(groups, 0.1, torch.Generator().manual_seed(0))
    assert [len(v) for v in val_rows] == [10, 4, 0]  # a batch under 20 cells keeps all its cells
    for g, t, v in zip(groups, train_rows, val_rows, strict=True):
        assert np.intersect1d(t, v).size == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([t, v])), g)
    _, capped = engine.split_validation([np.arange(50_000)], 0.1, torch.Generator().manual_seed(0))
    assert len(capped[0]) == 1024


def test_early_stopping_on_a_converged_fixture():
    # with a zero learning rate only the BatchNorm statistics move, which settle within a few epochs: training stops
    # `patience` epochs after the best held-out loss instead of running all 50, and the best networks are kept
    encoder, _, hist = _stage1(
        _counts(200), _groups([100, 100]), n_epochs=50, lr=0.0, validation=0.2, patience=3, min_epochs=1
    )
    best = int(np.argmin(hist["val_loss"]))
    assert len(hist["val_loss"]) == best + 3 + 1 < 50
    assert _steps(encoder) == (best + 1) * engine.STAGE1_STEPS  # the best epoch's state, counters included


def test_early_stopping_waits_for_min_epochs():
    kw = {"n_epochs": 50, "lr": 0.0, "validation": 0.2, "patience": 1}
    _, _, hist = _stage1(_counts(200), _groups([100, 100]), min_epochs=6, **kw)
    assert len(hist["val_loss"]) == max(6, int(np.argmin(hist["val_loss"])) + 2)


# ---------------------------------------------------------------- errors
def test_non_finite_input_is_refused_before_training():
    X = _counts(40)
    X[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        _stage1(X, _groups([20, 20]), n_epochs=1)


def test_stage1_divergence_names_the_stage_the_epoch_and_the_input():
    X = _counts(40) * 1e30  # finite, but its squares overflow float32: the reconstruction loss is infinite
    with pytest.raises(FloatingPointError, match=r"stage I diverged at epoch 1 .*raw counts") as err:
        _stage1(X, _groups([20, 20]), n_epochs=2)
    assert "learning rate" not in str(err.value).split("(")[0]


def test_stage2_divergence_names_the_stage_and_the_batch():
    query = torch.rand(30, 8)
    anchor = torch.full((30, 8), 3e38)  # the critic's output on these cells overflows
    weights = torch.ones(30, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match=r"stage II \(batch b\) diverged at epoch 1"):
        engine.train_generator(
            query, anchor, weights, weights, n_epochs=2, steps_per_epoch=2, batch_size=8, n_critic=2,
            latent_dim=4, generator=torch.Generator().manual_seed(0), stage="stage II (batch b)", show_progress=False,
        )  # fmt: skip


# ---------------------------------------------------------------- the public function
def _adata(n_cells=240, n_genes=30, n_batches=2, seed=0):
    import scanpy as sc

    import scembed as se

    a = se.datasets.simulate(
        n_cells, n_genes, n_batches=n_batches, n_celltypes=3, batch_scale=0.5, de_scale=1.5, random_state=seed
    )
    sc.pp.normalize_total(a)
    sc.pp.log1p(a)
    return a


def test_default_max_epochs_follow_the_budget(monkeypatch):
    import scembed as se

    asked = []

    def budget(n_cells, n_batches, batch_size, **kw):
        asked.append((n_cells, n_batches, tuple(batch_size), kw))
        return (2, 1), 8

    monkeypatch.setattr(engine, "default_budget", budget)
    a = _adata()
    kw = {"use_hvg": False, "n_latent": 8, "batch_size": (16, 32), "n_sample": 100, "show_progress": False}
    b = se.tl.imap_integrate(a, copy=True, **kw)
    assert asked == [(240, 2, (16, 32), {"smallest_batch": 120})]
    u = b.uns["imap"]
    assert u["params"]["max_epochs"] == [2, 1] and u["params"]["budget"] == "default"
    assert len(u["stage1"]["loss"]) == 2 and u["stage1_batch_size"] == 8  # the budget's epochs and cells
    assert u["stage2"]["critic"].shape == (1, 1)
    assert set(u["seconds"]) == {"genes", "stage1", "encode", "stage2", "correct", "total"}
    assert u["seconds"]["total"] >= u["seconds"]["stage1"] + u["seconds"]["stage2"] > 0

    c = se.tl.imap_integrate(a, copy=True, max_epochs=(2, 1), **kw)  # explicit: as given
    assert c.uns["imap"]["params"]["budget"] == "explicit" and c.uns["imap"]["stage1_batch_size"] == 16
    assert len(c.uns["imap"]["stage1"]["loss"]) == 2


def test_default_budget_draws_the_budget_sizes(monkeypatch):
    import scembed as se

    monkeypatch.setattr(engine, "DEFAULT_EPOCHS", (1, 1))  # the rule's sizes, on a budget a test can afford
    a = _adata()  # two batches of 120 cells
    kw = {"use_hvg": False, "n_latent": 8, "batch_size": (512, 1024), "n_sample": 100, "show_progress": False}
    b = se.tl.imap_integrate(a, copy=True, max_epochs=None, **kw)
    u = b.uns["imap"]
    # 20 steps would need 300 cells per batch for 50 passes: all 120 of a batch, not 512
    assert u["stage1_batch_size"] == engine.default_budget(240, 2, (512, 1024), smallest_batch=120)[1] == 120
    pool = max(int(u["stage2"]["n_query_pool"][0]), int(u["stage2"]["n_anchor_pool"][0]))
    expected = engine.budget_batch_size(pool, engine.STAGE2_STEPS, engine.STAGE2_PASSES, 1024, pool)
    assert u["stage2"]["batch_size"].tolist() == [expected] and expected <= pool <= 100  # not 1,024 of ≤ 100 cells
    # epochs given explicitly keep the original's sizes
    c = se.tl.imap_integrate(a, copy=True, max_epochs=(1, 1), **kw)
    assert c.uns["imap"]["stage1_batch_size"] == 512 and c.uns["imap"]["stage2"]["batch_size"].tolist() == [1024]


def _lisi(Z, labels, k=30):
    from sklearn.neighbors import NearestNeighbors

    idx = NearestNeighbors(n_neighbors=k).fit(Z).kneighbors(return_distance=False)
    lab = np.asarray(labels)[idx]
    p = np.stack([(lab == c).mean(1) for c in np.unique(labels)], 1)
    return float(np.mean(1 / (p**2).sum(1)))


def test_corrected_expression_mixes_three_batches():
    # three small simulated batches (iLISI of the uncorrected PCA ≈ 1.6 of 3). With 15 stage-II epochs (75 generator
    # steps) the corrected expression mixed the batches LESS than the input (iLISI 1.57 < 1.62, cLISI 1.62 → 1.84):
    # after 6 short stage-I epochs only ~60 % of the MNN pairs join cells of one type, and too few generator steps
    # leave the query batches moved part-way, between types. With enough generator steps the correction wins.
    from sklearn.decomposition import PCA

    import scembed as se

    a = _adata(n_cells=180, n_genes=40, n_batches=3, seed=1)
    kw = {"use_hvg": False, "n_latent": 16, "n_sample": 60, "n_critic": 2, "show_progress": False}
    b = se.tl.imap_integrate(a, copy=True, max_epochs=(6, 60), batch_size=(32, 64), **kw)
    pcs0 = PCA(10, random_state=0).fit_transform(a.X.toarray())
    pcs1 = PCA(10, random_state=0).fit_transform(_dense(b.layers["imap"]))
    ilisi0, ilisi1 = _lisi(pcs0, a.obs["batch"]), _lisi(pcs1, a.obs["batch"])
    clisi0, clisi1 = _lisi(pcs0, a.obs["celltype"]), _lisi(pcs1, a.obs["celltype"])
    assert ilisi1 > ilisi0 + 0.3
    assert clisi1 < clisi0 + 0.15
