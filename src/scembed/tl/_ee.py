from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._constants import AFFINITY, EE
from .._engine.ee import INITS, SOLVERS, initial_embedding, optimize_ee
from .._engine.ee_objective import REPULSIONS, EEObjective
from .._utils import (
    OutputKeys,
    check_adata,
    check_bool,
    check_finite,
    check_in_range,
    check_optional_bool,
    check_positive_int,
    copy_adata,
    get_logger,
    get_representation,
    output_keys,
    resolve_device,
    shared_docs,
)
from .._utils._random import seed_int
from ..pp._affinity import stored_affinities, tool_affinities


@shared_docs
def ee(
    adata: AnnData,
    n_components: int = 2,
    *,
    lam: float = 1.0,
    affinity_key: str = AFFINITY,
    perplexity: float = 30.0,
    repulsion: str = "distance",
    init: str | np.ndarray = "spectral",
    use_rep: str | None = None,
    maxiter: int = 200,
    tol: float = 1e-5,
    solver: str = "auto",
    device: str = "auto",
    random_state: int | None = 0,
    show_progress: bool | None = None,
    key_added: str = EE,
    copy: bool = False,
) -> AnnData | None:
    """Exact Elastic Embedding, optimised with the spectral direction.

    Minimises E(Y) = Σ W⁺_nm ‖y_n − y_m‖² + λ Σ W⁻_nm exp(−‖y_n − y_m‖²) (Carreira-Perpiñán 2010) over the
    embedding Y, with W⁺ the sparse entropic affinities. The repulsion is summed over all pairs exactly, in tiles
    on the device (O(N) memory; no N×N matrix is ever stored). Each iteration solves (4L⁺ + μI) p = −∇E for the
    spectral direction (Vladymyrov & Carreira-Perpiñán 2012) — a sparse LU factorised once, or conjugate gradients
    warm-started on the device for large N — followed by a backtracking line search whose step may grow again.
    Measured quality and speed of the options are in the project's ``benchmarks/README.md``.

    Parameters
    ----------
    adata
        Annotated data matrix.
    n_components
        Dimension of the embedding (at most ``n_obs - 1`` with ``init="spectral"``).
    lam
        Weight λ > 0 of the repulsion: larger values spread clusters further apart.
    affinity_key
        Key of the affinities W⁺ in ``adata.obsp`` (checked: square, finite, non-negative, not all zero). When
        absent they are computed as :func:`scembed.pp.affinity` does (``perplexity``, ``use_rep``) and stored
        there as well.
    perplexity
        Perplexity of the affinities, used only when they are computed here. Smaller values favour local
        structure.
    repulsion
        Repulsive weights W⁻: ``"distance"`` (the original's: squared input distances ‖x_n − x_m‖², normalised
        to sum 1) or ``"uniform"`` (1 / (N(N − 1))). The default is the original's objective, so results compare
        directly. Its input distances are recomputed in every tile beyond ~11,000 cells (kept below), which costs
        O(N²·D) per evaluation, about twice the time of ``"uniform"`` (O(N²·d)): prefer ``"uniform"`` for very
        large N.
    init
        ``"spectral"`` (Laplacian eigenmaps of W⁺), ``"pca"`` (of the representation), ``"random"``, a key of
        ``adata.obsm``, or an ``(n_obs, n_components)`` array. Named initialisations are centred and scaled to a
        standard deviation of 1e-4; an obsm key or array is used as given.
    use_rep
        Representation for the affinities, ``init="pca"`` and ``repulsion="distance"``: a key of ``adata.obsm``
        or ``"X"``; ``None`` takes ``obsm["X_pca"]`` (or ``X`` / a PCA of ``X``, as in :func:`scembed.pp.affinity`).
    maxiter
        Maximum number of iterations of the optimiser.
    tol
        Stop when the relative change of the embedding, ‖Y_new − Y‖ / ‖Y‖, falls below ``tol``.
    solver
        Linear solver of the spectral direction: ``"splu"`` (sparse LU factorised once, on the CPU), ``"cg"``
        (Jacobi-preconditioned conjugate gradients on the device, warm-started) or ``"auto"`` (``"splu"`` up to
        10,000 cells, ``"cg"`` beyond, where the factor of a kNN graph fills in).
    {doc_device}
    {doc_random_state}
    {doc_show_progress}
    {doc_key_added}
    {doc_copy}

    Returns
    -------
    Returns `None` if `copy=False`, else a new `AnnData`. Sets the following fields:

    `adata.obsm['X_ee' | 'X_' + key_added]` : :class:`numpy.ndarray` (dtype `float32`)
        The embedding, ``(n_obs, n_components)``.
    `adata.uns['ee' | key_added]` : `dict`
        `params` (the call's parameters), `history` (`objective`: E at the start and after every iteration, never
        increasing; `step`: the accepted line-search steps), `objective`, `step`, `n_iter`, `n_evaluations`,
        `n_gradient_fallbacks` (times the spectral line search failed and the gradient was tried instead),
        `converged`, `stop_reason`, `solver`, `mu`, `time` (seconds) and, with CG, `cg_iterations`.
    `adata.obsp[affinity_key]`, `adata.uns[affinity_key]`
        Only when the affinities were computed here (see :func:`scembed.pp.affinity`).

    Examples
    --------
    >>> import scanpy as sc, scembed as se
    >>> adata = sc.datasets.pbmc68k_reduced()
    >>> se.tl.ee(adata)
    >>> sc.pl.embedding(adata, basis="ee", color="bulk_labels")  # doctest: +SKIP
    """
    check_adata(adata, min_obs=3)
    n = adata.n_obs
    n_components = check_positive_int(n_components, "n_components")
    lam = check_in_range(lam, "lam", low=0, low_inclusive=False)
    perplexity = check_in_range(perplexity, "perplexity", low=0, low_inclusive=False)
    maxiter = check_positive_int(maxiter, "maxiter")
    tol = check_in_range(tol, "tol", low=0)
    check_bool(copy, "copy")
    check_optional_bool(show_progress, "show_progress")
    if repulsion not in REPULSIONS:
        raise ValueError(f"`repulsion` must be one of {REPULSIONS}, got {repulsion!r}.")
    if solver not in SOLVERS:
        raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}.")
    if not isinstance(affinity_key, str) or not affinity_key:
        raise TypeError(f"`affinity_key` must be a non-empty string, got {affinity_key!r}.")
    keys = output_keys(key_added)
    dev = resolve_device(device)
    seed = seed_int(random_state)
    log = get_logger()
    Y_given, init_name = _given_init(adata, init, n_components)
    P = stored_affinities(adata, affinity_key)
    if P is None and perplexity >= n - 1:
        raise ValueError(f"`perplexity={perplexity:g}` must be smaller than n_obs - 1 = {n - 1}.")
    need_rep = P is None or init_name == "pca" or repulsion == "distance"
    X, rep_name = get_representation(adata, use_rep, random_state=seed) if need_rep else (None, "")
    if init_name == "pca" and X.shape[1] < n_components:
        raise ValueError(f"init='pca' needs at least {n_components} dimensions in {rep_name}, got {X.shape[1]}.")

    t0 = time.perf_counter()
    new_affinity = None
    if P is None:
        P, new_affinity = tool_affinities(
            X, rep_name, perplexity=perplexity, use_rep=use_rep, n_jobs=None, device=dev, random_state=seed
        )
    Y0 = Y_given if Y_given is not None else initial_embedding(init_name, n_components, P=P, X=X, random_state=seed)
    objective = EEObjective(P, lam=lam, repulsion=repulsion, X=X, device=dev)
    Y0 = torch.as_tensor(Y0, dtype=torch.float32, device=dev)
    Y, info = optimize_ee(objective, Y0, P=P, solver=solver, maxiter=maxiter, tol=tol, show_progress=show_progress)
    info["time"] = time.perf_counter() - t0
    log.info(
        f"EE: {info['n_iter']} iterations, objective {info['objective'][-1]:.6g}, {info['stop_reason']} "
        f"({info['time']:.1f} s)"
    )
    params = {
        "n_components": n_components,
        "lam": lam,
        "affinity_key": affinity_key,
        "perplexity": perplexity,
        "repulsion": repulsion,
        "init": init_name,
        "use_rep": rep_name,
        "maxiter": maxiter,
        "tol": tol,
        "solver": solver,
        "device": str(dev),
        "random_state": seed,
    }
    adata = copy_adata(adata) if copy else adata
    if new_affinity is not None:
        adata.obsp[affinity_key] = P
        adata.uns[affinity_key] = new_affinity
        log.info(f"stored the affinities in adata.obsp[{affinity_key!r}]")
    _write(adata, keys, Y.cpu().numpy().astype(np.float32), params, info)
    return adata if copy else None


