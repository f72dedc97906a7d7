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


def other_batch_share(rep: np.ndarray, batch: pd.Series, k: int = 30) -> float:
    """Mean share of each cell's ``k`` nearest neighbours in ``rep`` (itself excluded) that come from another batch."""
    from sklearn.neighbors import NearestNeighbors

    idx = NearestNeighbors(n_neighbors=k + 1).fit(rep).kneighbors(rep, return_distance=False)[:, 1:]
    b = batch.to_numpy()
    return float((b[idx] != b[:, None]).mean())


def mixed_share(batch: pd.Series) -> float:
    """The other-batch share of perfectly mixed neighbours: Σ_b p_b (1 − p_b) over the batch proportions p_b."""
    p = batch.value_counts(normalize=True).to_numpy()
    return float((p * (1 - p)).sum())


def check_clustering_and_integration(ns: dict) -> None:
    """Block 3: the K of the simulated types, batches mixed in both representations the text names."""
    from sklearn.metrics import adjusted_rand_score

    counts = ns["counts"]
    labels = counts.obs["scdeepcluster"]
    assert isinstance(labels.dtype, pd.CategoricalDtype)
    assert counts.uns["scdeepcluster"]["n_clusters"] == labels.nunique() >= 1
    # "finds the 4 types (K = 4)"
    assert counts.uns["scdeepcluster"]["n_clusters"] == counts.obs["celltype"].nunique() == 4
    assert adjusted_rand_score(counts.obs["celltype"], labels) > 0.9
    # "the share from the other batch is within 0.1 of the 0.5 that the batch sizes give", in both spaces
    ideal = mixed_share(counts.obs["batch"])
    assert abs(ideal - 0.5) < 0.01
    assert abs(other_batch_share(counts.obsm["X_scdeepcluster"], counts.obs["batch"]) - ideal) < 0.1
    assert abs(other_batch_share(counts.obsm["X_pca_imap"], counts.obs["batch"]) - ideal) < 0.1
    assert counts.obsm["X_scdeepcluster"].shape[0] == counts.n_obs
    assert counts.obsm["X_imap"].shape[0] == counts.n_obs
    assert counts.layers["imap"].shape == counts.shape
    assert "neighbors" in counts.uns and counts.uns["neighbors"]["params"]["use_rep"] == "X_pca_imap"
    assert counts.obsm["X_pca_imap"].shape[0] == counts.n_obs


CHECKS = [check_embedding, check_autoencoder, check_clustering_and_integration]


@pytest.mark.slow  # trains five small models; iMAP dominates (about a minute on two threads)
def test_readme_python_blocks_run_and_say_true(tmp_path, monkeypatch, two_torch_threads):
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
