"""Bad and unusual input for every public function: a clear error naming the argument, or the reference result.

One matrix of (function × input case). Every case asserts EITHER an error whose message names the argument
(or the AnnData field) at fault, OR a result equal to a reference computed on the plain form of the same data
(dense float32 in memory), AND that the caller's AnnData is unchanged (a deep snapshot of X, obs, var, obsm,
obsp, layers and uns). The data are tiny and the trainers run one epoch, so the whole file stays fast.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse

import scembed as se

N_CELLS, N_GENES = 40, 24
PERPLEXITY = 5.0


# ----------------------------------------------------------------------------------------------- data


@cache
def _base_counts() -> ad.AnnData:
    adata = se.datasets.simulate(N_CELLS, N_GENES, n_celltypes=2, n_batches=2, random_state=0)
    adata.X = sparse.csr_matrix(adata.X, dtype=np.float32)
    adata.obs["batch"] = adata.obs["batch"].astype(str).astype("category")
    return adata


@cache
def _base_lognorm() -> ad.AnnData:
    adata = _base_counts().copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.uns.pop("log1p", None)
    return adata


def _dense(adata: ad.AnnData) -> ad.AnnData:
    """A copy with X as a dense float32 array: the reference form of every data set."""
    out = adata.copy()
    out.X = np.asarray(out.X.toarray() if sparse.issparse(out.X) else out.X, dtype=np.float32)
    return out


# ----------------------------------------------------------------------------------------------- snapshot


def _array_state(x):
    if x is None:
        return None
    if sparse.issparse(x):
        parts = {a: getattr(x, a).copy() for a in ("data", "indices", "indptr", "row", "col") if hasattr(x, a)}
        return ("sparse", type(x).__name__, x.shape, x.dtype, parts)
    if isinstance(x, np.ndarray):
        return ("dense", x.shape, x.dtype, x.copy())
    if isinstance(x, pd.DataFrame):
        return ("frame", x.copy(deep=True))
    return ("other", type(x).__name__, getattr(x, "shape", None))  # backed X: on disk, opened read-only


def snapshot(adata: ad.AnnData) -> dict:
    """A deep copy of everything a function could modify in the caller's AnnData."""
    return {
        "shape": adata.shape,
        "X": _array_state(adata.X),
        "obs": adata.obs.copy(deep=True),
        "var": adata.var.copy(deep=True),
        "obs_names": list(adata.obs_names),
        "var_names": list(adata.var_names),
        "obsm": {k: _array_state(v) for k, v in adata.obsm.items()},
        "obsp": {k: _array_state(v) for k, v in adata.obsp.items()},
        "layers": {k: _array_state(v) for k, v in adata.layers.items()},
        "uns": copy.deepcopy(dict(adata.uns)),
    }


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, pd.DataFrame | pd.Series):
        return (
            isinstance(b, type(a))
            and a.equals(b)
            and list(a.dtypes if a.ndim == 2 else [a.dtype]) == list(b.dtypes if b.ndim == 2 else [b.dtype])
        )
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def assert_unchanged(adata: ad.AnnData, before: dict) -> None:
    after = snapshot(adata)
    changed = [k for k in before if not _same(before[k], after[k])]
    assert not changed, f"the caller's AnnData changed: {changed}"


def test_snapshot_sees_changes():
    adata = _dense(_base_lognorm())
    before = snapshot(adata)
    assert_unchanged(adata, before)
    adata.X[0, 0] += 1
    with pytest.raises(AssertionError, match="X"):
        assert_unchanged(adata, before)
    adata = _base_counts().copy()
    before = snapshot(adata)
    adata.X.data[0] += 1  # in place, sparse
    adata.uns["new"] = 1
    with pytest.raises(AssertionError, match=r"X.*uns"):
        assert_unchanged(adata, before)


# ----------------------------------------------------------------------------------------------- functions


@dataclass(frozen=True)
class Func:
    call: Callable
    data: str  # "log" or "counts"
    output: tuple[str, str]  # where the result goes in the returned copy
    needs_batches: bool = False


def _autoencoder(adata, **kw):
    fn = se.tl.autoencoder
    opts = {"max_epochs": 1, "n_latent": 2, "hidden": (8,), "show_progress": False, "batch_size": 16}
    accepted = inspect.signature(fn).parameters
    return fn(adata, **{k: v for k, v in {**opts, **kw}.items() if k in accepted or k in kw})


