from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from anndata import AnnData
from scipy import sparse

from .._constants import REP_PCA
from ._logging import get_logger
from ._validation import check_finite, check_key, check_positive_int, is_backed_matrix

#: below this many variables ``X`` is used as it is (scanpy uses the same rule in ``pp.neighbors``)
N_VARS_USE_X = 50
DEFAULT_N_PCS = 50
#: rows read at a time from a backed (on-disk) matrix
ROW_BLOCK = 10_000
#: largest number of variables whose covariance (n_vars² float64) a PCA of a backed X accumulates
BACKED_PCA_MAX_VARS = 10_000


def row_blocks(
    X: Any, block_size: int = ROW_BLOCK, *, where: str = "adata.X"
) -> Iterator[tuple[slice, np.ndarray | sparse.csr_matrix]]:
    """``(rows, block)`` over consecutive row blocks of ``X``: float32 dense or CSR, finite values checked.

    Works alike for in-memory matrices and backed ones (an h5py dataset or anndata's on-disk sparse matrix from
    ``read_h5ad(..., backed='r')``), which are read one block at a time; nothing is written back.
    """
    n = X.shape[0]
    for start in range(0, n, block_size):
        rows = slice(start, min(start + block_size, n))
        block = X[rows]
        if sparse.issparse(block):
            block = sparse.csr_matrix(block, dtype=np.float32)
        else:
            block = np.asarray(block)
        check_finite(block, where)
        yield rows, block.astype(np.float32) if not sparse.issparse(block) else block


def read_rows(X: Any, *, where: str = "adata.X") -> np.ndarray:
    """All of ``X`` as a dense float32 array, read in row blocks (for a backed matrix)."""
    out = np.empty(X.shape, dtype=np.float32)
    for rows, block in row_blocks(X, where=where):
        out[rows] = block.toarray() if sparse.issparse(block) else block
    return out


