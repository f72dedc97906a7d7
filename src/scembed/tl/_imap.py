from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse

from .._constants import IMAP
from .._engine import imap as engine
from .._utils import (
    check_adata,
    check_finite,
    check_in_range,
    check_key,
    check_positive_int,
    get_logger,
    resolve_device,
    seeded_torch,
)
from .._utils._random import seed_int

METRICS = {"angular": "cosine", "cosine": "cosine", "euclidean": "euclidean"}
KNN_METHODS = ("annoy", "exact")


def imap_integrate(
    adata: AnnData,
    batch_key: str = "batch",
    *,
    layer: str | None = None,
    use_hvg: bool = True,
    n_top_genes: int = 2000,
    latent_dim: int = 256,
    stage1_epochs: int = 150,
    stage2_epochs: int = 150,
    lambda_content: float = 3.0,
    lambda_recon: float = 1.0,
    n_sample: int = 3000,
    k_within: int | None = None,
    k_mnn: int | None = None,
    walk_steps: int = 50,
    metric: str = "angular",
    knn_method: str = "annoy",
    order: Sequence | None = None,
    incremental: bool = False,
    n_critic: int = 10,
    stage1_batch_size: int = 512,
    stage2_batch_size: int = 1024,
    device: str = "auto",
    random_state: int | None = 0,
    key_added: str = IMAP,
    copy: bool = False,
    return_model: bool = False,
) -> AnnData | engine.IMAPModel | tuple[AnnData, engine.IMAPModel] | None:
    """Batch integration with iMAP (Wang et al. 2021) (two stages: content autoencoder, then adversarial correction).

    **Stage I** trains a content encoder E (genes→1024→512→``latent_dim``) and a batch-conditioned decoder
    Dec(c, b) = ReLU(G2([c; b]) + G1(b)) on batch-balanced *mixup* cells (random convex combinations of two cells
    of the same batch, 512 per batch and step, 20 steps per epoch), minimising
    ``lambda_recon`` · MSE(Dec(E(x), b), x) + ``lambda_content`` · MSE(E(x), E(Dec(E(x), b̃))) with b̃ a random
    batch. E(x) is a batch-free content representation of every cell.

    **Stage II** takes the batch with the largest summed per-gene standard deviation as the anchor (or the first of
    ``order``). For every other batch, on ≤ ``n_sample`` sampled cells of the anchor and of the query, in the
    stage-I space: mutual kNN graphs within each (``k_within``), mutual nearest neighbours between them
    (``k_mnn``), each MNN pair expanded by a ``walk_steps``-step random walk on the two graphs. A residual generator
    G(x) = ReLU(x + F(x)) is then trained with WGAN-GP (penalty 10) to map the query cells of this pool onto its
    anchor cells, and G corrects every cell of the query batch. Anchor cells are left unchanged.

    Cost is set by the epochs, not by the number of cells (every epoch sees a fixed number of samples), apart from
    encoding and correcting every cell once. Sparse input is densified one mini-batch at a time; the caller's
    ``X``, ``var`` and cell order are never modified.

    Parameters
    ----------
    adata
        Annotated data matrix with log-normalised expression (e.g. :func:`scanpy.pp.normalize_total` then
        :func:`scanpy.pp.log1p`) in ``X`` or ``layer``, dense or sparse.
    batch_key
        Column of ``adata.obs`` with the batch of every cell (strings, integers or categories; at least two
        batches, no missing values).
    layer
        Layer to read instead of ``X``.
    use_hvg
        Integrate only highly variable genes: those marked in ``var["highly_variable"]`` when that column exists,
        otherwise the ``n_top_genes`` selected per batch by :func:`scanpy.pp.highly_variable_genes`
        (``flavor="seurat"``, ``batch_key``) on a copy of the data. ``False``: use every gene.
    n_top_genes
        Number of genes to select when ``use_hvg`` and ``var`` has no ``"highly_variable"`` column.
    latent_dim
        Size of the stage-I content representation and of the generator's bottleneck.
    stage1_epochs
        Epochs of stage I (20 steps each).
    stage2_epochs
        Epochs of stage II per query batch (10 critic steps of 1024 cells each).
    lambda_content
        Weight of the content loss.
    lambda_recon
        Weight of the reconstruction loss.
    n_sample
        Cells sampled per batch for the neighbour search and the training pool of stage II.
    k_within
        Neighbours of the mutual kNN graphs within a batch. Default ``max(10, s // 100)`` with ``s`` the smallest
        sample size (the original uses ``s // 100``, which is 0 for batches under 100 cells); lowered, with a
        warning, when a batch has too few cells.
    k_mnn
        Neighbours searched between batches for the mutual nearest neighbours. Default ``max(1, k_within // 2)``.
    walk_steps
        Length of the random walk that expands every MNN pair (the start pair included).
    metric
        Distance in the stage-I space: ``"angular"`` (as annoy names the cosine distance; default), ``"cosine"``
        (the same) or ``"euclidean"``.
    knn_method
        Neighbour search: ``"annoy"`` (as the original) or ``"exact"`` (brute force).
    order
        Integration order as a list of batch labels, anchor first; default: decreasing total standard deviation.
    incremental
        Grow the anchor with every corrected batch, so later batches are corrected onto all earlier ones.
    n_critic
        Critic steps per generator step (the original: 10, one generator step per epoch).
    stage1_batch_size
        Mixup cells drawn per batch in every stage-I step (20 steps per epoch).
    stage2_batch_size
        Query and anchor cells drawn in every stage-II step (10 steps per epoch).
    device
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
    random_state
        Seed of all sampling and of the network initialisation (same seed and device → same result).
    key_added
        Names the outputs (see Returns).
    copy
        Return a modified copy instead of writing to ``adata``.
    return_model
        Also return the trained :class:`~scembed._engine.imap.IMAPModel` (encoder, decoder and the generator of
        every query batch, with ``encode(X)`` and ``correct(X, batch)`` for new cells of a known batch, given as
        log-normalised expression of ``model.genes``).

    Returns
    -------
    ``None`` if ``copy=False``, else a new `AnnData` (with ``return_model=True``: the model, or
    ``(adata, model)`` when ``copy=True``). Sets the following fields:

    `adata.obsm['X_imap' | 'X_' + key_added]` : :class:`numpy.ndarray` (dtype `float32`)
        Stage-I content representation, ``(n_obs, latent_dim)``, in the input cell order.
    `adata.layers['imap' | key_added]` : :class:`numpy.ndarray` or :class:`scipy.sparse.csr_matrix` (`float32`)
        Corrected expression of every gene (sparse when the input is): integrated genes corrected, the others
        copied from the input.
    `adata.var['imap_used' | key_added + '_used']` : `bool`
        Whether each gene was integrated.
    `adata.uns['imap' | key_added]` : `dict`
        `params`, `batches`, `order` (anchor first), `anchor`, `total_std` per batch, `n_genes_used`,
        `stage1` (per-epoch `loss`, `recon`, `content`), `stage2` (per query batch in order: `batches`,
        `n_mnn_pairs`, sample and pool sizes, and per-epoch `critic`, `wasserstein`, `penalty`, `generator`
        losses as ``(n_query, epochs)`` arrays).

    Examples
    --------
    >>> import scanpy as sc, scembed as se
    >>> adata = se.datasets.simulate(2000, 1000, n_batches=2, batch_scale=0.8)
    >>> sc.pp.normalize_total(adata)
    >>> sc.pp.log1p(adata)
    >>> se.tl.imap_integrate(adata, batch_key="batch", stage1_epochs=20, stage2_epochs=20)
    >>> sc.pp.pca(adata, layer="imap")
    """
    # ---- validate everything before any work
    check_adata(adata, min_obs=4)
    if not isinstance(key_added, str) or not key_added:
        raise TypeError(f"`key_added` must be a non-empty string, got {key_added!r}.")
    if not isinstance(batch_key, str):
        raise TypeError(f"`batch_key` must be a column name of adata.obs, got {batch_key!r}.")
    check_key(adata.obs, batch_key, arg="batch_key", where="adata.obs")
    if layer is not None:
        check_key(adata.layers, layer, arg="layer", where="adata.layers")
    X = adata.X if layer is None else adata.layers[layer]
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    if X is None:
        raise ValueError(f"{where} is empty.")
    check_finite(X, where)
    col = adata.obs[batch_key]
    if col.isna().any():
        raise ValueError(f"adata.obs[{batch_key!r}] has {int(col.isna().sum())} missing value(s).")
    cat = pd.Categorical(col).remove_unused_categories()
    batches = list(cat.categories)
    batch_idx = np.asarray(cat.codes, dtype=np.int64)
    if len(batches) < 2:
        raise ValueError(
            f"adata.obs[{batch_key!r}] holds a single batch ({batches[0]!r}); iMAP integrates two or more batches."
        )
    sizes = np.bincount(batch_idx, minlength=len(batches))
    if sizes.min() < 2:
        small = [str(batches[i]) for i in np.flatnonzero(sizes < 2)]
        raise ValueError(f"every batch needs at least 2 cells; batch(es) {small} of `batch_key={batch_key!r}` have 1.")
    for name, value in (("use_hvg", use_hvg), ("incremental", incremental), ("copy", copy)):
        if not isinstance(value, bool | np.bool_):
            raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    n_top_genes = check_positive_int(n_top_genes, "n_top_genes")
    latent_dim = check_positive_int(latent_dim, "latent_dim")
    stage1_epochs = check_positive_int(stage1_epochs, "stage1_epochs", minimum=0)
    stage2_epochs = check_positive_int(stage2_epochs, "stage2_epochs", minimum=0)
    lambda_content = check_in_range(lambda_content, "lambda_content", low=0)
    lambda_recon = check_in_range(lambda_recon, "lambda_recon", low=0)
    n_sample = check_positive_int(n_sample, "n_sample", minimum=2)
    walk_steps = check_positive_int(walk_steps, "walk_steps")
    n_critic = check_positive_int(n_critic, "n_critic")
    stage1_batch_size = check_positive_int(stage1_batch_size, "stage1_batch_size", minimum=2)
    stage2_batch_size = check_positive_int(stage2_batch_size, "stage2_batch_size", minimum=2)
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {tuple(METRICS)}, got {metric!r}.")
    if knn_method not in KNN_METHODS:
        raise ValueError(f"`knn_method` must be one of {KNN_METHODS}, got {knn_method!r}.")
    order_idx = _resolve_order(order, batches)

    # genes
    if use_hvg and "highly_variable" in adata.var:
        genes = np.flatnonzero(adata.var["highly_variable"].to_numpy(dtype=bool))
        if genes.size == 0:
            raise ValueError("adata.var['highly_variable'] marks no gene; unmark it or pass `use_hvg=False`.")
        gene_source = "var['highly_variable']"
    elif use_hvg and n_top_genes < adata.n_vars:
        genes, gene_source = _select_hvg(X, adata.var_names, batch_idx, n_top_genes), "seurat per batch"
    else:
        genes, gene_source = np.arange(adata.n_vars), "all"

    # neighbour counts: the smallest sample decides what is possible
    s_min = int(min(n_sample, sizes.min()))
    log = get_logger()
    k_w = max(10, s_min // 100) if k_within is None else check_positive_int(k_within, "k_within")
    if k_w > s_min - 1:
        log.warning(f"iMAP: the smallest batch has {s_min} cells; k_within lowered from {k_w} to {s_min - 1}.")
        k_w = s_min - 1
    k_m = max(1, k_w // 2) if k_mnn is None else check_positive_int(k_mnn, "k_mnn")
    if k_m > s_min:
        log.warning(f"iMAP: the smallest batch has {s_min} cells; k_mnn lowered from {k_m} to {s_min}.")
        k_m = s_min
    dev = resolve_device(device)
    seed = seed_int(random_state)

    # ---- work
    X_used = X[:, genes]
    if sparse.issparse(X_used):
        X_used = sparse.csr_matrix(X_used, dtype=np.float32)
    else:
        X_used = np.asarray(X_used, dtype=np.float32)
    vmax = X_used.max() if X_used.size else 0
    if vmax > 50:
        log.warning(f"iMAP expects log-normalised expression, but {where} reaches {float(vmax):g}; raw counts?")
    groups = [np.flatnonzero(batch_idx == b) for b in range(len(batches))]
    labels = [str(b) for b in batches]
    source = engine.RowSource(X_used, dev)
    total_std = engine.batch_total_std(source, groups)
    if order_idx is None:
        order_idx = [int(i) for i in np.argsort(-total_std, kind="stable")]
    log.info(f"iMAP: {len(genes)} genes, anchor {labels[order_idx[0]]!r}, order {[labels[i] for i in order_idx]}")

    with seeded_torch(seed, dev):
        gen = torch.Generator().manual_seed(seed)  # all sampling on the CPU: same draws for dense and sparse
        encoder, decoder, hist1 = engine.train_stage1(
            source,
            groups,
            latent_dim=latent_dim,
            n_epochs=stage1_epochs,
            batch_size=stage1_batch_size,
            lambda_recon=lambda_recon,
            lambda_content=lambda_content,
            generator=gen,
        )
        codes = engine.apply_in_chunks(encoder, source, np.arange(adata.n_obs))
        corrected, generators, infos, hist2 = engine.run_stage2(
            source,
            groups,
            codes,
            order_idx,
            incremental=bool(incremental),
            n_sample=n_sample,
            k_within=k_w,
            k_mnn=k_m,
            walk_steps=walk_steps,
            metric=METRICS[metric],
            knn_method=knn_method,
            n_epochs=stage2_epochs,
            n_critic=n_critic,
            batch_size=stage2_batch_size,
            latent_dim=latent_dim,
            generator=gen,
            random_state=seed,
            labels=labels,
        )
    for info in infos:
        if info["n_mnn_pairs"] == 0:
            log.warning(
                f"iMAP: no mutual nearest neighbours between batch {info['batch']!r} and the anchor; "
                "paired every query cell with its nearest anchor cell instead."
            )
    layer_out = _assemble(X, corrected, genes)

    adata = adata.copy() if copy else adata
    adata.obsm["X_" + key_added] = codes
    adata.layers[key_added] = layer_out
    used = np.zeros(adata.n_vars, dtype=bool)
    used[genes] = True
    adata.var[key_added + "_used"] = used
    adata.uns[key_added] = {
        "params": {
            "batch_key": batch_key,
            "layer": layer or "",
            "use_hvg": bool(use_hvg),
            "genes": gene_source,
            "n_top_genes": n_top_genes,
            "latent_dim": latent_dim,
            "stage1_epochs": stage1_epochs,
            "stage2_epochs": stage2_epochs,
            "lambda_content": lambda_content,
            "lambda_recon": lambda_recon,
            "n_sample": n_sample,
            "k_within": int(k_w),
            "k_mnn": int(k_m),
            "walk_steps": walk_steps,
            "metric": metric,
            "knn_method": knn_method,
            "incremental": bool(incremental),
            "n_critic": n_critic,
            "stage1_batch_size": stage1_batch_size,
            "stage2_batch_size": stage2_batch_size,
            "device": str(dev),
            "random_state": seed,
        },
        "batches": labels,
        "order": [labels[i] for i in order_idx],
        "anchor": labels[order_idx[0]],
        "total_std": [float(v) for v in total_std],
        "n_genes_used": int(len(genes)),
        "stage1": {k: np.asarray(v, dtype=np.float64) for k, v in hist1.items()},
        "stage2": _stage2_summary(infos, hist2, stage2_epochs),
    }
    if return_model:
        model = engine.IMAPModel(
            encoder=encoder,
            decoder=decoder,
            generators={batches[q]: g for q, g in generators.items()},
            batches=batches,
            order=[batches[i] for i in order_idx],
            genes=[str(g) for g in adata.var_names[genes]],
            var_names=[str(g) for g in adata.var_names],
            layer=layer,
        )
        return (adata, model) if copy else model
    return adata if copy else None


def _resolve_order(order: Sequence | None, batches: list) -> list[int] | None:
    if order is None:
        return None
    if isinstance(order, str) or not isinstance(order, Sequence | np.ndarray | pd.Index):
        raise TypeError(f"`order` must be a list of batch labels, got {order!r}.")
    lookup = {b: i for i, b in enumerate(batches)}
    lookup_str = {str(b): i for i, b in enumerate(batches)}
    idx = []
    for b in order:
        i = lookup.get(b, lookup_str.get(str(b)))
        if i is None:
            raise ValueError(f"`order` names batch {b!r}, which is not in the data; batches: {batches}.")
        idx.append(i)
    if sorted(idx) != list(range(len(batches))):
        raise ValueError(f"`order` must list every batch exactly once; batches: {batches}, got {list(order)}.")
    return idx


def _select_hvg(X, var_names: pd.Index, batch_idx: np.ndarray, n_top_genes: int) -> np.ndarray:
    """Indices of ``n_top_genes`` highly variable genes, selected per batch on a copy (caller's data untouched)."""
    import scanpy as sc

    tmp = AnnData(
        X=X.copy(),
        obs=pd.DataFrame({"batch": pd.Categorical(batch_idx.astype(str))}, index=np.arange(len(batch_idx)).astype(str)),
        var=pd.DataFrame(index=np.asarray(var_names).astype(str)),
    )
    tmp.var_names_make_unique()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            df = sc.pp.highly_variable_genes(
                tmp, n_top_genes=n_top_genes, flavor="seurat", batch_key="batch", inplace=False
            )
        except (ValueError, IndexError):  # a batch too small for the per-batch binning
            df = sc.pp.highly_variable_genes(tmp, n_top_genes=n_top_genes, flavor="seurat", inplace=False)
    return np.flatnonzero(np.asarray(df["highly_variable"], dtype=bool))


def _assemble(X, corrected: np.ndarray, genes: np.ndarray) -> np.ndarray | sparse.csr_matrix:
    """The full-width output: corrected columns for the integrated genes, input columns for the others."""
    n_vars = X.shape[1]
    if not sparse.issparse(X):
        out = np.array(X, dtype=np.float32, copy=True)
        out[:, genes] = corrected
        return out
    if len(genes) == n_vars:
        return sparse.csr_matrix(corrected)
    others = np.setdiff1d(np.arange(n_vars), genes)
    stacked = sparse.hstack([sparse.csr_matrix(corrected), sparse.csr_matrix(X)[:, others]], format="csc")
    position = np.empty(n_vars, dtype=np.int64)
    position[np.concatenate([genes, others])] = np.arange(n_vars)
    return sparse.csr_matrix(stacked[:, position], dtype=np.float32)


def _stage2_summary(infos: list[dict], histories: list[dict], n_epochs: int) -> dict:
    out: dict = {"batches": [i["batch"] for i in infos]}
    for key in ("n_anchor_sample", "n_query_sample", "n_mnn_pairs", "n_anchor_pool", "n_query_pool"):
        out[key] = np.asarray([i[key] for i in infos], dtype=np.int64)
    for key in ("critic", "wasserstein", "penalty", "generator"):
        rows = [np.asarray(h.get(key, []), dtype=np.float64) for h in histories]
        out[key] = np.stack(rows) if rows and n_epochs else np.zeros((len(infos), 0))
    return out
