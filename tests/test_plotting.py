"""``se.pl.history`` draws the stored histories."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from anndata import AnnData

import scembed as se


def test_history_plots_every_curve() -> None:
    adata = AnnData(np.zeros((3, 2), dtype=np.float32))
    adata.uns["ee"] = {"history": {"objective": [3.0, 2.0, 1.5], "step": [1.0, 2.0, 2.0]}}
    ax = se.pl.history(adata, "ee", log_y=True, show=False)
    assert [line.get_label() for line in ax.get_lines()] == ["objective", "step"]
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), [3.0, 2.0, 1.5])
    assert ax.get_yscale() == "log"
    plt.close("all")
    with pytest.raises(KeyError, match="key"):
        se.pl.history(adata, "neuralee")
    with pytest.raises(KeyError, match="curves"):
        se.pl.history(adata, "ee", curves=["loss"])


def test_history_finds_curves_without_a_history_dict() -> None:
    adata = AnnData(np.zeros((3, 2), dtype=np.float32))
    adata.uns["ee"] = {"params": {"lam": 1.0}, "objective": [3.0, 2.0], "n_iter": 2, "stage1": {"loss": [1.0, 0.5]}}
    ax = se.pl.history(adata, "ee", show=False)
    assert [line.get_label() for line in ax.get_lines()] == ["objective", "stage1/loss"]
    plt.close("all")
    adata.uns["empty"] = {"params": {"lam": 1.0}}
    with pytest.raises(KeyError, match="no per-iteration history"):
        se.pl.history(adata, "empty")
