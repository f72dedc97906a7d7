from __future__ import annotations

import math
import numbers
import time
from typing import Any

import numpy as np
import torch
from anndata import AnnData
from scipy import sparse

from .._constants import AFFINITY, NEURALEE
from .._engine.ee_objective import REPULSIONS
from .._engine.models.neuralee import NeuralEEModel
from .._engine.neuralee import BATCH_AFFINITIES, INITS, fit_neuralee
from .._utils import (
    check_adata,
    check_bool,
    check_finite,
    check_in_range,
    check_int_sequence,
    check_n_jobs,
    check_optional_bool,
    check_positive_int,
    copy_adata,
    network_input,
    output_keys,
    renamed_parameters,
    resolve_device,
    seeded_torch,
    shared_docs,
)
from .._utils._random import seed_int
from ..pp._affinity import stored_affinities, tool_affinities

#: ``batch_size=None`` trains full batch up to this many cells: there an exact epoch (O(N²) pair terms, in tiles)
#: costs about what a mini-batch epoch costs, and the exact gradient avoids the seed-dependent minima of mini-batches
AUTO_FULL_BATCH = 10_000
#: ``batch_size=None``: cells per mini-batch beyond :data:`AUTO_FULL_BATCH`
AUTO_BATCH = 1024
#: ``n_subsample=None``: above this many cells, train on this many first (openTSNE's large-data recipe)
AUTO_SUBSAMPLE = 100_000
#: ``max_epochs=None``: at most 500 epochs and at most this many optimiser steps in the main phase
AUTO_STEPS, AUTO_EPOCHS = 5000, 500


def default_max_epochs(n_train: int, batch_size: int) -> int:
    """Epochs of the main phase for ``max_epochs=None``: ``min(500, ceil(5000 · batch_size / n_train))``.

    In full batch, and up to 10,240 cells in batches of 1,024, that is the original's 500 epochs. Beyond, the
    budget is counted in optimiser steps: every step draws fresh cells and fresh neighbours, so a larger data set
    does not need more steps to converge from the pre-fitted start, and 500 passes over it would only cost time in
    proportion.
    """
    return max(1, min(AUTO_EPOCHS, math.ceil(AUTO_STEPS * batch_size / max(n_train, 1))))


def _resolve_batch_size(batch_size: int | float | None, n: int) -> int:
    if batch_size is None:
        return n if n <= AUTO_FULL_BATCH else AUTO_BATCH
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Real):
        raise TypeError(
            f"`batch_size` must be an int (cells), a float in (0, 1] (fraction) or None, got {batch_size!r}."
        )
    if isinstance(batch_size, numbers.Integral):
        if not 2 <= batch_size:
            raise ValueError(f"`batch_size` must be at least 2 cells, got {batch_size}.")
        return min(int(batch_size), n)
    if not (0 < batch_size <= 1) or not np.isfinite(batch_size):
        raise ValueError(f"`batch_size` as a fraction must lie in (0, 1], got {batch_size}.")
    b = int(round(batch_size * n))
    if b < 2:
        raise ValueError(f"`batch_size={batch_size}` gives {b} cell(s) per batch for {n} cells; at least 2 are needed.")
    return b


