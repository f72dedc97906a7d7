from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse

from .._constants import IMAP
from .._engine import imap as engine
from .._engine.models.imap import IMAPModel
from .._utils import (
    PRECISIONS,
    OutputKeys,
    check_adata,
    check_bool,
    check_finite,
    check_in_range,
    check_int_pair,
    check_key,
    check_not_backed,
    check_optional_bool,
    check_positive_int,
    copy_adata,
    get_logger,
    output_keys,
    renamed_parameters,
    resolve_device,
    resolve_precision,
    seeded_torch,
    shared_docs,
)
from .._utils._memory import release_free_memory
from .._utils._random import seed_int

METRICS = {"angular": "cosine", "cosine": "cosine", "euclidean": "euclidean"}
KNN_METHODS = ("annoy", "exact")


@renamed_parameters(
    latent_dim="n_latent",
    stage1_epochs="max_epochs[0]",
    stage2_epochs="max_epochs[1]",
    stage1_batch_size="batch_size[0]",
    stage2_batch_size="batch_size[1]",
)
@shared_docs
def imap_integrate(
    adata: AnnData,
    batch_key: str = "batch",
    *,
    layer: str | None = None,
    use_hvg: bool = True,
    n_top_genes: int = 2000,
    n_latent: int = 256,
    max_epochs: int | tuple[int, int] | None = None,
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
    reach: float = 4.0,
    batch_size: int | tuple[int, int] = (512, 1024),
    device: str = "auto",
    precision: str | tuple[str, str] = "32-true",
    random_state: int | None = 0,
    show_progress: bool | None = None,
    key_added: str = IMAP,
    return_model: bool = False,
    copy: bool = False,
) -> AnnData | IMAPModel | tuple[AnnData, IMAPModel] | None:
    """Batch integration with iMAP (Wang et al. 2021) (two stages: content autoencoder, then adversarial correction).

    **Stage I** trains a content encoder E (genes→1024→512→``n_latent``) and a batch-conditioned decoder
    Dec(c, b) = ReLU(G2([c; b]) + G1(b)) on batch-balanced *mixup* cells (random convex combinations of two cells
    of the same batch, ``batch_size[0]`` per batch and step, 20 steps per epoch), minimising
    ``lambda_recon`` · MSE(Dec(E(x), b), x) + ``lambda_content`` · MSE(E(x), E(Dec(E(x), b̃))) with b̃ a random
    batch. E(x) is the content representation of every cell that stage II uses to match cells across batches.

    **Stage II** takes the batch with the largest summed per-gene standard deviation as the anchor (or the first of
    ``order``). For every other batch, on ≤ ``n_sample`` sampled cells of the anchor and of the query, in the
    stage-I space: mutual kNN graphs within each (``k_within``), mutual nearest neighbours between them
    (``k_mnn``), each MNN pair expanded by a ``walk_steps``-step random walk on the two graphs. A residual generator
    G(x) = ReLU(x + F(x)) is then trained with WGAN-GP (penalty 10) to map the query cells of this pool onto its
    anchor cells, and G corrects every cell of the query batch. Anchor cells are left unchanged.

    **Which output to use.** For neighbours, UMAP and clustering, the PCA of the corrected expression
    (``sc.pp.pca(adata, layer="imap")``, then ``sc.pp.neighbors(adata)``): that is the output integrated
    by stage II and scored in the benchmarks. The stage-I codes ``obsm["X_imap"]`` are not trained to be free of
    the batch (only to survive translation into another batch): on data with a strong batch effect they keep the
    batches apart (``benchmarks/imap.py`` scores both, rows ``scembed`` and ``scembed_codes``). The corrected
    expression is also what to plot genes from and to test for differential expression (``layer="imap"``).

    Cost is set by the number of training steps and the cells each draws, apart from encoding and correcting every
    cell once: with ``max_epochs=None`` the steps are the original's and the cells per step follow the data (see
    ``max_epochs``); epochs given explicitly run the original's fixed 20 steps of
    ``batch_size[0]`` cells per batch (stage I) and ``n_critic`` steps of ``batch_size[1]`` cells (stage II) per
    epoch whatever the data. ``uns[key_added]["seconds"]`` records each stage's time. ``precision`` trades
    accuracy of the arithmetic for time.
    Sparse input is densified one mini-batch at a time, and the corrected layer is built one block of cells at a
    time (no corrected copy of the whole matrix besides it); the caller's ``X``, ``var`` and cell order are never
    modified.

    Names follow scembed's vocabulary, shared by all tools: ``max_epochs`` is ``(stage I epochs, stage II
    epochs)`` (formerly ``stage1_epochs``, ``stage2_epochs``), ``batch_size`` the two stages' batch sizes (formerly
    ``stage1_batch_size``, ``stage2_batch_size``), ``n_latent`` the size of the content representation (formerly
    ``latent_dim``); the old names raise a ``TypeError`` naming the new one.

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
    n_latent
        Size of the stage-I content representation and of the generator's bottleneck.
    max_epochs
        ``(stage I, stage II)`` epochs; an int sets both. Stage I: 20 steps per epoch; stage II, per query batch:
        ``n_critic`` critic steps and one generator step per epoch. ``None`` (default): a budget that follows the
        data (:func:`scembed._engine.imap.default_budget`). Stage I aims at about 50 passes over every batch: the
        steps that take at 64 mixup cells per batch and step, never fewer than 1,500 (75 epochs) and never more
        than the original's 3,000 (150 epochs; reached at 3,840 cells per batch), then more cells per step (at most
        ``batch_size[0]`` and the cells of the smallest batch). Stage II runs the original's 150 epochs and draws
        about 100 passes over each pool (at least 64 cells per critic step, at most ``batch_size[1]`` and the pool).
        The floor is where stage I stopped gaining on the smallest set measured (499 cells: 30 and 50 epochs
        integrated less, 100 and 150 no better than 75); on 14,000 cells 150 stage-I epochs integrated more than
        100 or fewer, and 150 generator steps more than 40. The time is a small fraction of the original's for small
        data and the original's for large data (from about 30,700 cells per batch). Epochs given explicitly run as
        given, with the given ``batch_size``, as in the original. ``max_epochs[1] == 0`` skips stage II: no
        generator is trained, ``layers[key_added]`` and ``var[key_added + "_used"]`` are not written, and a
        returned model has no generators (only ``encode`` is meaningful).
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
    reach
        How far the generator may move a cell, in units of the batch shift: the distance by which the batch
        effect moves a cell's expression, estimated from the stage-II pairs before training as
        √(d_MNN² − d_within²) (median expression distances of the mutual nearest neighbours across the batches and
        of the mutual neighbours within each; the first contain the batch effect and both cells' own variation,
        the second only the latter). The generator's loss gains the transport cost ‖G(x) − x‖² / (2 · r) with
        r = ``reach`` · shift, whose pull back to the cell's own expression equals the largest push of a
        1-Lipschitz critic (the gradient penalty keeps it near 1) at distance r. With the default 4, moving a cell
        by the batch shift costs a quarter of what the critic can push, which leaves room to also match the
        anchor's spread where the batches' technologies differ. The adversarial loss alone is met by *any* map
        onto the anchor's cells, including ones that scatter each query cell to a random place within its type;
        the transport cost picks the map that moves cells least, so corrected query cells keep their own
        variation instead of gaining the generator's (without it, corrected query batches can spread wider than
        the anchor, and their cells' nearest neighbours then come from the anchor rather than from each other).
        ``uns[key_added]["stage2"]`` records the estimates and r per query batch. ``0``: no transport cost (the
        original).
    batch_size
        ``(stage I, stage II)``; an int sets both. Stage I: mixup cells drawn per batch in every step; stage II:
        query and anchor cells drawn in every step. With ``max_epochs=None`` the most cells a step draws (the
        budget chooses fewer for smaller data).
    precision
        ``(stage I, stage II)`` arithmetic of training; a single value sets both. Each is ``"32-true"`` (float32
        throughout), ``"bf16-mixed"`` (matrix products in bfloat16, weights, optimiser state and losses in
        float32; ``torch.autocast``; the gradient penalty's norm in float32) or ``"auto"``: ``"bf16-mixed"`` where
        the device multiplies bfloat16 in hardware (CUDA GPUs from Ampere on; CPUs with AVX512-BF16 or AMX), else
        ``"32-true"``. The default is float32 for both stages. Stage I's content loss compares the codes of a cell
        before and after translation into another batch, and in bfloat16 its codes kept the batches of a
        simulated three-batch set clearly more apart, although a stage-I step at 512 cells per batch takes half
        the time; stage II in bfloat16 takes about three quarters of its float32 time and integrated slightly
        less on three seeds of one set, as well on single seeds of two others (``benchmarks/README.md``,
        "tl.imap_integrate"). Encoding and correcting cells
        after training run in float32. ``uns[key_added]["params"]["precision"]`` records the arithmetic each stage
        used.
    {doc_trainer_tail}

    Returns
    -------
    ``None`` if ``copy=False``, else a new `AnnData` (with ``return_model=True``: the model
    (:class:`~scembed.tl.IMAPModel`, with ``encode(X)`` and ``correct(X, batch)`` for new cells of a known batch,
    given as log-normalised expression of ``model.genes``), or ``(adata, model)`` when ``copy=True``). Sets the
    following fields:

    `adata.obsm['X_imap' | 'X_' + key_added]` : :class:`numpy.ndarray` (dtype `float32`)
        Stage-I content representation, ``(n_obs, n_latent)``, in the input cell order (what stage II matches
        cells on; for neighbours use the PCA of ``layers[key_added]``, see above).
    `adata.layers['imap' | key_added]` : :class:`numpy.ndarray` or :class:`scipy.sparse.csr_matrix` (`float32`)
        Corrected expression of every gene: integrated genes corrected, the others copied from the input. Dense
        for dense input; for sparse input CSR unless more than half of its entries are non-zero (the generator gives
        genes a cell does not express values that need not be zero), where a dense matrix takes less memory.
        Not written when ``max_epochs[1] == 0``.
    `adata.var['imap_used' | key_added + '_used']` : `bool`
        Whether each gene was integrated (not written when ``max_epochs[1] == 0``).
    `adata.uns['imap' | key_added]` : `dict`
        `params`, `batches`, `order` (anchor first), `anchor`, `total_std` per batch, `n_genes_used`,
        `history` (per-epoch losses: `stage1_loss`, `stage1_recon`, `stage1_content`, and stage II's
        `stage2_critic`, `stage2_wasserstein`, `stage2_penalty`, `stage2_generator` as ``(n_query, epochs)``
        arrays), `stage1` (the stage-I losses by their own names), `stage1_batch_size` (mixup cells drawn per batch
        and step), `stage2` (per query batch in order: `batches`, `n_mnn_pairs`, sample and pool sizes, cells drawn
        per critic step `batch_size`, the batch-shift estimate `shift` with its parts `pair_distance` and
        `within_distance`, the transport cost's distance `reach`, and the per-epoch losses), `seconds` (wall time
        of the gene selection `genes`, `stage1`, encoding every cell `encode`, `stage2`, correcting every cell into
        the layer `correct` and the `total`; also logged at scanpy's info verbosity).

    Examples
    --------
    >>> import scanpy as sc, scembed as se
    >>> adata = se.datasets.simulate(2000, 1000, n_batches=2, batch_scale=0.8)
    >>> sc.pp.normalize_total(adata)
    >>> sc.pp.log1p(adata)
    >>> se.tl.imap_integrate(adata, batch_key="batch")
    >>> sc.pp.pca(adata, layer="imap")  # the corrected expression: neighbours, UMAP, clustering
    >>> sc.pp.neighbors(adata)
    """
    X, where, batch_idx, batches, sizes = _check_data(adata, batch_key, layer)
    o = _check_options(
        use_hvg=use_hvg,
        incremental=incremental,
        copy=copy,
        return_model=return_model,
        show_progress=show_progress,
        n_top_genes=n_top_genes,
        n_latent=n_latent,
        max_epochs=max_epochs,
        lambda_content=lambda_content,
        lambda_recon=lambda_recon,
        n_sample=n_sample,
        walk_steps=walk_steps,
        n_critic=n_critic,
        reach=reach,
        batch_size=batch_size,
        metric=metric,
        knn_method=knn_method,
        precision=precision,
    )
    keys = output_keys(key_added)
    order_idx = _resolve_order(order, batches)
    started = time.perf_counter()
    genes, gene_source = _genes(adata, X, batch_idx, use_hvg, o["n_top_genes"])
    seconds = {"genes": time.perf_counter() - started}
    k_w, k_m = _neighbour_counts(int(min(o["n_sample"], sizes.min())), k_within, k_mnn)
    stage1_batch = int(o["batch_size"][0])  # epochs given explicitly: the given sizes, as the original
    if o["max_epochs"] is None:
        o["max_epochs"], stage1_batch = engine.default_budget(
            int(sizes.sum()), len(sizes), o["batch_size"], smallest_batch=int(sizes.min())
        )
    dev = resolve_device(device)
    o["precision"] = ["bf16-mixed" if resolve_precision(p, dev) is not None else "32-true" for p in o["precision"]]
    seed = seed_int(random_state)
    log = get_logger()

    # every gene in order (use_hvg=False, or all genes variable): the input itself, not a copy of it (200,000 cells
    # × 2,000 genes at 42 % non-zero: 1.3 GiB); nothing below writes to it
    every_gene = len(genes) == X.shape[1] and np.array_equal(genes, np.arange(X.shape[1]))
    X_used = X if every_gene else X[:, genes]
    X_used = sparse.csr_matrix(X_used, dtype=np.float32) if sparse.issparse(X_used) else np.asarray(X_used, np.float32)
    _warn_if_counts(X_used, where)
    groups = [np.flatnonzero(batch_idx == b) for b in range(len(batches))]
    labels = [str(b) for b in batches]
    source = engine.RowSource(X_used, dev)
    total_std = engine.batch_total_std(source, groups)
    if order_idx is None:
        order_idx = [int(i) for i in np.argsort(-total_std, kind="stable")]
    log.info(f"iMAP: {len(genes)} genes, anchor {labels[order_idx[0]]!r}, order {[labels[i] for i in order_idx]}")
    encoder, decoder, codes, stages = _train(
        source, groups, order_idx, o, stage1_batch, (k_w, k_m), labels, dev, seed, show_progress, seconds
    )
    hist1, generators, infos, hist2 = stages
    drawn = hist1.pop("batch_size", None)  # mixup cells per batch and step (the default budget's or the given)
    for info in infos:
        if info["n_mnn_pairs"] == 0:
            log.warning(
                f"iMAP: no mutual nearest neighbours between batch {info['batch']!r} and the anchor; "
                "paired every query cell with its nearest anchor cell instead."
            )
    layer_out = None
    if o["max_epochs"][1] > 0:
        release_free_memory()  # stage II's freed working memory, before the corrected layer is allocated
        t = time.perf_counter()
        layer_out = _assemble(X, lambda rows: engine.correct_rows(source, rows, batch_idx, generators), genes)
        seconds["correct"] = time.perf_counter() - t
    params = {**o, "batch_key": batch_key, "layer": layer or "", "genes": gene_source, "device": str(dev)}
    params.update(k_within=int(k_w), k_mnn=int(k_m), random_state=seed)
    params.update(max_epochs=list(o["max_epochs"]), batch_size=list(o["batch_size"]))
    adata = copy_adata(adata) if copy else adata
    adata.obsm[keys.obsm] = codes
    record = {
        "params": params,
        "batches": labels,
        "order": [labels[i] for i in order_idx],
        "anchor": labels[order_idx[0]],
        "total_std": [float(v) for v in total_std],
        "n_genes_used": int(len(genes)),
        "stage1": {k: np.asarray(v, dtype=np.float64) for k, v in hist1.items()},
        "stage1_batch_size": int(drawn[0]) if drawn else int(o["batch_size"][0]),
        "stage2": _stage2_summary(infos, hist2, o["max_epochs"][1]),
    }
    seconds["total"] = time.perf_counter() - started
    record["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    log.info("iMAP: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    _write(adata, keys, layer_out, genes, record)
    if return_model:
        model = IMAPModel(
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


def _train(
    source: engine.RowSource,
    groups: list[np.ndarray],
    order_idx: list[int],
    o: dict[str, Any],
    stage1_batch: int,
    ks: tuple[int, int],
    labels: list[str],
    dev: torch.device,
    seed: int,
    show_progress: bool | None,
    seconds: dict[str, float],
) -> tuple[Any, Any, np.ndarray, tuple]:
    """Stage I, the codes of every cell, and stage II unless ``max_epochs[1] == 0`` (then no generator at all).

    Stage I draws ``stage1_batch`` mixup cells per batch and step.

    Returns the encoder, decoder, codes and ``(stage-I history, generators, stage-II information, stage-II
    histories)``; adds the seconds of stage I, of encoding every cell and of stage II to ``seconds``.
    """
    epochs1, epochs2 = o["max_epochs"]
    autocast1, autocast2 = (resolve_precision(p, dev) for p in o["precision"])
    with seeded_torch(seed, dev):
        gen = torch.Generator().manual_seed(seed)  # all sampling on the CPU: same draws for dense and sparse
        t = time.perf_counter()
        encoder, decoder, hist1 = engine.train_stage1(
            source,
            groups,
            latent_dim=o["n_latent"],
            n_epochs=epochs1,
            batch_size=stage1_batch,
            lambda_recon=o["lambda_recon"],
            lambda_content=o["lambda_content"],
            generator=gen,
            show_progress=show_progress,
            autocast_dtype=autocast1,
        )
        seconds["stage1"] = time.perf_counter() - t
        release_free_memory()  # stage I's freed working memory, before the codes and stage II are allocated
        t = time.perf_counter()
        codes = engine.apply_in_chunks(encoder, source, np.arange(source.shape[0]))
        seconds["encode"] = time.perf_counter() - t
        generators, infos, hist2 = {}, [], []
        if epochs2 > 0:
            t = time.perf_counter()
            generators, infos, hist2 = engine.run_stage2(
                source,
                groups,
                codes,
                order_idx,
                incremental=o["incremental"],
                n_sample=o["n_sample"],
                k_within=ks[0],
                k_mnn=ks[1],
                walk_steps=o["walk_steps"],
                metric=METRICS[o["metric"]],
                knn_method=o["knn_method"],
                n_epochs=epochs2,
                n_critic=o["n_critic"],
                batch_size=o["batch_size"][1],
                latent_dim=o["n_latent"],
                generator=gen,
                random_state=seed,
                labels=labels,
                show_progress=show_progress,
                budget_batch=o["budget"] == "default",
                reach=o["reach"],
                autocast_dtype=autocast2,
            )
            seconds["stage2"] = time.perf_counter() - t
    return encoder, decoder, codes, (hist1, generators, infos, hist2)


def _check_data(adata: AnnData, batch_key: str, layer: str | None) -> tuple[Any, str, np.ndarray, list, np.ndarray]:
    """The expression matrix (checked finite), its name, every cell's batch index, the batches and their sizes."""
    check_adata(adata, min_obs=4)
    check_not_backed(adata, "tl.imap_integrate", layer=layer)
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
    return X, where, batch_idx, batches, sizes


def _warn_if_counts(X: Any, where: str) -> None:
    """Warn before training when the expression looks like raw counts (iMAP's losses diverge or mislead on them)."""
    values = X.data if sparse.issparse(X) else X
    vmax = float(values.max()) if values.size else 0.0
    if vmax > 50:
        integer = bool(np.array_equal(values, np.round(values)))
        warnings.warn(
            f"tl.imap_integrate expects log-normalised expression, but {where} reaches {vmax:g}"
            f"{' and holds only integers: raw counts' if integer else ''}. Normalise first "
            "(sc.pp.normalize_total(adata); sc.pp.log1p(adata)) or pass the log-normalised layer with `layer=`.",
            UserWarning,
            stacklevel=3,
        )


def _check_options(**o: Any) -> dict[str, Any]:
    """Validate the scalar options; returns the resolved values (as recorded in ``uns``)."""
    for name in ("use_hvg", "incremental", "copy", "return_model"):
        check_bool(o[name], name)
    check_optional_bool(o["show_progress"], "show_progress")
    if o["metric"] not in METRICS:
        raise ValueError(f"`metric` must be one of {tuple(METRICS)}, got {o['metric']!r}.")
    raw = o["precision"]
    precision = (raw, raw) if isinstance(raw, str) else tuple(raw) if isinstance(raw, tuple | list) else ()
    if len(precision) != 2 or any(not isinstance(p, str) or p not in PRECISIONS for p in precision):
        raise ValueError(
            f"`precision` must be one of {PRECISIONS} or a (stage I, stage II) pair of them, got {o['precision']!r}."
        )
    if o["knn_method"] not in KNN_METHODS:
        raise ValueError(f"`knn_method` must be one of {KNN_METHODS}, got {o['knn_method']!r}.")
    return {
        "use_hvg": bool(o["use_hvg"]),
        "n_top_genes": check_positive_int(o["n_top_genes"], "n_top_genes"),
        "n_latent": check_positive_int(o["n_latent"], "n_latent"),
        "max_epochs": None
        if o["max_epochs"] is None
        else check_int_pair(o["max_epochs"], "max_epochs", stages=("stage I", "stage II"), minimum=0),
        "budget": "default" if o["max_epochs"] is None else "explicit",
        "lambda_content": check_in_range(o["lambda_content"], "lambda_content", low=0),
        "lambda_recon": check_in_range(o["lambda_recon"], "lambda_recon", low=0),
        "n_sample": check_positive_int(o["n_sample"], "n_sample", minimum=2),
        "walk_steps": check_positive_int(o["walk_steps"], "walk_steps"),
        "metric": o["metric"],
        "knn_method": o["knn_method"],
        "incremental": bool(o["incremental"]),
        "n_critic": check_positive_int(o["n_critic"], "n_critic"),
        "reach": check_in_range(o["reach"], "reach", low=0),
        "batch_size": check_int_pair(o["batch_size"], "batch_size", stages=("stage I", "stage II"), minimum=2),
        "precision": list(precision),
    }


def _genes(adata: AnnData, X, batch_idx: np.ndarray, use_hvg: bool, n_top_genes: int) -> tuple[np.ndarray, str]:
    """The integrated genes and how they were chosen."""
    if use_hvg and "highly_variable" in adata.var:
        genes = np.flatnonzero(adata.var["highly_variable"].to_numpy(dtype=bool))
        if genes.size == 0:
            raise ValueError("adata.var['highly_variable'] marks no gene; unmark it or pass `use_hvg=False`.")
        return genes, "var['highly_variable']"
    if use_hvg and n_top_genes < adata.n_vars:
        return _select_hvg(X, adata.var_names, batch_idx, n_top_genes), "seurat per batch"
    return np.arange(adata.n_vars), "all"


def _neighbour_counts(s_min: int, k_within: int | None, k_mnn: int | None) -> tuple[int, int]:
    """``k_within`` and ``k_mnn`` resolved and lowered (with a warning) to what the smallest sample allows."""
    log = get_logger()
    k_w = max(10, s_min // 100) if k_within is None else check_positive_int(k_within, "k_within")
    if k_w > s_min - 1:
        log.warning(f"iMAP: the smallest batch has {s_min} cells; k_within lowered from {k_w} to {s_min - 1}.")
        k_w = s_min - 1
    k_m = max(1, k_w // 2) if k_mnn is None else check_positive_int(k_mnn, "k_mnn")
    if k_m > s_min:
        log.warning(f"iMAP: the smallest batch has {s_min} cells; k_mnn lowered from {k_m} to {s_min}.")
        k_m = s_min
    return k_w, k_m


def _write(adata: AnnData, keys: OutputKeys, layer_out, genes: np.ndarray, record: dict) -> None:
    """Corrected expression to ``layers[key]``, ``var[key + "_used"]`` (if stage II ran); record to ``uns[key]``."""
    if layer_out is not None:
        adata.layers[keys.layers] = layer_out
        used = np.zeros(adata.n_vars, dtype=bool)
        used[genes] = True
        adata.var[keys.suffixed("used")] = used
    history = {f"stage1_{k}": v for k, v in record["stage1"].items()}
    history.update({f"stage2_{k}": record["stage2"][k] for k in ("critic", "wasserstein", "penalty", "generator")})
    adata.uns[keys.uns] = {**record, "history": history}


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


#: entries of the dense row block in which :func:`_assemble` builds the output (16 MiB of float32: 2,097 cells of
#: 2,000 genes); the correction's working memory, the generators' activations of those rows, is a few times that
ASSEMBLE_BLOCK = 2**22
#: rows, spread evenly over the data, whose corrected values decide between a sparse and a dense output
FORMAT_SAMPLE = 2048


def _assemble(X, corrected: Callable[[np.ndarray], np.ndarray], genes: np.ndarray) -> np.ndarray | sparse.csr_matrix:
    """The full-width output: corrected columns for the integrated genes, input columns for the others.

    ``corrected(rows)`` gives the corrected expression of the integrated genes for the given rows; it is called one
    block of rows at a time, so no corrected copy of the whole matrix exists besides the result. Dense input gives a
    dense output. Sparse input gives whichever of a CSR and a dense matrix is smaller: CSR holds a non-zero in 8
    bytes (float32 value and int32 column), dense every entry in 4, so CSR is kept unless more than half of the
    entries of :data:`FORMAT_SAMPLE` rows spread evenly over the data are non-zero (corrected values of genes a cell
    does not express need not be zero). A CSR result is built from its blocks converted one by one and then
    copied into arrays allocated at the final size and freed block by block: the final arrays' pages become
    resident only as they are written, so the peak holds the result about once.
    """
    n_obs, n_vars = X.shape
    step = max(1, ASSEMBLE_BLOCK // max(n_vars, 1))
    starts = range(0, n_obs, step)
    others = np.setdiff1d(np.arange(n_vars), genes)
    if sparse.issparse(X):
        X = sparse.csr_matrix(X)

    def block(rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), n_vars), dtype=np.float32)
        out[:, genes] = corrected(rows)
        if len(others):
            kept = X[rows][:, others]
            out[:, others] = kept.toarray() if sparse.issparse(kept) else kept
        return out

    dense_output = not sparse.issparse(X)
    if not dense_output and n_obs:
        sample = np.unique(np.linspace(0, n_obs - 1, min(n_obs, FORMAT_SAMPLE)).astype(np.int64))
        dense_output = 2 * np.count_nonzero(block(sample)) > len(sample) * n_vars
    if dense_output:
        out = np.empty((n_obs, n_vars), dtype=np.float32)
        for start in starts:
            rows = np.arange(start, min(start + step, n_obs))
            out[start : start + len(rows)] = corrected(rows) if len(others) == 0 else block(rows)
        return out
    parts = []
    for start in starts:
        parts.append(sparse.csr_matrix(block(np.arange(start, min(start + step, n_obs)))))
    nnz = sum(p.nnz for p in parts)
    index_dtype = np.int32 if max(nnz, n_vars) < np.iinfo(np.int32).max else np.int64
    indptr = np.zeros(n_obs + 1, dtype=index_dtype)
    data, indices = np.empty(nnz, dtype=np.float32), np.empty(nnz, dtype=index_dtype)
    at = 0
    for i, start in enumerate(starts):
        part, parts[i] = parts[i], None  # freed once copied
        indptr[start + 1 : start + 1 + part.shape[0]] = at + part.indptr[1:]
        data[at : at + part.nnz] = part.data
        indices[at : at + part.nnz] = part.indices
        at += part.nnz
        del part
    return sparse.csr_matrix((data, indices, indptr), shape=(n_obs, n_vars))


def _stage2_summary(infos: list[dict], histories: list[dict], n_epochs: int) -> dict:
    out: dict = {"batches": [i["batch"] for i in infos]}
    for key in ("n_anchor_sample", "n_query_sample", "n_mnn_pairs", "n_anchor_pool", "n_query_pool", "batch_size"):
        out[key] = np.asarray([i[key] for i in infos], dtype=np.int64)
    for key in ("shift", "pair_distance", "within_distance", "reach"):
        out[key] = np.asarray([i[key] for i in infos], dtype=np.float64)
    for key in ("critic", "wasserstein", "penalty", "generator"):
        rows = [np.asarray(h.get(key, []), dtype=np.float64) for h in histories]
        out[key] = np.stack(rows) if rows and n_epochs else np.zeros((len(infos), 0))
    return out
