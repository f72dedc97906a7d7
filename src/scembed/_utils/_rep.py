from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from anndata import AnnData
from scipy import sparse

from .._constants import REP_PCA
from ._logging import get_logger
from ._validation import check_finite, check_key, check_positive_int

#: below this many variables ``X`` is used as it is (scanpy uses the same rule in ``pp.neighbors``)
N_VARS_USE_X = 50
DEFAULT_N_PCS = 50


def get_representation(
    adata: AnnData, use_rep: str | None = None, n_pcs: int | None = None, *, random_state: int = 0
) -> tuple[np.ndarray, str]:
    """The cell representation a method should run on, as a dense float32 array, and its name.

    scanpy's rules: ``use_rep`` names an ``obsm`` key or ``"X"``; ``None`` takes ``obsm["X_pca"]`` when present,
    ``X`` when it has fewer than 50 variables, and otherwise computes a 50-component PCA of ``X`` (not stored, so the
    caller's AnnData is not modified). ``n_pcs`` keeps the first columns.
    """
    if n_pcs is not None:
        check_positive_int(n_pcs, "n_pcs")
    if use_rep is None:
        if REP_PCA in adata.obsm:
            use_rep = REP_PCA
        elif adata.n_vars < N_VARS_USE_X:
            use_rep = "X"
        else:
            n_comps = min(n_pcs or DEFAULT_N_PCS, adata.n_obs - 1, adata.n_vars - 1)
            get_logger().info(f"computing {n_comps} principal components of X (no 'X_pca' in obsm)")
            check_finite(adata.X, "adata.X")
            import scanpy as sc

            X = adata.X.astype(np.float32) if sparse.issparse(adata.X) else np.asarray(adata.X, dtype=np.float32)
            rep = sc.pp.pca(X, n_comps=n_comps, random_state=random_state)
            return np.ascontiguousarray(rep, dtype=np.float32), f"pca(X, {n_comps})"
    if use_rep == "X":
        X = adata.X
        where = "adata.X"
    else:
        if not isinstance(use_rep, str):
            raise TypeError(f"`use_rep` must be a string key of adata.obsm or 'X', got {type(use_rep).__name__}.")
        check_key(adata.obsm, use_rep, arg="use_rep", where="adata.obsm")
        X = adata.obsm[use_rep]
        where = f"adata.obsm[{use_rep!r}]"
    if hasattr(X, "to_numpy"):  # a DataFrame in obsm
        X = X.to_numpy()
    if sparse.issparse(X):
        X = X.toarray()
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{where} must be 2-dimensional, got shape {X.shape}.")
    if n_pcs is not None:
        if n_pcs > X.shape[1]:
            raise ValueError(f"`n_pcs={n_pcs}` is larger than the {X.shape[1]} columns of {where}.")
        X = X[:, :n_pcs]
    check_finite(X, where)
    return np.ascontiguousarray(X, dtype=np.float32), use_rep if n_pcs is None else f"{use_rep}[:, :{n_pcs}]"


def to_dense_rows(X: np.ndarray | sparse.spmatrix | sparse.sparray, rows: np.ndarray | slice) -> np.ndarray:
    """Rows of X as a dense float32 array; sparse matrices are densified only for these rows."""
    block = X[rows]
    if sparse.issparse(block):
        block = block.toarray()
    return np.asarray(block, dtype=np.float32)


def iter_row_chunks(n: int, chunk_size: int) -> Iterator[slice]:
    """Consecutive row slices covering ``range(n)``."""
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))