FUNCS: dict[str, Func] = {
    "pp.affinity": Func(
        lambda a, **kw: se.pp.affinity(a, **{"perplexity": PERPLEXITY, **kw}), "log", ("obsp", "affinity")
    ),
    "tl.ee": Func(
        lambda a, **kw: se.tl.ee(a, **{"perplexity": PERPLEXITY, "maxiter": 2, "show_progress": False, **kw}),
        "log",
        ("obsm", "X_ee"),
    ),
    "tl.neuralee": Func(
        lambda a, **kw: se.tl.neuralee(
            a,
            **{
                "perplexity": PERPLEXITY,
                "max_epochs": 1,
                "refine_max_epochs": 0,
                "exaggeration_epochs": 0,
                "hidden": (8,),
                "show_progress": False,
                **kw,
            },
        ),
        "log",
        ("obsm", "X_neuralee"),
    ),
    "tl.scdeepcluster": Func(
        lambda a, **kw: se.tl.scdeepcluster(
            a,
            **{
                "n_clusters": 2,
                "max_epochs": (1, 1),
                "n_latent": 2,
                "hidden": (8,),
                "batch_size": 16,
                "show_progress": False,
                **kw,
            },
        ),
        "counts",
        ("obsm", "X_scdeepcluster"),
    ),
    "tl.imap_integrate": Func(
        lambda a, **kw: se.tl.imap_integrate(
            a,
            **{
                "max_epochs": (0, 0),  # the input path, not the training (tests/test_imap.py)
                "n_latent": 4,
                "use_hvg": False,
                "batch_size": (4, 4),
                "n_critic": 1,
                "walk_steps": 2,
                "show_progress": False,
                **kw,
            },
        ),
        "log",
        ("obsm", "X_imap"),
        needs_batches=True,
    ),
}
if "autoencoder" in getattr(se.tl, "__all__", []):
    FUNCS["tl.autoencoder"] = Func(_autoencoder, "counts", ("obsm", "X_autoencoder"))

ALL = tuple(FUNCS)
COUNTS = tuple(f for f in ALL if FUNCS[f].data == "counts")
REP = ("pp.affinity", "tl.ee", "tl.neuralee")  # read a representation (here X: fewer than 50 genes)
TRAINERS = tuple(f for f in ALL if f not in ("pp.affinity",))
MATRIX_ONLY = tuple(f for f in ALL if f not in REP)  # read X or a layer as the expression matrix
BATCHED = tuple(f for f in ALL if f in ("tl.scdeepcluster", "tl.imap_integrate"))


def _data(fname: str) -> ad.AnnData:
    """The tool's input, X dense float32."""
    return _dense(_base_counts() if FUNCS[fname].data == "counts" else _base_lognorm())


def _run(fname: str, adata: ad.AnnData, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FUNCS[fname].call(adata, **{"copy": True, **kw})


def _output(fname: str, result: ad.AnnData) -> np.ndarray:
    field, key = FUNCS[fname].output
    out = getattr(result, field)[key]
    return out.toarray() if sparse.issparse(out) else np.asarray(out)


@cache
def _reference(fname: str, variant: str = "") -> np.ndarray:
    """The tool's output on the dense float32 form of the data (``variant`` names a derived data set)."""
    adata = _VARIANTS[variant](_data(fname))
    out = _output(fname, _run(fname, adata))
    out.setflags(write=False)
    return out


def _assert_matches(fname: str, result: ad.AnnData, reference: np.ndarray) -> None:
    out = _output(fname, result)
    assert out.shape == reference.shape
    scale = float(np.abs(reference).max()) or 1.0
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4 * scale)


_VARIANTS: dict[str, Callable[[ad.AnnData], ad.AnnData]] = {
    "": lambda a: a,
    "head": lambda a: a[:30].copy(),
    "float16": lambda a: _with_X(a, a.X.astype(np.float16).astype(np.float32)),
}


def _with_X(adata: ad.AnnData, X) -> ad.AnnData:
    out = adata.copy()
    out.X = X
    return out


# ----------------------------------------------------------------------------------------------- the catalogue
# A case makes (adata, kwargs) from the tool's dense input and states the expectation:
#   ("raises", exception type, regex that must name the argument or field), or ("equals", variant), or
#   ("finite",): the tool runs and its output is finite.

CASES: dict[str, tuple[tuple[str, ...], Callable]] = {}


