"""``se.pl.history`` draws the per-epoch histories a trainer declares, one panel per quantity."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from anndata import AnnData

import scembed as se


def test_history_one_panel_per_quantity() -> None:
    adata = AnnData(np.zeros((3, 2), dtype=np.float32))
    adata.uns["sdc"] = {
        "params": {"hidden": [256, 64]},  # not a curve
        "converged": True,
        "history": {"pretrain_zinb": [3.0, 2.0, 1.5], "cluster_kl": [0.1, 0.05]},
    }
    axes = se.pl.history(adata, "sdc", log_y=True, show=False)
    assert len(axes) == 2
    assert [ax.get_ylabel() for ax in axes] == ["pretrain_zinb", "cluster_kl"]
    np.testing.assert_array_equal(axes[0].get_lines()[0].get_ydata(), [3.0, 2.0, 1.5])
    np.testing.assert_array_equal(axes[1].get_lines()[0].get_xdata(), [1, 2])
    assert all(ax.get_yscale() == "log" for ax in axes)
    assert axes[0] is not axes[1]
    plt.close("all")
    _, given = plt.subplots()
    ax = se.pl.history(adata, "sdc", curves=["cluster_kl"], ax=given, show=False)  # one quantity: one axes
    assert ax is given and ax.get_ylabel() == "cluster_kl"
    plt.close("all")


def test_history_2d_draws_one_line_per_row() -> None:
    adata = AnnData(np.zeros((3, 2), dtype=np.float32))
    adata.uns["imap"] = {"history": {"stage2_critic": np.array([[1.0, 0.5], [2.0, 1.0]])}}
    ax = se.pl.history(adata, "imap", show=False)
    assert len(ax.get_lines()) == 2
    plt.close("all")


def test_history_errors() -> None:
    adata = AnnData(np.zeros((3, 2), dtype=np.float32))
    adata.uns["ee"] = {"history": {"objective": [3.0, 2.0]}}
    adata.uns["old"] = {"params": {"lam": 1.0}, "objective": [3.0, 2.0]}  # no declared history
    with pytest.raises(KeyError, match="key"):
        se.pl.history(adata, "neuralee")
    with pytest.raises(KeyError, match="curves"):
        se.pl.history(adata, "ee", curves=["loss"])
    with pytest.raises(KeyError, match="no per-epoch 'history'"):
        se.pl.history(adata, "old")
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="one axes per quantity"):
        se.pl.history(adata, "ee", ax=[ax, ax])
    plt.close("all")


def test_history_of_a_real_run() -> None:
    adata = se.datasets.simulate_embedding(60, 5, random_state=0)
    se.tl.ee(adata, perplexity=5.0, maxiter=5, show_progress=False)
    ax = se.pl.history(adata, "ee", show=False)
    assert ax.get_ylabel() == "objective"
    assert len(ax.get_lines()[0].get_ydata()) == adata.uns["ee"]["n_iter"] + 1
    plt.close("all")