def _given_init(adata: AnnData, init: Any, n_components: int) -> tuple[np.ndarray | None, str]:
    """The initialisation given as data (obsm key or array), checked; or None and the named method."""
    n = adata.n_obs
    Y_given: np.ndarray | None = None
    if isinstance(init, str) and init not in INITS:
        if init not in adata.obsm:
            raise KeyError(f"`init={init!r}` is neither one of {INITS} nor a key of adata.obsm.")
        Y_given, init_name = np.asarray(adata.obsm[init]), f"obsm[{init!r}]"
    elif not isinstance(init, str):
        if not isinstance(init, np.ndarray | pd.DataFrame | list | torch.Tensor):
            raise TypeError(f"`init` must be one of {INITS}, an obsm key or an array, got {type(init).__name__}.")
        Y_given, init_name = np.asarray(init.cpu() if isinstance(init, torch.Tensor) else init), "array"
    else:
        init_name = init
    if Y_given is not None:
        if Y_given.shape != (n, n_components):
            raise ValueError(f"`init` must have shape ({n}, {n_components}), got {Y_given.shape}.")
        check_finite(Y_given, "`init`")
    if init_name == "spectral" and n_components > n - 1:
        raise ValueError(
            f"`n_components={n_components}` is too large for init='spectral' on {n} cells: Laplacian eigenmaps give "
            f"at most n_obs - 1 = {n - 1} dimensions; lower `n_components` or pass init='random' or an array."
        )
    return Y_given, init_name


def _write(adata: AnnData, keys: OutputKeys, Y: np.ndarray, params: dict, info: dict) -> None:
    """Store the embedding in ``obsm["X_" + key]`` and the record (params, history, diagnostics) in ``uns[key]``."""
    objective = np.asarray(info["objective"], dtype=np.float64)
    step = np.asarray(info["step"], dtype=np.float64)
    adata.obsm[keys.obsm] = Y
    record = {
        "params": params,
        "history": {"objective": objective},
        "objective": objective,
        "step": step,
        "n_iter": int(info["n_iter"]),
        "n_evaluations": int(info["n_evaluations"]),
        "n_gradient_fallbacks": int(info["n_gradient_fallbacks"]),
        "converged": bool(info["converged"]),
        "stop_reason": str(info["stop_reason"]),
        "solver": str(info["solver"]),
        "mu": float(info["mu"]),
        "time": float(info["time"]),
    }
    if "cg_iterations" in info:
        record["cg_iterations"] = np.asarray(info["cg_iterations"], dtype=np.int64)
    adata.uns[keys.uns] = record