def case(*fnames: str):
    def register(fn):
        CASES[fn.__name__.removeprefix("case_")] = (fnames, fn)
        return fn

    return register


def _set(adata, i, j, value):
    X = adata.X.copy()
    X[i, j] = value
    return _with_X(adata, X)


@case(*ALL)
def case_nan(a, f):
    return _set(a, 0, 0, np.nan), {}, ("raises", ValueError, r"adata\.X.*NaN")


@case(*ALL)
def case_inf(a, f):
    return _set(a, 3, 1, np.inf), {}, ("raises", ValueError, r"adata\.X.*infinite")


@case(*COUNTS)
def case_negative_counts(a, f):
    return _set(a, 0, 0, -1.0), {}, ("raises", ValueError, r"adata\.X.*negative")


@case(*COUNTS)
def case_non_integer_counts(a, f):
    return _set(a, 0, 0, 0.5), {}, ("raises", ValueError, r"adata\.X.*non-integer")


@case(*ALL)
def case_zero_cells(a, f):
    return a[:0].copy(), {}, ("raises", ValueError, r"`adata` has 0 cells")


@case(*ALL)
def case_zero_genes(a, f):
    return a[:, :0].copy(), {}, ("raises", ValueError, r"`adata` has no variables")


@case(*ALL)
def case_one_cell(a, f):
    return a[:1].copy(), {}, ("raises", ValueError, r"`adata` has 1 cells")


@case(*REP)
def case_three_cells(a, f):
    # too few for the perplexity: the error names it (or the minimum number of cells)
    return a[:3].copy(), {}, ("raises", ValueError, r"`perplexity=5`|`adata` has 3 cells")


@case(*REP)
def case_fewer_cells_than_perplexity(a, f):
    return a[:10].copy(), {"perplexity": 30.0}, ("raises", ValueError, r"`perplexity=30`")


@case(*ALL)
def case_duplicated_cells(a, f):
    rows = np.r_[0 : N_CELLS // 2, 0 : N_CELLS // 2]  # every cell twice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the repeated obs names, renamed below
        dup = a[rows].copy()
    dup.obs_names = [f"cell{i}" for i in range(len(rows))]
    return dup, {}, ("finite",)


@case(*ALL)
def case_constant_genes(a, f):
    X = a.X.copy()
    X[:, :4] = 1.0
    return _with_X(a, X), {}, ("finite",)


@case(*ALL)
def case_float64(a, f):
    return _with_X(a, a.X.astype(np.float64)), {}, ("equals", "")


@case(*ALL)
def case_float16(a, f):
    return _with_X(a, a.X.astype(np.float16)), {}, ("equals", "float16")


@case(*COUNTS)
def case_int32_counts(a, f):
    return _with_X(a, a.X.astype(np.int32)), {}, ("equals", "")


@case(*ALL)
def case_csr(a, f):
    return _with_X(a, sparse.csr_matrix(a.X)), {}, ("equals", "")


@case(*ALL)
def case_csc(a, f):
    return _with_X(a, sparse.csc_matrix(a.X)), {}, ("equals", "")


@case(*ALL)
def case_csr_array(a, f):
    return _with_X(a, sparse.csr_array(a.X)), {}, ("equals", "")


def _non_canonical(X: np.ndarray) -> sparse.csr_matrix:
    """CSR holding every non-zero as two halves, columns unsorted: the same matrix for every SciPy operation."""
    coo = sparse.coo_matrix(X)
    order = np.lexsort((-coo.col, coo.row))  # within a row, columns descending
    rows, cols, vals = np.repeat(coo.row[order], 2), np.repeat(coo.col[order], 2), coo.data[order]
    data = np.stack([vals / 2, vals - vals / 2], axis=1).ravel().astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=X.shape[0]))])
    M = sparse.csr_matrix((data, cols, indptr), shape=X.shape)
    assert not M.has_canonical_format and abs(M - sparse.csr_matrix(X)).max() < 1e-5
    return M


@case(*ALL)
def case_non_canonical_csr(a, f):
    return _with_X(a, _non_canonical(a.X)), {}, ("equals", "")


@case(*ALL)
def case_view(a, f):
    return a[:30], {}, ("equals", "head")


@case(*REP)
def case_missing_use_rep(a, f):
    return a, {"use_rep": "X_nope"}, ("raises", KeyError, r"`use_rep='X_nope'`")