@renamed_parameters(N_small="batch_size", maxit="max_epochs", refine_epochs="refine_max_epochs")
@shared_docs
def neuralee(
    adata: AnnData,
    n_components: int = 2,
    *,
    lam: float = 1.0,
    perplexity: float = 30.0,
    use_rep: str | None = None,
    n_pcs: int | None = None,
    batch_size: int | float | None = None,
    max_epochs: int | None = None,
    lr: float = 0.01,
    hidden: tuple[int, ...] | list[int] = (128, 128),
    repulsion: str = "distance",
    init: str | np.ndarray | None = None,
    batch_affinity: str = "graph",
    n_subsample: int | None = None,
    refine_max_epochs: int = 10,
    early_exaggeration: float = 1.0,
    exaggeration_epochs: int = 0,
    patience: int | None = 50,
    affinity_key: str = AFFINITY,
    n_jobs: int | None = None,
    device: str = "auto",
    random_state: int | None = 0,
    show_progress: bool | None = None,
    key_added: str = NEURALEE,
    return_model: bool = False,
    copy: bool = False,
) -> AnnData | NeuralEEModel | tuple[AnnData, NeuralEEModel] | None:
    """NeuralEE: a neural network trained on the Elastic Embedding objective (Xiong et al., Frontiers in Genetics 2020).

    A network f_θ (as in the original: two hidden layers with BatchNorm and ReLU, here 128 units wide) maps each cell's
    input representation x to its embedding y = f_θ(x); θ minimises the EE objective

    E(Y) = Σ W⁺_nm ‖y_n − y_m‖² + λ Σ W⁻_nm exp(−‖y_n − y_m‖²),

    with W⁺ the entropic affinities (:func:`scembed.pp.affinity`) and W⁻ the squared input distances (default, as
    the original and :func:`scembed.tl.ee`) or uniform. Because the embedding is a function, new cells are embedded
    by the trained model (``return_model=True``).

    The objective is not convex: which minimum training reaches, and with it where the clusters lie relative to
    each other, is decided by the start. So the network is first pre-fitted (a regression, ``init``) to the layout
    :func:`scembed.tl.ee` starts from — the Laplacian eigenmaps of the affinities — and only then trained on E. With
    the same W⁻ and the same start, the network minimises the same objective as :func:`scembed.tl.ee` from the same
    place, and reaches a comparable value and layout; random weights start from a random projection of the input
    instead, and the clusters' arrangement then follows that projection.

    Training, by ``batch_size``:

    - **full batch** (``batch_size`` covers every cell): each epoch evaluates E on all cells with the sparse affinity
      graph ``obsp[affinity_key]`` (computed with :func:`scembed.pp.affinity` if missing) and a tiled repulsion;
    - **mini-batches**: every epoch draws fresh random batches of ``batch_size`` cells. With
      ``batch_affinity="graph"`` (default) each batch cell draws a few neighbours from the global sparse affinity
      graph (unbiased estimate of the attraction of all cells), and repulsion acts between all pairs of the
      batch: a stochastic gradient of the EE objective of all N cells. With ``batch_affinity="batch"`` the
      affinities are recomputed among the batch's cells on the device (exact kNN in the batch + entropic
      calibration, as the original did on its fixed partitions): no global graph is needed at all. Host memory is
      O(N·D + N·k) in both; nothing of size N·batch_size is stored. ``"graph"`` is the default because it
      optimises the EE objective of all cells; it also measured faster and more faithful (the project's
      ``benchmarks/README.md``), as the per-batch kNN search and calibration dominate a ``"batch"`` step.
    - **large data** (openTSNE's recipe): with ``n_subsample`` < N (default: 100,000 cells once N exceeds that),
      the network is trained on a random subsample (with its own affinities), then every cell is mapped through
      it and training is refined on all cells for ``refine_max_epochs`` epochs.

    Names differ from the original's where scembed's vocabulary is shared by all tools: ``batch_size`` is the
    original's ``N_small``, ``max_epochs`` its ``maxit``; ``n_components`` its ``d``.

    Parameters
    ----------
    adata
        Annotated data matrix.
    n_components
        Embedding dimension (the original's ``d``).
    lam
        Weight λ of the repulsion (the original's ``lam``).
    perplexity
        Perplexity of the entropic affinities (used when they are computed here or inside batches).
    use_rep
        Input representation: a key of ``adata.obsm`` or ``"X"``. ``None``: ``obsm["X_pca"]``, else ``X`` when it
        has fewer than 50 variables, else a 50-component PCA of ``X`` computed here (its loadings are kept in the
        model, so that :meth:`NeuralEEModel.transform` projects new cells the same way).
    n_pcs
        Use only the first ``n_pcs`` columns of the representation.
    batch_size
        Cells per mini-batch, as an int or a fraction of the cells (the original's ``N_small``); ``1.0`` or ≥
        ``n_obs`` trains full batch. ``None``: full batch up to 10,000 cells, mini-batches of 1,024 beyond. Full
        batch is the default wherever it is affordable because its gradient is exact: mini-batch noise sent
        training from the same start to different minima with different seeds, which the exact gradient avoided
        on the benchmark data (``benchmarks/README.md``). An exact epoch costs O(N²) pair terms (in tiles, O(N)
        memory), a mini-batch epoch O(N · 1,024): up to about 10,000 cells the two cost about the same, and
        beyond, the exact epoch's share grows in proportion to N (twice the mini-batch epoch at 16,384 cells).
    max_epochs
        Maximum number of epochs (passes over the training cells; the original's ``maxit``) of the main phase.
        Training stops earlier at a loss plateau (see ``patience``). ``None``: the original's 500 epochs, but at
        most 5,000 optimiser steps, ``min(500, ceil(5000 · batch_size / n_train))`` with ``n_train`` the cells
        of the main phase (``n_subsample``): 500 up to 10,240 cells in batches of 1,024, 52 for 100,000. Every
        mini-batch step draws fresh cells and neighbours, so more cells do not need more steps from the
        pre-fitted start; the benchmarks (``benchmarks/README.md``) measure the quality at 100,000 cells.
    lr
        Adam learning rate (the original's 0.01).
    hidden
        Hidden layer sizes. The default is wider than the original's (50, 50): ReLU silences about half of a layer's
        units for any one cell, so a layer needs more than twice the input's 50 dimensions to pass every input
        direction on; with 50 units the network's 10-NN accuracy stayed below :func:`scembed.tl.ee`'s on the
        same cells, with 128 it matches it (``benchmarks/README.md``). In full batch the width costs little
        beside the O(N²) repulsion; in mini-batches it adds to every step (the benchmarks time it at 100,000 cells).
    repulsion
        W⁻: ``"distance"`` (squared input distances, normalised to sum 1: the original's, and the default of
        :func:`scembed.tl.ee`, so that both tools minimise one objective and can be compared by its value) or
        ``"uniform"`` (every pair alike).
    init
        Layout the network is pre-fitted to before training: ``"spectral"`` (Laplacian eigenmaps of the training
        cells' affinities: :func:`scembed.tl.ee`'s start; in the large-data recipe those of the subsample's own
        graph, O(N·k)), ``"pca"`` (the first principal components of the input), an ``(n_obs, n_components)``
        array (used as it is, e.g. an embedding to reproduce), or ``"random"`` (no pre-fit: the original's random
        weights). ``None``: ``"spectral"``, or ``"pca"`` with ``batch_affinity="batch"``, which builds no graph. A
        named layout is centred and scaled so that its first coordinate has standard deviation 1, the length scale
        of the kernel exp(−‖y_n − y_m‖²): there the repulsion acts at once, while a tiny start (:func:`scembed.tl.ee`
        uses 1e-4) would first have to be blown up by four orders of magnitude through the network's weights. The
        pre-fit runs Adam on the squared error until it is below 0.1 % of the layout's variance (or 500 steps);
        ``uns[key]["prefit_residual"]`` records what remained.
    batch_affinity
        ``"graph"`` or ``"batch"``: how mini-batches get their attraction (see above).
    n_subsample
        Cells to train on first in the large-data recipe; ``None``: ``min(n_obs, 100000)``.
    refine_max_epochs
        Maximum epochs on all cells after the subsample phase (only when ``n_subsample`` < ``n_obs``).
    early_exaggeration
        Factor multiplying the attraction during the first ``exaggeration_epochs`` epochs.
    exaggeration_epochs
        Epochs of early exaggeration (0: none). Off by default: unlike t-SNE, the network's smoothness already
        keeps clusters together, and exaggeration measured worse on the benchmark data (``benchmarks/README.md``).
    patience
        Epochs without improvement that make a plateau (``None``: run ``max_epochs`` epochs at ``lr``). At a
        plateau, training goes back to the best epoch's weights and continues with the learning rate divided by 4;
        the third plateau stops it. A mini-batch gradient is noisy, and Adam then hovers at a distance from the
        minimum that scales with the step size: the smaller steps go further down, where a stop at the first
        plateau would leave the objective a few per cent above that of the full-batch optimum.
    affinity_key
        ``obsp`` key of the affinity graph to use (checked: square, finite, non-negative, not all zero), and where
        it is stored when computed here.
    n_jobs
        Threads of the neighbour search (``None``: all cores).
    {doc_trainer_tail}

    Returns
    -------
    `None`, or the new `AnnData` if `copy=True`; with `return_model=True` the model (alone, or `(adata, model)`
    with `copy=True`). Sets the following fields:

    `adata.obsm['X_neuralee' | 'X_' + key_added]` : :class:`numpy.ndarray` (dtype `float32`)
        The embedding, ``(n_obs, n_components)``.
    `adata.uns['neuralee' | key_added]` : `dict`
        `params` (the call's resolved parameters; `init` the layout used), `prefit_residual` (the pre-fit's
        squared error relative to the layout's variance; NaN without a pre-fit), `history` (`loss`: the EE
        objective per epoch; mini-batch epochs report the mean of their batch estimates), `phase` (per epoch,
        0: main/subsample phase, 1: refinement), `n_epochs`, `mode` (``"full"``, ``"graph"`` or ``"batch"``),
        `input` (the representation the network reads), `seconds` (wall time of each part: `affinity` of all
        cells and `subsample_affinity` where computed here, `init_layout`, `prefit`, `train`, `refine`,
        `batchnorm`, mapping every cell `embed`, and the `total`; parts that did not run are absent).
    `adata.obsp['affinity' | affinity_key]`, `adata.uns['affinity' | affinity_key]`
        Only when the global affinities were needed and absent (as :func:`scembed.pp.affinity` writes them).

    Examples
    --------
    >>> import scanpy as sc, scembed as se
    >>> adata = sc.datasets.pbmc68k_reduced()
    >>> model = se.tl.neuralee(adata, return_model=True)  # doctest: +SKIP
    >>> sc.pl.embedding(adata, basis="neuralee", color="bulk_labels")  # doctest: +SKIP
    >>> new_coords = model.transform(other_adata)  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    opts = _check_options(
        adata,
        n_components=n_components,
        lam=lam,
        perplexity=perplexity,
        batch_size=batch_size,
        max_epochs=max_epochs,
        lr=lr,
        hidden=hidden,
        repulsion=repulsion,
        init=init,
        batch_affinity=batch_affinity,
        n_subsample=n_subsample,
        refine_max_epochs=refine_max_epochs,
        early_exaggeration=early_exaggeration,
        exaggeration_epochs=exaggeration_epochs,
        patience=patience,
        affinity_key=affinity_key,
        return_model=return_model,
        copy=copy,
        show_progress=show_progress,
        n_jobs=n_jobs,
    )
    keys = output_keys(key_added)
    dev = resolve_device(device)
    seed = seed_int(random_state)
    n = adata.n_obs
    P = stored_affinities(adata, affinity_key)
    X, source, W, offset = network_input(adata, use_rep, n_pcs, random_state=seed)
    affinities, new_affinity = _affinity_path(opts["perplexity"], source["rep_name"], n, n_jobs, dev, seed)
    full = opts["batch_size"] >= n
    with seeded_torch(seed, dev):
        net, info = fit_neuralee(
            X,
            P=P,
            affinities=affinities,
            batch_size=None if full else opts["batch_size"],
            device=dev,
            random_state=seed,
            show_progress=show_progress,
            **{k: opts[k] for k in _ENGINE_OPTIONS},
        )
    params = {**opts, "hidden": list(opts["hidden"]), "patience": -1 if patience is None else opts["patience"]}
    params["init"] = info["init"]
    params.update(use_rep="" if use_rep is None else use_rep, n_pcs=-1 if n_pcs is None else int(n_pcs))
    params.update(affinity_key=affinity_key, random_state=seed, device=str(dev))
    model = _model(net, X, source, W, offset, adata, params)
    t_embed = time.perf_counter()
    Y = model.transform(X, device=dev)
    seconds = {**info["seconds"], "embed": time.perf_counter() - t_embed, "total": time.perf_counter() - t_start}

    adata = copy_adata(adata) if copy else adata
    adata.obsm[keys.obsm] = Y.astype(np.float32)
    adata.uns[keys.uns] = {
        "params": params,
        "history": {"loss": [float(v) for v in info["history"]["loss"]]},
        "phase": [int(v) for v in info["history"]["phase"]],
        "n_epochs": int(info["n_epochs"]),
        "mode": info["mode"],
        "input": source["rep_name"],
        "prefit_residual": float(info["prefit_residual"]),
        "seconds": {k: float(v) for k, v in seconds.items()},
    }
    if new_affinity:
        adata.obsp[affinity_key] = new_affinity["P"]
        adata.uns[affinity_key] = new_affinity["uns"]
    if return_model:
        return (adata, model) if copy else model
    return adata if copy else None


#: options passed to the engine as they are
_ENGINE_OPTIONS = (
    "n_components",
    "lam",
    "perplexity",
    "repulsion",
    "batch_affinity",
    "n_subsample",
    "max_epochs",
    "refine_max_epochs",
    "lr",
    "hidden",
    "early_exaggeration",
    "exaggeration_epochs",
    "patience",
    "init",
)


def _affinity_path(
    perplexity: float, rep_name: str, n: int, n_jobs: int | None, dev: torch.device, seed: int
) -> tuple[Any, dict[str, Any]]:
    """The engine's ``affinities`` function (the one path of ``pp.affinity``) and where the graph of all cells is kept.

    The perplexity is lowered just below the number of neighbours for a small subsample (never for all cells, where
    it was checked against ``n_obs``).
    """
    kept: dict[str, Any] = {}

    def affinities(rep: np.ndarray) -> sparse.csr_matrix:
        k = min(int(3 * perplexity), rep.shape[0] - 1)
        P_rep, record = tool_affinities(
            rep,
            rep_name,
            perplexity=min(perplexity, k - 1e-3),
            use_rep="X",
            n_jobs=n_jobs,
            device=dev,
            random_state=seed,
        )
        if rep.shape[0] == n:
            record["params"]["perplexity"] = perplexity
            kept.update(P=P_rep, uns=record)
        return P_rep

    return affinities, kept


def _check_init(init: Any, n: int, n_components: int, batch_affinity: str, full: bool) -> Any:
    """``init`` as the engine takes it: None, a name, or a float32 ``(n_obs, n_components)`` array."""
    if init is None:
        return None
    if isinstance(init, str):
        if init not in INITS:
            raise ValueError(f"`init` must be one of {INITS}, an array or None, got {init!r}.")
        if init == "spectral" and batch_affinity == "batch" and not full:
            raise ValueError("`init='spectral'` needs the affinity graph, which `batch_affinity='batch'` never builds.")
        return init
    if isinstance(init, bool) or not hasattr(init, "__len__"):
        raise TypeError(f"`init` must be one of {INITS}, an array or None, got {type(init).__name__}.")
    arr = np.asarray(init.cpu() if isinstance(init, torch.Tensor) else init, dtype=np.float32)
    if arr.shape != (n, n_components):
        raise ValueError(f"`init` must have shape ({n}, {n_components}), got {arr.shape}.")
    check_finite(arr, "`init`")
    return arr


def _check_options(adata: AnnData, **o: Any) -> dict[str, Any]:
    """Validate every option before any work; returns the resolved values (as recorded in ``uns``)."""
    check_adata(adata, min_obs=4)
    n = adata.n_obs
    out: dict[str, Any] = {}
    out["n_components"] = check_positive_int(o["n_components"], "n_components")
    out["lam"] = check_in_range(o["lam"], "lam", low=0, low_inclusive=False)
    out["perplexity"] = check_in_range(o["perplexity"], "perplexity", low=0, low_inclusive=False)
    if out["perplexity"] >= n - 1:
        raise ValueError(f"`perplexity={out['perplexity']:g}` must be smaller than n_obs - 1 = {n - 1}.")
    out["batch_size"] = _resolve_batch_size(o["batch_size"], n)
    n_sub = min(n, AUTO_SUBSAMPLE) if o["n_subsample"] is None else check_positive_int(o["n_subsample"], "n_subsample")
    out["n_subsample"] = min(n_sub, n)
    if o["max_epochs"] is None:
        out["max_epochs"] = default_max_epochs(out["n_subsample"], out["batch_size"])
    else:
        out["max_epochs"] = check_positive_int(o["max_epochs"], "max_epochs")
    out["lr"] = check_in_range(o["lr"], "lr", low=0, low_inclusive=False)
    out["hidden"] = check_int_sequence(o["hidden"], "hidden", allow_empty=True)  # () is a linear map
    for flag in ("return_model", "copy"):
        check_bool(o[flag], flag)
    check_optional_bool(o["show_progress"], "show_progress")
    check_n_jobs(o["n_jobs"])
    if o["repulsion"] not in REPULSIONS:
        raise ValueError(f"`repulsion` must be one of {REPULSIONS}, got {o['repulsion']!r}.")
    if o["batch_affinity"] not in BATCH_AFFINITIES:
        raise ValueError(f"`batch_affinity` must be one of {BATCH_AFFINITIES}, got {o['batch_affinity']!r}.")
    out["repulsion"], out["batch_affinity"] = o["repulsion"], o["batch_affinity"]
    out["init"] = _check_init(o["init"], n, out["n_components"], out["batch_affinity"], out["batch_size"] >= n)
    if out["n_subsample"] < out["batch_size"]:
        raise ValueError(f"`n_subsample={out['n_subsample']}` must be at least `batch_size={out['batch_size']}`.")
    out["refine_max_epochs"] = check_positive_int(o["refine_max_epochs"], "refine_max_epochs", minimum=0)
    out["early_exaggeration"] = check_in_range(
        o["early_exaggeration"], "early_exaggeration", low=0, low_inclusive=False
    )
    out["exaggeration_epochs"] = check_positive_int(o["exaggeration_epochs"], "exaggeration_epochs", minimum=0)
    out["patience"] = None if o["patience"] is None else check_positive_int(o["patience"], "patience")
    if not isinstance(o["affinity_key"], str) or not o["affinity_key"]:
        raise TypeError(f"`affinity_key` must be a non-empty string, got {o['affinity_key']!r}.")
    return out


def _model(net, X: np.ndarray, source: dict, W, offset, adata: AnnData, params: dict) -> NeuralEEModel:
    metadata = {
        "input": source["input"],
        "rep_name": source["rep_name"],
        "n_inputs": int(X.shape[1]),
        "n_components": params["n_components"],
        "hidden": list(params["hidden"]),
        "var_names": list(map(str, adata.var_names)),
        "params": params,
    }
    return NeuralEEModel(
        net.cpu(),
        metadata,
        loadings=None if W is None else torch.from_numpy(W),
        offset=None if offset is None else torch.from_numpy(offset),
    )