def _backed_pca(X: Any, n_comps: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """PCA of a backed matrix from its mean and covariance accumulated over row blocks (one pass, exact).

    Returns ``(loadings (n_vars, n_comps), mean)``, float64. Components are signed like scikit-learn's
    (largest absolute loading positive).
    """
    n, d = X.shape
    if d > BACKED_PCA_MAX_VARS:
        raise ValueError(
            f"{where} is backed (read_h5ad(..., backed='r')) and has {d} variables: a PCA computed here reads it in "
            f"row blocks only up to {BACKED_PCA_MAX_VARS} variables. Compute adata.obsm['X_pca'] first "
            "(e.g. on adata.to_memory() or a gene subset) or pass `use_rep`."
        )
    total = np.zeros(d)
    gram = np.zeros((d, d))
    for _, block in row_blocks(X, where=where):
        b = block.astype(np.float64)
        total += np.asarray(b.sum(0)).ravel()
        gram += np.asarray((b.T @ b).toarray() if sparse.issparse(b) else b.T @ b)
    mean = total / n
    cov = (gram - n * np.outer(mean, mean)) / max(n - 1, 1)
    _, vectors = np.linalg.eigh(cov)
    W = vectors[:, ::-1][:, :n_comps]
    signs = np.sign(W[np.abs(W).argmax(0), np.arange(n_comps)])
    return W * np.where(signs == 0, 1, signs), mean


def pca_on_the_fly(
    X: np.ndarray | sparse.spmatrix | sparse.sparray,
    n_pcs: int | None = None,
    *,
    random_state: int = 0,
    projected: bool = False,
    where: str = "adata.X",
) -> tuple[np.ndarray, str, np.ndarray, np.ndarray]:
    """A PCA of ``X`` computed here (nothing stored), with the loadings that project new cells alike.

    ``min(n_pcs or 50, n_obs - 1, n_vars - 1)`` components of :func:`scanpy.pp.pca` (seeded). A backed ``X``
    (``read_h5ad(..., backed='r')``) is read in row blocks instead: its exact PCA from the covariance accumulated
    block by block (up to ``BACKED_PCA_MAX_VARS`` variables), equal to scanpy's up to the sign of each component.

    Returns
    -------
    rep
        The cells' coordinates, float32: scanpy's scores, or with ``projected=True`` exactly
        ``X @ loadings - offset`` (what a trained model computes for new cells, so that it reproduces its
        training input).
    name
        ``"pca(X, n)"``, for the records.
    loadings
        ``(n_vars, n)`` float32.
    offset
        ``mean(X) @ loadings``, ``(n,)`` float32.
    """
    n_comps = min(n_pcs or DEFAULT_N_PCS, X.shape[0] - 1, X.shape[1] - 1)
    if n_comps < 1:
        raise ValueError(f"{where} has shape {X.shape}: a PCA needs at least 2 cells and 2 variables.")
    get_logger().info(f"computing {n_comps} principal components of X (no 'X_pca' in obsm)")
    if is_backed_matrix(X):
        W64, mean = _backed_pca(X, n_comps, where)
        W = np.ascontiguousarray(W64, dtype=np.float32)
        offset = (mean @ W64).astype(np.float32)
        rep = np.empty((X.shape[0], n_comps), dtype=np.float32)
        for rows, block in row_blocks(X, where=where):  # a second pass: the scores, as a model computes them
            rep[rows] = np.asarray(block @ W, dtype=np.float32) - offset
        return rep, f"pca(X, {n_comps})", W, offset
    check_finite(X, where)
    import scanpy as sc

    Xf = X.astype(np.float32) if sparse.issparse(X) else np.asarray(X, dtype=np.float32)
    rep, comps, _, _ = sc.pp.pca(Xf, n_comps=n_comps, random_state=random_state, return_info=True)
    W = np.ascontiguousarray(comps.T, dtype=np.float32)
    mean = np.asarray(Xf.mean(0), dtype=np.float64).ravel()
    offset = (mean @ W).astype(np.float32)
    if projected:
        rep = np.asarray(Xf @ W, dtype=np.float32) - offset
    return np.ascontiguousarray(rep, dtype=np.float32), f"pca(X, {n_comps})", W, offset


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
            rep, name, _, _ = pca_on_the_fly(adata.X, n_pcs, random_state=random_state)
            return rep, name
    if use_rep == "X":
        X = adata.X
        where = "adata.X"
    else:
        if not isinstance(use_rep, str):
            raise TypeError(f"`use_rep` must be a string key of adata.obsm or 'X', got {type(use_rep).__name__}.")
        check_key(adata.obsm, use_rep, arg="use_rep", where="adata.obsm")
        X = adata.obsm[use_rep]
        where = f"adata.obsm[{use_rep!r}]"
    if X is None:
        raise ValueError(f"{where} is empty (None).")
    if hasattr(X, "to_numpy"):  # a DataFrame in obsm
        X = X.to_numpy()
    if is_backed_matrix(X):
        X = read_rows(X, where=where)  # a dense copy is made below anyway
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


def network_input(
    adata: AnnData, use_rep: str | None, n_pcs: int | None, *, random_state: int = 0
) -> tuple[np.ndarray, dict[str, Any], np.ndarray | None, np.ndarray | None]:
    """The input of a network that must embed new cells later: the representation, what it is, and a projection.

    As :func:`get_representation`, but a PCA computed on the fly keeps its loadings and offset (and its rep is
    exactly their projection), and scanpy's ``varm["PCs"]`` are kept when they reproduce ``obsm["X_pca"]`` from
    ``X``. Returns ``(rep, {"input", "rep_name"}, loadings or None, offset or None)``.
    """
    pca_key = use_rep if use_rep is not None else (REP_PCA if REP_PCA in adata.obsm else None)
    if pca_key is None and adata.n_vars >= N_VARS_USE_X:
        rep, name, W, offset = pca_on_the_fly(adata.X, n_pcs, random_state=random_state, projected=True)
        return rep, {"input": "pca", "rep_name": name}, W, offset
    X, rep_name = get_representation(adata, use_rep if pca_key is None else pca_key, n_pcs, random_state=random_state)
    if pca_key is None:
        return X, {"input": "X", "rep_name": rep_name}, None, None
    W = offset = None
    pcs = adata.varm.get("PCs") if pca_key == REP_PCA else None
    if pcs is not None and pcs.shape[1] >= X.shape[1]:
        # scanpy's loadings: keep them if they reproduce obsm["X_pca"] from X (i.e. X is what the PCA saw)
        W = np.ascontiguousarray(np.asarray(pcs)[:, : X.shape[1]], dtype=np.float32)
        total = np.zeros(adata.n_vars)
        for _, block in row_blocks(adata.X):
            total += np.asarray(block.sum(0), dtype=np.float64).ravel()
        offset = ((total / adata.n_obs) @ W).astype(np.float32)
        rows = slice(0, min(adata.n_obs, 200))
        head = adata.X[rows]
        head = head.toarray() if sparse.issparse(head) else np.asarray(head)
        recomputed = head.astype(np.float32) @ W - offset
        scale = float(np.abs(X[rows]).max()) or 1.0
        if not np.allclose(recomputed, X[rows], atol=1e-3 * scale):
            W = offset = None
    return X, {"input": f"obsm:{pca_key}", "rep_name": rep_name}, W, offset