@case(*MATRIX_ONLY)
def case_missing_layer(a, f):
    return a, {"layer": "nope"}, ("raises", KeyError, r"`layer='nope'`")


@case(*BATCHED)
def case_missing_batch_key(a, f):
    return a, {"batch_key": "nope"}, ("raises", KeyError, r"`batch_key='nope'`")


@case("pp.affinity")
def case_missing_neighbors_key(a, f):
    return a, {"neighbors_key": "nope"}, ("raises", KeyError, r"`neighbors_key='nope'`")


@case("tl.ee", "tl.neuralee")
def case_bad_stored_affinity(a, f):
    a = a.copy()
    a.obsp["affinity"] = sparse.csr_matrix(-np.eye(a.n_obs, dtype=np.float32))
    return a, {}, ("raises", ValueError, r"adata\.obsp\['affinity'\].*negative")


@case("tl.imap_integrate")
def case_one_batch(a, f):
    a = a.copy()
    a.obs["batch"] = "only"
    return a, {}, ("raises", ValueError, r"adata\.obs\['batch'\] holds a single batch")


@case("tl.imap_integrate")
def case_negative_reach(a, f):
    return a, {"reach": -1.0}, ("raises", ValueError, r"`reach`")


@case(*BATCHED)
def case_nan_batch(a, f):
    a = a.copy()
    a.obs["batch"] = a.obs["batch"].astype(object)
    a.obs.iloc[0, a.obs.columns.get_loc("batch")] = np.nan
    return a, {"batch_key": "batch"}, ("raises", ValueError, r"adata\.obs\['batch'\] has 1 missing")


@case(*ALL)
def case_copy_string(a, f):
    return a, {"copy": "yes"}, ("raises", TypeError, r"`copy`")


@case(*TRAINERS)
def case_show_progress_string(a, f):
    return a, {"show_progress": "x"}, ("raises", TypeError, r"`show_progress`")


@case("tl.neuralee", "tl.scdeepcluster", "tl.imap_integrate")
def case_return_model_string(a, f):
    return a, {"return_model": "no"}, ("raises", TypeError, r"`return_model`")


@case("tl.scdeepcluster", "tl.autoencoder")
def case_negative_batch_penalty(a, f):
    return a, {"batch_penalty": -1.0}, ("raises", ValueError, r"`batch_penalty`")


@case("pp.affinity", "tl.neuralee")
def case_n_jobs_string(a, f):
    return a, {"n_jobs": "a"}, ("raises", TypeError, r"`n_jobs`")


@case("pp.affinity", "tl.neuralee")
def case_n_jobs_float(a, f):
    return a, {"n_jobs": 1.5}, ("raises", TypeError, r"`n_jobs`")


@case("tl.neuralee", "tl.scdeepcluster")
def case_hidden_int(a, f):
    return a, {"hidden": 50}, ("raises", TypeError, r"`hidden`")


@case(*REP)
def case_perplexity_string(a, f):
    return a, {"perplexity": "5"}, ("raises", TypeError, r"`perplexity`")


@case(*ALL)
def case_random_state_string(a, f):
    return a, {"random_state": "x"}, ("raises", TypeError, r"`random_state`")


@case(*ALL)
def case_key_added_int(a, f):
    return a, {"key_added": 3}, ("raises", TypeError, r"`key_added`")


@case(*ALL)
def case_device_unknown(a, f):
    return a, {"device": "tpu"}, ("raises", ValueError, r"`device`")


@case("tl.neuralee", "tl.scdeepcluster", "tl.imap_integrate")
def case_max_epochs_string(a, f):
    return a, {"max_epochs": "10"}, ("raises", TypeError, r"`max_epochs`")


MATRIX = [pytest.param(f, c, id=f"{f}-{c}") for c, (fnames, _) in CASES.items() for f in fnames]


@pytest.mark.parametrize(("fname", "case_name"), MATRIX)
def test_bad_input(fname: str, case_name: str):
    _, make = CASES[case_name]
    adata, kwargs, expect = make(_data(fname), fname)
    before = snapshot(adata)
    if expect[0] == "raises":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(expect[1], match=expect[2]):
                FUNCS[fname].call(adata, **{"copy": True, **kwargs})
    else:
        result = _run(fname, adata, **kwargs)
        assert isinstance(result, ad.AnnData)
        if expect[0] == "finite":
            assert np.isfinite(_output(fname, result)).all()
        else:
            _assert_matches(fname, result, _reference(fname, expect[1]))
    assert_unchanged(adata, before)


