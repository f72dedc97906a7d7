"""The ``scembed`` command: end to end on a small .h5ad, writing the annotated data and a PNG."""

from __future__ import annotations

import shutil
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

import scembed as se
from scembed.cli import _available_methods, main


@pytest.fixture
def counts_h5ad(tmp_path):
    adata = se.datasets.simulate(n_cells=300, n_genes=120, n_celltypes=3, random_state=0)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    return path


def test_embed_writes_h5ad_and_png(counts_h5ad, tmp_path) -> None:
    methods = _available_methods()
    assert methods, "no embedding method is available to the CLI"
    method = "ee" if "ee" in methods else methods[0]
    out, png = tmp_path / "out" / "emb.h5ad", tmp_path / "emb.png"
    assert main(["embed", str(counts_h5ad), "--method", method, "--out", str(out), "--plot", str(png)]) == 0
    result = ad.read_h5ad(out)
    emb = result.obsm[f"X_{method}"]
    assert emb.shape == (300, 2) and np.isfinite(emb).all()
    assert "affinity" in result.obsp and "X_pca" in result.obsm  # counts were log-normalised for the PCA
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(result.X.toarray(), ad.read_h5ad(counts_h5ad).X.toarray())  # X left as it was


def test_embed_errors(tmp_path) -> None:
    with pytest.raises(SystemExit, match="does not exist"):
        main(["embed", str(tmp_path / "missing.h5ad")])
    with pytest.raises(SystemExit):
        main(["embed", "--method", "tsne"])


def test_console_script_version() -> None:
    exe = shutil.which("scembed")
    cmd = [exe] if exe else [sys.executable, "-m", "scembed.cli"]
    out = subprocess.run([*cmd, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"scembed {se.__version__}"
