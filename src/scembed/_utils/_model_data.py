"""What trained models read from new data: AnnData → arrays, and arrays made canonical, in one place.

The models' maths take arrays; these helpers do the AnnData side (feature check, layer, obsm, batch column)
and bring any accepted matrix type to one of two forms: a dense NumPy array of real numbers, or a canonical
float32 CSR matrix (sorted indices, duplicate entries added up) — without ever modifying the caller's matrix.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from ._io import check_features
from ._rep import ROW_BLOCK
from ._validation import (
    ValueFacts,
    check_finite,
    check_key,
    check_real_dtype,
    is_backed_matrix,
    raise_for_counts,
)


def is_anndata(data: object) -> bool:
    """Whether ``data`` is an AnnData (views included)."""
    return isinstance(data, AnnData)


def canonical_matrix(X: Any, name: str) -> np.ndarray | sparse.csr_matrix:
    """``X`` as a dense NumPy array (its dtype kept) or a canonical float32 CSR matrix; finite values checked.

    Accepts NumPy arrays and matrices, anything ``np.asarray`` turns into a 2-D numeric array, and SciPy sparse
    matrices/arrays of any format (CSR, CSC, COO, …). A CSR matrix with duplicate entries gets them added up (as
    every SciPy operation treats them) on a copy; the caller's matrix is never changed.

    Raises
    ------
    TypeError
        ``X`` is not numeric (names ``name``).
    ValueError
        ``X`` is not 2-D, or holds NaN or infinite values (names ``name``).
    """
    if sparse.issparse(X):
        if X.ndim != 2:
            raise ValueError(f"{name} must be 2-dimensional, got shape {X.shape}.")
        if X.format == "csr":
            # a new matrix object that shares the caller's arrays: copied before anything is changed
            out = sparse.csr_matrix(X)
            copied = False
            if out.dtype != np.float32:
                check_finite(out, name)  # the dtype check comes before the cast
                out, copied = out.astype(np.float32), True
            if not out.has_canonical_format:
                out = out if copied else out.copy()
                out.sum_duplicates()
        else:
            out = sparse.csr_matrix(X, dtype=np.float32)  # conversion adds up duplicates (COO) into a new matrix
            out.sum_duplicates()
        check_finite(out, name)
        return out
    if hasattr(X, "to_numpy"):  # a DataFrame
        X = X.to_numpy()
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (cells × features), got shape {arr.shape}.")
    check_finite(arr, name)
    return arr  # cast to float32 by the consumer, one block at a time where it can


class BackedRows:
    """A backed (on-disk) matrix read one row block at a time: ``X[start:stop]`` is a canonical float32 block.

    What a model's batched prediction needs (``shape`` and row slices); each block is checked for finite values.
    """

    def __init__(self, X: Any, name: str) -> None:
        self._X, self.name = X, name
        self.shape = tuple(X.shape)
        self.ndim = 2

    def __getitem__(self, rows: slice) -> np.ndarray | sparse.csr_matrix:
        if not isinstance(rows, slice):
            raise TypeError("a backed matrix is read in row slices only")
        return canonical_matrix(self._X[rows], self.name)


def matrix_for_model(
    adata: AnnData, layer: str | None, var_names: Sequence[str] | None, *, backed: bool = False
) -> tuple[np.ndarray | sparse.csr_matrix | BackedRows, str]:
    """The expression matrix a model reads from ``adata`` (``X`` or ``layers[layer]``) and its name.

    Checks first that ``adata.var_names`` equal ``var_names`` (the model's training features, in order; skipped
    when ``None``), then canonicalises the matrix with :func:`canonical_matrix` (finite values, duplicates added).
    A backed ``X`` (``read_h5ad(..., backed='r')``) is returned as :class:`BackedRows` when the caller reads row
    blocks (``backed=True``), and refused otherwise.
    """
    if not isinstance(adata, AnnData):
        raise TypeError(f"expected an AnnData, got {type(adata).__name__}.")
    if var_names is not None:
        check_features(var_names, adata.var_names)
    if layer is None:
        X, where = adata.X, "adata.X"
    else:
        if not isinstance(layer, str):
            raise TypeError(f"`layer` must be a string key of adata.layers or None, got {type(layer).__name__}.")
        check_key(adata.layers, layer, arg="layer", where="adata.layers")
        X, where = adata.layers[layer], f"adata.layers[{layer!r}]"
    if X is None:
        raise ValueError(f"{where} is empty (None).")
    if is_backed_matrix(X):
        if backed:
            return BackedRows(X, where), where
        raise ValueError(
            "`adata` is backed (read_h5ad(..., backed='r')): this model needs adata.X in memory; "
            "call adata = adata.to_memory() first."
        )
    return canonical_matrix(X, where), where


def obsm_for_model(adata: AnnData, key: str, n_columns: int) -> np.ndarray:
    """The first ``n_columns`` of ``adata.obsm[key]`` as a dense float32 array (finite values checked)."""
    check_key(adata.obsm, key, arg="key", where="adata.obsm")
    rep = canonical_matrix(adata.obsm[key], f"adata.obsm[{key!r}]")
    if rep.shape[1] < n_columns:
        raise ValueError(f"adata.obsm[{key!r}] has shape {rep.shape}; the model needs at least {n_columns} columns.")
    rep = rep[:, :n_columns]
    return rep.toarray() if sparse.issparse(rep) else np.ascontiguousarray(rep, dtype=np.float32)


def counts_of(adata: AnnData, layer: str | None, *, backed: bool = False) -> tuple[Any, str]:
    """``adata.X`` or ``adata.layers[layer]`` as stored (copied only when sparse and not canonical), and its name.

    A backed ``X`` (``read_h5ad(..., backed='r')``) is returned as it is, on disk, when the caller reads it in row
    slices (``backed=True``), and refused otherwise.
    """
    if layer is None:
        if is_backed_matrix(adata.X):
            if backed:
                return adata.X, "adata.X"
            raise ValueError(
                "`adata` is backed (read_h5ad(..., backed='r')): the counts are read from adata.X, which must be "
                "in memory; call adata = adata.to_memory() first (or pass `layer`)."
            )
        return _canonical_copy(adata.X), "adata.X"
    if not isinstance(layer, str):
        raise TypeError(f"`layer` must be a string key of adata.layers or None, got {type(layer).__name__}.")
    check_key(adata.layers, layer, arg="layer", where="adata.layers")
    return _canonical_copy(adata.layers[layer]), f"adata.layers[{layer!r}]"


def _canonical_copy(X: Any) -> Any:
    """A sparse matrix with duplicate or unsorted entries as a canonical copy; anything else as it is.

    SciPy canonicalises such a matrix in place on many operations (``X > 0``, ``X[:, cols]``), which would
    modify the caller's AnnData.
    """
    if sparse.issparse(X) and X.format in ("csr", "csc") and not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    return X


def batch_codes(adata: AnnData, batch_key: str, categories: Sequence[str] | None = None) -> tuple[np.ndarray, list]:
    """Integer codes of ``adata.obs[batch_key]`` (as strings) in ``categories`` (default: the sorted batches).

    Raises a ValueError for missing values and for batches outside ``categories``.
    """
    if not isinstance(batch_key, str):
        raise TypeError(f"`batch_key` must be a string key of adata.obs or None, got {type(batch_key).__name__}.")
    check_key(adata.obs, batch_key, arg="batch_key", where="adata.obs")
    values = adata.obs[batch_key]
    if values.isna().any():
        raise ValueError(f"adata.obs[{batch_key!r}] has {int(values.isna().sum())} missing value(s).")
    check_batch_labels(values, batch_key)
    values = values.astype(str)
    if categories is None:
        categories = sorted(values.unique())
    unknown = sorted(set(values.unique()) - set(categories))
    if unknown:
        raise ValueError(
            f"adata.obs[{batch_key!r}] holds batches the model was not trained on: {unknown[:5]}; "
            f"known batches: {list(categories)[:10]}."
        )
    codes = pd.Categorical(values, categories=list(categories)).codes.astype(np.int64)
    return codes, list(categories)


def check_batch_labels(values: pd.Series, batch_key: str) -> None:
    """Refuse batch columns whose labels would merge as strings (``1`` and ``"1"``, ``1`` and ``1.0``)."""
    unique = pd.unique(values.to_numpy(dtype=object))
    kinds = {
        "text" if isinstance(v, str) else "number" if isinstance(v, numbers.Number) else type(v).__name__
        for v in unique
    }
    as_text = {str(v) for v in unique}
    if len(kinds) > 1 or len(as_text) < len(unique):
        raise ValueError(
            f"adata.obs[{batch_key!r}] mixes label types ({sorted(kinds)}) or holds labels that read the same as "
            f"text (e.g. 1 and '1'); batches are identified by their text, so make the column one type, e.g. "
            f"adata.obs[{batch_key!r}] = adata.obs[{batch_key!r}].astype(str) if equal texts are one batch."
        )


def raise_for_expression(facts: ValueFacts, where: str, *, counts: bool) -> None:
    """The errors of :func:`check_expression` from the facts of the values (e.g. gathered block by block)."""
    if counts:
        raise_for_counts(facts, where)
        return
    if facts.n_nonfinite:
        raise_for_counts(ValueFacts(n_nonfinite=facts.n_nonfinite), where)
    if facts.minimum < 0:
        raise ValueError(
            f"{where} must hold non-negative (log-normalised) expression, but it has negative values "
            f"(min {facts.minimum:g}); scaled data is not accepted."
        )


def check_expression(X: Any, where: str, *, counts: bool) -> None:
    """Raw counts (non-negative integers) when ``counts``, else non-negative finite values (log-normalised data).

    A backed (on-disk) matrix is read in row blocks of :data:`~scembed._utils._rep.ROW_BLOCK` rows.
    """
    if is_backed_matrix(X):
        check_real_dtype(X.dtype, where)
        facts = ValueFacts()
        for start in range(0, X.shape[0], ROW_BLOCK):
            facts += ValueFacts.of(_canonical_copy(X[start : start + ROW_BLOCK]))
    else:
        check_finite(X, where)  # the type and NaN errors come first, as in check_counts
        if sparse.issparse(X) and X.format in ("csr", "csc", "coo") and not X.has_canonical_format:
            X = X.copy()  # duplicate entries are added up by every consumer: check their sums
            X.sum_duplicates()
        facts = ValueFacts.of(X)
    raise_for_expression(facts, where, counts=counts)