# ----------------------------------------------------------------------------------------------- backed AnnData


def _write_backed(adata: ad.AnnData, path, kind: str) -> ad.AnnData:
    adata = adata.copy()
    adata.X = sparse.csr_matrix(adata.X) if kind == "csr" else np.asarray(adata.X)
    adata.write_h5ad(path)
    return ad.read_h5ad(path, backed="r")


BACKED = [pytest.param(f, kind, id=f"{f}-backed_{kind}") for f in ALL for kind in ("dense", "csr")]


#: trainers that read a backed X in row blocks: the results go to the backed AnnData itself (``copy=True`` is refused)
OUT_OF_CORE = ("tl.autoencoder", "tl.scdeepcluster")


@pytest.mark.parametrize(("fname", "kind"), BACKED)
def test_backed(fname: str, kind: str, tmp_path):
    """Backed X: read in row blocks where the tool can (same result as in memory), else one clear refusal."""
    backed = _write_backed(_data(fname), tmp_path / "a.h5ad", kind)
    before = snapshot(backed)
    try:
        if fname in REP:
            _assert_matches(fname, _run(fname, backed), _reference(fname))
        elif fname in OUT_OF_CORE:
            with pytest.raises(ValueError, match=r"`adata` is backed .*`copy=True`.*`copy=False`"):
                _run(fname, backed)
            assert_unchanged(backed, before)
            assert FUNCS[fname].call(backed) is None
            _assert_matches(fname, backed, _reference(fname))
            return
        else:
            with pytest.raises(ValueError, match=r"`adata` is backed .*adata\.to_memory\(\)"):
                _run(fname, backed)
        assert_unchanged(backed, before)
    finally:
        backed.file.close()


def test_backed_counts_from_a_layer(tmp_path):
    """Only X is on disk in a backed AnnData: tl.scdeepcluster reads counts from an (in-memory) layer."""
    adata = _data("tl.scdeepcluster")
    adata.layers["counts"] = adata.X.copy()
    backed = _write_backed(adata, tmp_path / "a.h5ad", "csr")
    try:
        _assert_matches(
            "tl.scdeepcluster", _run("tl.scdeepcluster", backed, layer="counts"), _reference("tl.scdeepcluster")
        )
    finally:
        backed.file.close()


@cache
def _wide() -> ad.AnnData:
    """60 genes: a tool computes a PCA of X itself (no obsm['X_pca'], at least 50 variables)."""
    adata = se.datasets.simulate(N_CELLS, 60, n_celltypes=2, random_state=1)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.uns.pop("log1p", None)
    return _dense(adata)


@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_backed_pca_equals_in_memory_pca(kind, tmp_path):
    from scembed._utils import get_representation

    backed = _write_backed(_wide(), tmp_path / "a.h5ad", kind)
    try:
        rep_backed, name = get_representation(backed, n_pcs=5)
    finally:
        backed.file.close()
    rep, name_mem = get_representation(_wide(), n_pcs=5)
    assert name == name_mem == "pca(X, 5)"
    signs = np.sign((rep_backed * rep).sum(0))  # a principal component is defined up to its sign
    np.testing.assert_allclose(rep_backed * signs, rep, atol=1e-3 * np.abs(rep).max())


def test_backed_pca_refused_beyond_the_covariance_limit(tmp_path, monkeypatch):
    import scembed._utils._rep as rep_module

    monkeypatch.setattr(rep_module, "BACKED_PCA_MAX_VARS", 10)
    backed = _write_backed(_wide(), tmp_path / "a.h5ad", "csr")
    try:
        with pytest.raises(ValueError, match=r"adata\.X is backed .*60 variables.*X_pca"):
            se.pp.affinity(backed, perplexity=PERPLEXITY)
        assert "affinity" not in backed.obsp
    finally:
        backed.file.close()


@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_neuralee_model_transform_reads_backed_rows(kind, tmp_path):
    result, model = _models()["NeuralEEModel.transform"]
    backed = _write_backed(_wide(), tmp_path / "a.h5ad", kind)
    try:
        Y = model.transform(backed, batch_size=7)  # several row blocks
    finally:
        backed.file.close()
    np.testing.assert_allclose(Y, result, atol=1e-5)


# ----------------------------------------------------------------------------------------------- trained models


