"""README.md's Python examples run as written, in order, and do what the text around them says."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[str]:
    """The ```python fenced blocks of README.md, in order."""
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def check_embedding(ns: dict) -> None:
    """Block 1: affinities, EE and NeuralEE written where the comments say; transform gives the stored embedding."""
    adata = ns["adata"]
    assert adata.obsp["affinity"].shape == (adata.n_obs, adata.n_obs)
    assert adata.obsm["X_ee"].shape == (adata.n_obs, 2)
    assert adata.obsm["X_neuralee"].shape == (adata.n_obs, 2)
    assert {"affinity", "ee", "neuralee"} <= set(adata.uns)
    assert adata.uns["ee"]["params"]["maxiter"] == 50
    assert adata.uns["neuralee"]["n_epochs"] <= 100
    np.testing.assert_allclose(ns["embedding"], adata.obsm["X_neuralee"], atol=1e-5)


def check_autoencoder(ns: dict) -> None:
    """Block 2: the latent space in obsm/uns, Leiden on it, transform of cells equal to their stored latent rows."""
    counts = ns["counts"]
    assert counts.obsm["X_autoencoder"].shape == (counts.n_obs, 16)
    assert counts.uns["autoencoder"]["n_epochs"] <= 20
    assert isinstance(counts.obs["leiden"].dtype, pd.CategoricalDtype)
    np.testing.assert_allclose(ns["latent_of_new_cells"], counts.obsm["X_autoencoder"][:100], atol=1e-5)


def check_clustering_and_integration(ns: dict) -> None:
    """Block 3: categorical labels whose number is the K recorded; iMAP's codes and corrected layer."""
    counts = ns["counts"]
    labels = counts.obs["scdeepcluster"]
    assert isinstance(labels.dtype, pd.CategoricalDtype)
    assert counts.uns["scdeepcluster"]["n_clusters"] == labels.nunique() >= 1
    assert counts.obsm["X_scdeepcluster"].shape[0] == counts.n_obs
    assert counts.obsm["X_imap"].shape[0] == counts.n_obs
    assert counts.layers["imap"].shape == counts.shape
    assert "neighbors" in counts.uns and counts.uns["neighbors"]["params"]["use_rep"] == "X_pca_imap"
    assert counts.obsm["X_pca_imap"].shape[0] == counts.n_obs


CHECKS = [check_embedding, check_autoencoder, check_clustering_and_integration]


@pytest.mark.slow  # trains five small models; iMAP's stage II dominates on a CPU
def test_readme_python_blocks_run_and_say_true(tmp_path, monkeypatch, one_torch_thread):
    """Every ```python block runs in one namespace in a scratch folder; after each, its claims are checked."""
    blocks = python_blocks()
    assert len(blocks) == len(CHECKS), "README.md gained or lost a Python block: add or remove its check here"
    matplotlib.use("Agg")  # the plots are drawn, not shown
    import matplotlib.pyplot as plt

    import scembed as se

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(se.settings, "progress", False)
    ns: dict = {"__name__": "readme"}
    for block, check in zip(blocks, CHECKS, strict=True):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*non-interactive.*")  # plt.show() on Agg
            exec(compile(block, str(README), "exec"), ns)  # the README's own code
        check(ns)
        plt.close("all")
