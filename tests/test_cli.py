"""The ``scembed`` command: end to end on small .h5ad files, its one-line errors, output names and help."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

import scembed as se
from scembed import cli
from scembed.cli import _available_methods, main


def _write(adata: ad.AnnData, path) -> str:
    adata.write_h5ad(path)
    return str(path)


@pytest.fixture
def counts_h5ad(tmp_path):
    adata = se.datasets.simulate(n_cells=300, n_genes=120, n_celltypes=3, random_state=0)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture
def small_h5ad(tmp_path):
    """20 cells: fewer than the 3 · 30 + 1 that the default perplexity needs."""
    adata = se.datasets.simulate(n_cells=20, n_genes=60, n_celltypes=2, random_state=0)
    return _write(adata, tmp_path / "small.h5ad")


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("scembed: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


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
    assert sorted(p.name for p in out.parent.iterdir()) == ["emb.h5ad"]  # no temporary file left behind


# ---------------------------------------------------------------------------------------------- errors
def _bad_inputs(tmp_path) -> dict[str, str]:
    base = se.datasets.simulate(n_cells=30, n_genes=60, n_celltypes=2, random_state=0)
    nan = base.copy()
    nan.X = nan.X.toarray().astype(np.float32)
    nan.X[3, 5] = np.nan
    nan_pca = base.copy()
    nan_pca.obsm["X_pca"] = np.ones((base.n_obs, 5), dtype=np.float32)
    nan_pca.obsm["X_pca"][0, 0] = np.inf
    (tmp_path / "text.h5ad").write_text("not an HDF5 file\n")
    good = _write(base, tmp_path / "good.h5ad")
    data = (tmp_path / "good.h5ad").read_bytes()
    (tmp_path / "truncated.h5ad").write_bytes(data[: len(data) // 2])
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    return {
        "good": good,
        "text": str(tmp_path / "text.h5ad"),
        "csv": str(tmp_path / "table.csv"),
        "truncated": str(tmp_path / "truncated.h5ad"),
        "nan": _write(nan, tmp_path / "nan.h5ad"),
        "nan_pca": _write(nan_pca, tmp_path / "nan_pca.h5ad"),
        "no_genes": _write(base[:, :0].copy(), tmp_path / "no_genes.h5ad"),
        "no_cells": _write(base[:0].copy(), tmp_path / "no_cells.h5ad"),
        "three_cells": _write(base[:3].copy(), tmp_path / "three_cells.h5ad"),
        "missing": str(tmp_path / "missing.h5ad"),
    }


ERROR_CASES = [
    # (input, extra arguments, fragments of the message)
    ("missing", [], ["missing.h5ad does not exist"]),
    ("text", [], ["cannot read", "text.h5ad", ".h5ad file", "file signature not found"]),
    ("csv", [], ["cannot read", "table.csv", ".h5ad file"]),
    ("truncated", [], ["cannot read", "truncated.h5ad", "truncated file"]),
    ("nan", [], ["X of", "nan.h5ad", "1 NaN"]),
    ("nan_pca", [], ["obsm['X_pca'] of", "nan_pca.h5ad", "1 NaN or infinite"]),
    ("no_genes", [], ["no_genes.h5ad has 0 genes"]),
    ("no_cells", [], ["no_cells.h5ad has 0 cells; at least 4 are needed"]),
    ("three_cells", [], ["three_cells.h5ad has 3 cells; at least 4 are needed", "perplexity"]),
    ("good", ["--n-pcs", "0"], ["argument --n-pcs: must be ≥ 1, got 0"]),
    ("good", ["--color", "nope"], ["--color 'nope' is neither an obs column nor a gene", "celltype"]),
    ("good", ["--perplexity", "-1"], ["argument --perplexity", "≥ 1", "-1"]),
    ("good", ["--perplexity", "nan"], ["argument --perplexity", "finite"]),
    ("good", ["--device", "tpu"], ["--device tpu", "'tpu'"]),
    ("good", ["--method", "tsne"], ["argument --method: invalid choice: 'tsne'"]),
    ("good", ["--method", "neuralee", "--maxiter", "5"], ["--maxiter applies to --method ee only"]),
    ("good", ["--method", "ee", "--max-epochs", "5"], ["--max-epochs applies to --method neuralee only"]),
    ("good", ["--batch-size", "1"], ["argument --batch-size: must be ≥ 2"]),
    ("good", ["--random-state", "-1"], ["argument --random-state"]),
    ("good", ["--out", "x.csv"], ["--out x.csv must end with .h5ad"]),
    ("good", ["--plot", "x.nope"], ["--plot x.nope must end with one of", ".png"]),
    ("good", ["--bogus"], ["unrecognized arguments: --bogus"]),
]


@pytest.mark.parametrize(
    ("name", "extra", "fragments"), ERROR_CASES, ids=[" ".join([c[0], *c[1]]) for c in ERROR_CASES]
)
def test_errors_are_one_line_with_status_2(tmp_path, monkeypatch, capsys, name, extra, fragments) -> None:
    inputs = _bad_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    code, _, err = _run(capsys, "embed", inputs[name], *extra)
    _assert_one_line_error(code, err, *fragments)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_device_not_present_is_a_one_line_error(small_h5ad, tmp_path, capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    code, _, err = _run(capsys, "embed", small_h5ad, "--device", "cuda", "--out", str(tmp_path / "o.h5ad"))
    _assert_one_line_error(code, err, "--device cuda", "CUDA is not available")


def test_unwritable_outputs(small_h5ad, tmp_path, capsys) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    code, _, err = _run(capsys, "embed", small_h5ad, "--out", str(a_file / "out.h5ad"))
    _assert_one_line_error(code, err, "cannot write --out", "is not a folder")
    code, _, err = _run(capsys, "embed", small_h5ad, "--out", str(tmp_path))
    _assert_one_line_error(code, err, "is a folder")
    out = str(tmp_path / "o.h5ad")
    code, _, err = _run(capsys, "embed", small_h5ad, "--out", out, "--plot", str(a_file / "p.png"))
    _assert_one_line_error(code, err, "cannot write --plot", "is not a folder")
    assert sorted(os.listdir(tmp_path)) == ["a_file", "small.h5ad"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_folder(small_h5ad, tmp_path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = _run(capsys, "embed", small_h5ad, "--out", str(locked / "out.h5ad"))
    finally:
        locked.chmod(0o700)
    _assert_one_line_error(code, err, "cannot write --out", "locked")


def test_package_errors_are_one_line(small_h5ad, tmp_path, monkeypatch, capsys) -> None:
    """ValueError/TypeError/KeyError/OSError raised by the package: its message, one line, status 2."""

    def failing(*args, **kwargs):
        raise KeyError("`use_rep='X_pca'` not found in adata.obsm;\n available: none.")

    monkeypatch.setattr(se.pp, "affinity", failing)
    code, _, err = _run(capsys, "embed", small_h5ad, "--method", "ee", "--out", str(tmp_path / "o.h5ad"))
    _assert_one_line_error(code, err, "`use_rep='X_pca'` not found in adata.obsm; available: none.")
    assert not (tmp_path / "o.h5ad").exists()


def test_unexpected_errors_need_debug_for_a_traceback(small_h5ad, tmp_path, monkeypatch, capsys) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("something broke")

    monkeypatch.setattr(se.pp, "affinity", broken)
    args = ["embed", small_h5ad, "--method", "ee", "--out", str(tmp_path / "o.h5ad")]
    code, _, err = _run(capsys, *args)
    assert code == 1
    assert err.splitlines() == [
        "scembed: error: unexpected RuntimeError: something broke (rerun with --debug to see the traceback)"
    ]
    with pytest.raises(RuntimeError, match="something broke"):
        main([*args, "--debug"])


# ---------------------------------------------------------------------------------------------- outputs
def test_default_output_names_and_overwrite(small_h5ad, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["embed", small_h5ad, "--method", "ee", "--maxiter", "5"]
    code, out, _ = _run(capsys, *args)
    assert code == 0
    h5ad, png = tmp_path / "small_scembed_ee.h5ad", tmp_path / "small_scembed_ee.png"
    assert f"wrote {h5ad.name}" in out and f"wrote {png.name}" in out
    assert ad.read_h5ad(h5ad).obsm["X_ee"].shape == (20, 2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary files left

    os.utime(h5ad, (0, 0))
    code, _, err = _run(capsys, *args)
    _assert_one_line_error(code, err, "small_scembed_ee.h5ad already exists", "--overwrite")
    assert h5ad.stat().st_mtime == 0  # untouched

    code, _, _ = _run(capsys, *args, "--overwrite")
    assert code == 0 and h5ad.stat().st_mtime > 0

    # --out alone: the image follows it
    code, out, _ = _run(capsys, *args, "--out", "res/emb.h5ad")
    assert code == 0 and (tmp_path / "res" / "emb.h5ad").exists() and (tmp_path / "res" / "emb.png").exists()
    code, _, _ = _run(capsys, *args, "--out", "plain.h5ad", "--no-plot")
    assert code == 0 and not (tmp_path / "plain.png").exists()


def test_bundled_example_default_name(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = _run(capsys, "embed", "--method", "ee", "--maxiter", "2", "--no-plot")
    assert code == 0
    assert "using obsm['X_pca'] (50 columns)" in out
    assert (tmp_path / "pbmc68k_scembed_ee.h5ad").exists()


@pytest.mark.parametrize("color", ["celltype", "gene0"])
def test_color_by_obs_column_or_gene(small_h5ad, tmp_path, capsys, color) -> None:
    png = tmp_path / f"{color}.png"
    args = ["embed", small_h5ad, "--method", "ee", "--maxiter", "2", "--color", color, "--plot", str(png)]
    code, _, err = _run(capsys, *args, "--out", str(tmp_path / f"{color}.h5ad"))
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_atomic_write_leaves_nothing_on_failure(tmp_path) -> None:
    def fails(path) -> None:
        path.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cli.write_atomic(tmp_path / "out.h5ad", fails)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- small data
@pytest.mark.parametrize(("method", "n_cells"), [("neuralee", 20), ("neuralee", 4), ("ee", 4), ("ee", 20)])
def test_small_data_lowers_the_perplexity(tmp_path, capsys, method, n_cells) -> None:
    if method not in _available_methods():
        pytest.skip(f"{method} not available")
    adata = se.datasets.simulate(n_cells=n_cells, n_genes=60, n_celltypes=2, random_state=0)
    path = _write(adata, tmp_path / "tiny.h5ad")
    out = tmp_path / "tiny_out.h5ad"
    budget = ["--max-epochs", "5"] if method == "neuralee" else ["--maxiter", "5"]
    code, stdout, err = _run(capsys, "embed", path, "--method", method, "--out", str(out), "--no-plot", *budget)
    assert code == 0, err
    expected = (n_cells - 1) / 3
    assert f"perplexity lowered from 30 to {expected:.3g} for {n_cells} cells" in stdout
    assert f"raw counts detected: normalised to 10,000 per cell, log1p, {min(50, n_cells - 1)} PCs" in stdout
    result = ad.read_h5ad(out)
    assert result.obsm[f"X_{method}"].shape == (n_cells, 2) and np.isfinite(result.obsm[f"X_{method}"]).all()
    assert result.uns["affinity"]["params"]["perplexity"] == pytest.approx(expected)
    assert result.uns[method]["params"]["perplexity"] == pytest.approx(expected)  # the same value everywhere


def test_effective_perplexity_rule() -> None:
    assert cli.effective_perplexity(30, 1000) == 30
    assert cli.effective_perplexity(30, 20) == pytest.approx(19 / 3)
    assert cli.effective_perplexity(30, cli.MIN_CELLS) >= cli.MIN_PERPLEXITY
    assert cli.effective_perplexity(30, cli.MIN_CELLS - 1) < cli.MIN_PERPLEXITY


def test_no_lowering_line_when_the_perplexity_fits(tmp_path, capsys) -> None:
    adata = se.datasets.simulate(n_cells=40, n_genes=60, n_celltypes=2, random_state=0)
    path = _write(adata, tmp_path / "c.h5ad")
    args = ["embed", path, "--method", "ee", "--maxiter", "2", "--perplexity", "5", "--no-plot"]
    code, stdout, _ = _run(capsys, *args, "--out", str(tmp_path / "o.h5ad"))
    assert code == 0 and "perplexity lowered" not in stdout


# ---------------------------------------------------------------------------------------------- help
def test_help_documents_every_option(capsys) -> None:
    code, text, _ = _run(capsys, "embed", "--help")
    assert code == 0
    flat = " ".join(text.split())
    embed_parser = next(
        a for a in cli.build_parser()._subparsers._group_actions if hasattr(a, "choices") and a.choices
    ).choices["embed"]
    options = [a for a in embed_parser._actions if a.option_strings and a.dest != "help"]
    assert {o.dest for o in options} >= {"perplexity", "random_state", "n_pcs", "max_epochs", "out", "overwrite"}
    for action in options:
        assert action.help, f"{action.option_strings[0]} has no help"
        expanded = action.help % {"default": action.default}
        assert " ".join(expanded.split()) in flat, action.option_strings[0]
        assert "default" in action.help, f"{action.option_strings[0]} does not state its default"
    assert re.search(r"--perplexity PERPLEXITY.*\(default: 30\)", flat)


def test_console_script_version() -> None:
    exe = shutil.which("scembed")
    cmd = [exe] if exe else [sys.executable, "-m", "scembed.cli"]
    out = subprocess.run([*cmd, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"scembed {se.__version__}"