@cache
def _models() -> dict:
    """One tiny model of every kind and its output on its training data (the reference of the model cases)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {}
        adata, model = _run("tl.neuralee", _wide(), return_model=True)
        out["NeuralEEModel.transform"] = (np.asarray(adata.obsm["X_neuralee"]), model)
        counts = _data("tl.scdeepcluster")
        adata, model = _run("tl.scdeepcluster", counts, batch_key="batch", return_model=True)
        out["ScDeepClusterModel.predict"] = (model.predict(counts)[2], model)
        log = _data("tl.imap_integrate")
        adata, model = _run("tl.imap_integrate", log, return_model=True)
        out["IMAPModel.encode"] = (np.asarray(adata.obsm["X_imap"]), model)
    return out


MODEL_DATA = {
    "NeuralEEModel.transform": _wide,
    "ScDeepClusterModel.predict": lambda: _data("tl.scdeepcluster"),
    "IMAPModel.encode": lambda: _data("tl.imap_integrate"),
}


def _apply(method: str, model, data, **kw) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "NeuralEEModel.transform":
            return model.transform(data, **kw)
        if method == "ScDeepClusterModel.predict":
            return model.predict(data, **kw)[2]
        return model.encode(data, **kw)


METHODS = tuple(MODEL_DATA)
MODEL_CASES: dict[str, tuple[tuple[str, ...], Callable]] = {
    "nan": (METHODS, lambda a: (_set(a, 0, 0, np.nan), {}, ("raises", ValueError, r"adata\.X.*NaN"))),
    "inf": (METHODS, lambda a: (_set(a, 1, 2, -np.inf), {}, ("raises", ValueError, r"adata\.X.*infinite"))),
    "negative_counts": (
        ("ScDeepClusterModel.predict",),
        lambda a: (_set(a, 0, 0, -1.0), {}, ("raises", ValueError, r"adata\.X.*negative")),
    ),
    "zero_cells": (METHODS, lambda a: (a[:0].copy(), {}, ("empty",))),
    "genes_reordered": (
        METHODS,
        lambda a: (a[:, ::-1].copy(), {}, ("raises", ValueError, r"var_names|genes")),
    ),
    "missing_layer": (
        ("ScDeepClusterModel.predict", "IMAPModel.encode"),
        lambda a: (a, {"layer": "nope"}, ("raises", KeyError, r"`layer='nope'`")),
    ),
    "nan_batch": (
        ("ScDeepClusterModel.predict",),
        lambda a: (_nan_batch(a), {}, ("raises", ValueError, r"adata\.obs\['batch'\] has 1 missing")),
    ),
    "float64": (METHODS, lambda a: (_with_X(a, a.X.astype(np.float64)), {}, ("equals", slice(None)))),
    "csr": (METHODS, lambda a: (_with_X(a, sparse.csr_matrix(a.X)), {}, ("equals", slice(None)))),
    "csc": (METHODS, lambda a: (_with_X(a, sparse.csc_matrix(a.X)), {}, ("equals", slice(None)))),
    "csr_array": (METHODS, lambda a: (_with_X(a, sparse.csr_array(a.X)), {}, ("equals", slice(None)))),
    "non_canonical_csr": (METHODS, lambda a: (_with_X(a, _non_canonical(a.X)), {}, ("equals", slice(None)))),
    "view": (METHODS, lambda a: (a[5:25], {}, ("equals", slice(5, 25)))),
    "coo_array_input": (
        ("NeuralEEModel.transform", "IMAPModel.encode"),
        lambda a: (sparse.coo_matrix(a.X), {}, ("equals", slice(None))),
    ),
}


def _nan_batch(a):
    a = a.copy()
    a.obs["batch"] = a.obs["batch"].astype(object)
    a.obs.iloc[0, a.obs.columns.get_loc("batch")] = np.nan
    return a


MODEL_MATRIX = [pytest.param(m, c, id=f"{m}-{c}") for c, (methods, _) in MODEL_CASES.items() for m in methods]


@pytest.mark.parametrize(("method", "case_name"), MODEL_MATRIX)
def test_model_bad_input(method: str, case_name: str):
    reference, model = _models()[method]
    data, kwargs, expect = MODEL_CASES[case_name][1](MODEL_DATA[method]())
    is_adata = isinstance(data, ad.AnnData)
    before = snapshot(data) if is_adata else data.copy()
    if expect[0] == "raises":
        with pytest.raises(expect[1], match=expect[2]):
            _apply(method, model, data, **kwargs)
    else:
        out = _apply(method, model, data, **kwargs)
        if expect[0] == "empty":
            assert out.shape == (0, reference.shape[1])
        else:
            np.testing.assert_allclose(out, reference[expect[1]], rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    if is_adata:
        assert_unchanged(data, before)
    else:
        assert (abs(data - before)).max() == 0


@pytest.mark.parametrize("kind", ["dense", "csr"])
@pytest.mark.parametrize("method", ["ScDeepClusterModel.predict", "IMAPModel.encode"])
def test_model_backed_X(method, kind, tmp_path):
    """scDeepCluster's model reads a backed X in row slices (same result as in memory); iMAP's refuses it clearly."""
    reference, model = _models()[method]
    backed = _write_backed(MODEL_DATA[method](), tmp_path / "a.h5ad", kind)
    before = snapshot(backed)
    try:
        if method == "IMAPModel.encode":
            with pytest.raises(ValueError, match=r"`adata` is backed .*adata\.to_memory\(\)"):
                _apply(method, model, backed)
        else:
            out = _apply(method, model, backed)
            np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
        assert_unchanged(backed, before)
    finally:
        backed.file.close()


# ----------------------------------------------------------------------------------------------- single fixes


def test_affinity_from_neighbors_leaves_the_callers_graph_byte_identical():
    adata = _dense(_base_lognorm())
    # scanpy's layout (uns['neighbors']['distances_key'] → obsp), built here without numba's compile time;
    # explicit self-loops are dropped by the graph reader, never in the caller's matrix
    d = np.sqrt(((adata.X[:, None, :] - adata.X[None, :, :]) ** 2).sum(-1))
    nearest = np.argsort(d, axis=1)[:, :16]  # the cell itself and 15 neighbours
    rows = np.repeat(np.arange(adata.n_obs), 16)
    values = d[rows, nearest.ravel()] + (rows == nearest.ravel()) * 0.5
    adata.obsp["distances"] = sparse.csr_matrix((values, (rows, nearest.ravel())), shape=(adata.n_obs,) * 2)
    adata.uns["neighbors"] = {"distances_key": "distances"}
    before = snapshot(adata)
    out = se.pp.affinity(adata, perplexity=PERPLEXITY, neighbors_key="neighbors", copy=True)
    assert_unchanged(adata, before)
    assert out.obsp["affinity"].diagonal().max() == 0


@pytest.fixture
def restore_settings():
    saved = {k: getattr(se.settings, k) for k in se.settings.__dataclass_fields__}
    yield
    for k, v in saved.items():
        setattr(se.settings, k, v)


@pytest.mark.parametrize(
    ("name", "value", "error", "match"),
    [
        ("random_state", "x", TypeError, r"`settings\.random_state`"),
        ("random_state", 1.5, TypeError, r"`settings\.random_state`"),
        ("device", "tpu", ValueError, r"`settings\.device`"),
        ("device", 0, ValueError, r"`settings\.device`"),
        ("verbosity", "loud", ValueError, r"`settings\.verbosity`"),
        ("verbosity", 7, ValueError, r"`settings\.verbosity`"),
        ("progress", "yes", TypeError, r"`settings\.progress`"),
        ("progres", False, AttributeError, r"no setting 'progres'"),
    ],
)
def test_settings_checked_on_assignment(name, value, error, match, restore_settings):
    before = getattr(se.settings, name, None)
    with pytest.raises(error, match=match):
        setattr(se.settings, name, value)
    assert getattr(se.settings, name, None) == before


def test_settings_accept_valid_values(restore_settings):
    se.settings.verbosity = "info"  # scanpy's names
    assert se.settings.verbosity == 2
    se.settings.device = "cpu"
    se.settings.random_state = 3
    se.settings.verbosity = None
    assert (se.settings.device, se.settings.random_state) == ("cpu", 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_scale": -1}, "batch_scale"),
        ({"de_scale": -0.5}, "de_scale"),
        ({"library_sd": -1}, "library_sd"),
        ({"n_cells": 0}, "n_cells"),
        ({"n_genes": -3}, "n_genes"),
        ({"n_batches": 0}, "n_batches"),
        ({"library_size": 0}, "library_size"),
    ],
)
def test_simulate_refuses_negative_and_zero_sizes(kwargs, match):
    with pytest.raises(ValueError, match=f"`{match}`"):
        se.datasets.simulate(**{"n_cells": 20, "n_genes": 10, **kwargs})


def test_simulate_embedding_refuses_negative_spread():
    with pytest.raises(ValueError, match="`spread`"):
        se.datasets.simulate_embedding(20, 5, spread=-1)


def _history_adata() -> ad.AnnData:
    adata = ad.AnnData(np.zeros((3, 2), dtype=np.float32))
    adata.uns["ee"] = {"history": {"objective": [3.0, 2.0, 1.0], "step": [1.0, 1.0, 0.5]}}
    adata.uns["not_a_dict"] = "x"
    adata.uns["words"] = {"history": {"loss": ["a", "b"]}}
    return adata


def test_history_takes_a_string_as_one_curve():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adata = _history_adata()
    ax = se.pl.history(adata, "ee", curves="objective", show=False)  # not the curves 'o', 'b', 'j', …
    assert ax.get_ylabel() == "objective"
    plt.close("all")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"key": "not_a_dict"}, KeyError, r"`key='not_a_dict'`"),
        ({"key": "words"}, ValueError, r"adata\.uns\['words'\]\['history'\]\['loss'\] must hold numbers"),
        ({"key": "ee", "curves": 3}, TypeError, r"`curves`"),
        ({"key": "ee", "curves": []}, TypeError, r"`curves`"),
        ({"key": "ee", "curves": ["nope"]}, KeyError, r"`curves='nope'`"),
        ({"key": 3}, TypeError, r"`key`"),
    ],
)
def test_history_bad_arguments(kwargs, error, match):
    adata = _history_adata()
    before = snapshot(adata)
    with pytest.raises(error, match=match):
        se.pl.history(adata, show=False, **kwargs)
    assert_unchanged(adata, before)


def test_diverged_training_names_stage_and_epoch_and_does_not_blame_a_learning_rate():
    from scembed._engine.training import train

    losses = iter([1.0, 0.5, float("nan")])
    with pytest.raises(FloatingPointError) as info:
        train(lambda epoch: next(losses), 5, desc="scDeepCluster pretraining", show_progress=False, monitor="zinb")
    message = str(info.value)
    assert "scDeepCluster pretraining" in message and "epoch 3 of 5" in message and "'zinb'" in message
    assert "learning rate" not in message and "raw counts" in message
    with pytest.raises(FloatingPointError, match="try a smaller `lr`"):
        train(lambda epoch: float("inf"), 2, show_progress=False, advice="try a smaller `lr`.")


def test_imap_warns_clearly_on_raw_counts_before_training():
    counts = _data("tl.scdeepcluster")  # integer counts reaching > 50
    with pytest.warns(UserWarning, match=r"tl\.imap_integrate expects log-normalised .*raw counts.*`layer=`"):
        FUNCS["tl.imap_integrate"].call(counts, copy=True)


# ----------------------------------------------------------------------------------------------- generated arrays

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402


@st.composite
def _small_arrays(draw):
    n = draw(st.integers(6, 25))
    d = draw(st.integers(1, 6))
    # small integers: many ties and duplicated cells, the hard cases of the calibration
    values = st.integers(-3, 3) if draw(st.booleans()) else st.floats(-1e3, 1e3, width=32)
    return draw(hnp.arrays(np.float32, (n, d), elements=values))


@settings(max_examples=12, deadline=None, derandomize=True, database=None, phases=(Phase.explicit, Phase.generate))
@given(X=_small_arrays(), perplexity=st.floats(0.5, 4.0))
def test_affinity_on_generated_arrays(X, perplexity):
    """Any finite array: P is finite, non-negative, symmetric and sums to 1; or a clear `perplexity` error
    (below 1, or not below n_obs - 1) before any work."""
    adata = ad.AnnData(X)
    before = snapshot(adata)
    if perplexity < 1 or perplexity >= adata.n_obs - 1:
        with pytest.raises(ValueError, match="`perplexity"):
            se.pp.affinity(adata, perplexity=perplexity, use_rep="X", copy=True)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            P = se.pp.affinity(adata, perplexity=perplexity, use_rep="X", copy=True).obsp["affinity"]
        assert np.isfinite(P.data).all() and P.data.min() >= 0
        assert abs(P - P.T).max() <= 1e-6 and P.sum() == pytest.approx(1.0, abs=1e-4)
    assert_unchanged(adata, before)
