from __future__ import annotations

import numbers
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._constants import SCDEEPCLUSTER
from .._engine import autoencoder as ae_engine
from .._engine import scdeepcluster as engine
from .._engine.counts import check_scale
from .._engine.distributed import on_main
from .._engine.models.scdeepcluster import ScDeepClusterModel
from .._utils import (
    OutputKeys,
    check_adata,
    check_bool,
    check_in_range,
    check_int_pair,
    check_int_sequence,
    check_optional_bool,
    check_positive_int,
    copy_adata,
    get_logger,
    output_keys,
    renamed_parameters,
    resolve_device,
    seeded_torch,
    shared_docs,
)
from .._utils._model_data import batch_codes as _batch_codes
from .._utils._model_data import counts_of as _counts_of
from .._utils._random import seed_int
from .._utils._validation import check_real_dtype
from ._autoencoder import _genes as _count_genes

#: the clustering stage's most epochs (the original's ``maxiter``); it stops sooner on ``tol``
DEFAULT_CLUSTER_EPOCHS = 2000


@renamed_parameters(
    select_genes="n_top_genes",
    z_dim="n_latent",
    encoder="hidden",
    sigma="noise",
    pretrain_epochs="max_epochs[0]",
    maxiter="max_epochs[1]",
    knn="n_neighbors",
)
@shared_docs
def scdeepcluster(
    adata: AnnData,
    n_clusters: int = 0,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    n_top_genes: int | None = None,
    n_latent: int = 32,
    hidden: Sequence[int] = (256, 64),
    noise: float = 2.5,
    scale: str = "gene",
    gamma: float = 1.0,
    max_epochs: int | tuple[int, int] | None = None,
    validation_fraction: float | None = None,
    patience: int | None = 20,
    update_interval: int = 1,
    tol: float = 1e-3,
    batch_size: int = 256,
    n_neighbors: int = 20,
    resolution: float = 0.2,
    batch_penalty: float = 1.0,
    device: str = "auto",
    random_state: int | None = 0,
    show_progress: bool | None = None,
    key_added: str = SCDEEPCLUSTER,
    return_model: bool = False,
    copy: bool = False,
) -> AnnData | ScDeepClusterModel | tuple[AnnData, ScDeepClusterModel] | None:
    """Cluster cells with scDeepCluster: a ZINB denoising autoencoder and deep embedded clustering.

    Tian et al. (2019). Raw counts go through a denoising autoencoder (Gaussian noise of standard deviation
    ``noise`` on the scaled log input, by default z-scored) whose decoder gives the mean, dispersion and dropout of
    a zero-inflated negative binomial (ZINB) for every count, scaled by the cell's size factor. After pretraining on
    the ZINB likelihood (until the loss of held-out cells stops improving), cluster centres are initialised in the
    latent space (KMeans with a given ``n_clusters``; with ``n_clusters=0``, Leiden on the latent kNN graph chooses
    the number), and the network and centres are trained jointly on ZINB + ``gamma`` · KL(P‖Q), with Q the Student-t
    soft assignment and P its sharpened target, recomputed every ``update_interval`` epochs, until fewer than
    ``tol`` of the labels change. Everything runs in mini-batches (sparse counts are densified one batch at a time);
    float32; seeded.

    With ``batch_key`` the encoder never sees which batch a cell comes from: its input is standardised within
    each batch (every gene's log expression centred and scaled with the mean and standard deviation of the cell's
    batch), and the batch one-hot enters the decoder only, which reconstructs each batch's counts. A batch's
    shift and scale of each gene (the location/scale batch effect that ComBat models) thus never reaches the
    latent space, so the clusters are cell types rather than type × batch. What standardisation cannot remove
    (a protocol that changes the relations between genes) is aligned by a penalty on the latent space in both
    stages (``batch_penalty``): the maximum mean discrepancy (MMD) between the batches' codes, counted only where
    a permutation test finds the batches more different than shuffled batch labels would be, so that batches that
    are already mixed are left alone. Only cells with a mutual nearest neighbour in the other batch (and their
    neighbourhoods) enter that comparison, so a cell type present in one batch only is not pulled onto the other
    batch's types. (The original's batch model gives the one-hot to the encoder as well and
    standardises over all cells: nothing keeps the batch out of its latent space, and its clusters split every
    type by batch.)

    Names differ from the original's where scembed's vocabulary is shared by all tools: ``max_epochs`` is
    ``(pretrain_epochs, maxiter)``, ``noise`` is ``sigma``, ``n_latent`` is ``z_dim``, ``hidden`` is the
    encoder's widths, ``n_neighbors`` is ``knn`` and ``n_top_genes`` is ``select_genes``.

    Parameters
    ----------
    adata
        Annotated data matrix with raw counts (non-negative integers) in ``X`` or ``layer``. ``X`` may stay on
        disk (``anndata.read_h5ad(path, backed="r")``, CSR or dense, or a zarr store's lazy matrix): both stages
        read it in row slices only, as :func:`scembed.tl.autoencoder` does (mini-batches from reads of
        8,192 rows, the targets P recomputed slice by slice), so memory holds a read of rows × genes, the network
        and a few numbers per cell (latent, targets, labels), never cells × genes; in-memory input goes through
        the same reads and gives the same numbers. ``copy=True`` is refused for a backed AnnData.
    n_clusters
        Number of clusters; 0 (default) estimates it by Leiden on the pretrained latent space. The estimate counts
        the groups the latent space separates, which need not be the number of annotated types: a type made of
        several distinct groups can come out as several clusters, and a type of few cells (about ``n_neighbors``
        or fewer) is merged into another (``benchmarks/README.md``, "What the annotated number of types is").
    layer
        Layer with the raw counts (default ``X``).
    batch_key
        Column of ``adata.obs`` with the batch of every cell (batch-aware model: input standardised per batch,
        batch one-hot in the decoder, ``batch_penalty`` on the latent space); ``None`` for one batch. Its labels
        must be of one type (a column mixing ``1`` and ``"1"`` is refused rather than merged).
    n_top_genes
        Use only this many genes, chosen for their excess of zeros given their mean expression (Kobak & Berens
        2019, as the original's ``geneSelection``); ``None`` (default) uses every gene with counts.
    n_latent
        Dimension of the latent space (the original's ``z_dim``).
    hidden
        Widths of the encoder's hidden layers; the decoder mirrors them.
    noise
        Standard deviation of the Gaussian noise added to the encoder input in training (the original's
        ``sigma``), in units of the scaled input. A fifth of it lowered the mean ARI on the project's benchmark
        sets (``benchmarks/README.md``, "tl.scdeepcluster": one choice at a time).
    scale
        How the centred log-normalised counts are scaled for the encoder: ``"gene"`` (default; the original's
        z-score, every gene to unit variance), ``"global"`` (every gene divided by one number, the root mean gene
        variance, so that genes keep their relative variances as in PCA; :func:`scembed.tl.autoencoder`'s
        default) or ``"floor"`` (every gene divided by its standard deviation or by the root mean gene variance,
        whichever is larger: genes more variable than the typical gene are z-scored, the others not scaled up).
        On the project's benchmark sets ``"global"`` raised the ARI on sparse sci-RNA-seq worm neurons beyond
        the seeds' spread but lowered it on 10x PBMCs, most with K estimated, and lowered the mean, so the
        default stays the z-score (``benchmarks/README.md``, "tl.scdeepcluster": one choice at a time).
        ``scale="global", noise=1`` (:func:`scembed.tl.autoencoder`'s input), against the defaults over six seeds
        on the five count sets, each set's two settings in one run: with K given +0.12 on the sparse sci-RNA-seq
        worm neurons of 2,100 cells (every seed higher), level on pbmc_10x_4k and worm_neuron_4k, −0.04 on
        pbmc_10x_2100 and cite_pbmc_3762 (five of six seeds lower on each), so it is an option, not the default
        (the same section).
        ``scale="floor", noise=1`` left the mean ARI with K given unchanged over the five sets (+0.02 on
        worm_neuron_2100, −0.05 on cite_pbmc_3762) and lowered it with K estimated.
    gamma
        Weight of the clustering loss KL(P‖Q).
    max_epochs
        ``(pretraining, clustering)`` epochs at most; an int sets both. Pretraining: Adam, lr 1e-3, amsgrad (the
        original's ``pretrain_epochs``); clustering: at most this many epochs of Adadelta, lr 1, ρ 0.95 (the
        original's ``maxiter``). Either may be 0. ``None`` (default): pretraining as
        :func:`scembed.tl.autoencoder` budgets it, about 20,000 mini-batch steps, clip(round(20,000 ·
        ``batch_size`` / N_train), 5, 400) epochs, ended sooner by the held-out cells (``validation_fraction``,
        ``patience``); with a batch penalty acting (``batch_key`` and ``batch_penalty`` > 0), 300 epochs on every
        cell (see ``validation_fraction``); clustering at most 2,000 epochs (the original's ``maxiter``), ended
        sooner by ``tol``.
    validation_fraction
        Share of the cells held out of pretraining (at most 8,192), in [0, 1). Pretraining stops when their loss
        (with input noise as in training, one fixed draw) has not improved for ``patience`` epochs, and the
        weights of its best epoch are kept; the clustering stage then uses every cell. Trained for a fixed 300
        epochs on every cell (the original), the network over-fits: on the project's five benchmark sets the
        held-out loss passed its minimum after 63–246 epochs and was 0.2–12 % above it at epoch 300, and the
        KMeans ARI of the latent space (true K) was lower at epoch 300 than at that minimum on four of the five
        (``benchmarks/README.md``, "tl.scdeepcluster"). Stopping on held-out cells, as
        :func:`scembed.tl.autoencoder` and scvi-tools do, makes the result independent of ``max_epochs`` once the
        stop comes first, at about 0.4× the time of 300 epochs. 0 holds out no cell (``patience`` then watches the
        training loss). ``None`` (default): 0.1, or 0 (and no ``patience``) when a batch penalty acts: the held-out
        loss measures the reconstruction only, while the penalty goes on aligning the batches after it stops
        improving (stopped there, two seeds on cellbench_3cl_2batches mixed the batches less: iLISI 0.79 and 0.65
        against 0.87–0.91 after 300 epochs). ``max_epochs=(300, 2000), validation_fraction=0, patience=None`` runs
        the original's schedule.
    patience
        Pretraining epochs without improvement of the held-out loss before it stops; ``None``: never early.
    update_interval
        Epochs between recomputations of the target distribution P (and the stopping check).
    tol
        Stop when the share of cells whose label changed since the last update falls below this.
    batch_size
        Cells per mini-batch.
    n_neighbors
        Neighbours (including the cell itself, as ``scanpy.pp.neighbors``) of the Leiden graph for
        ``n_clusters=0``.
    resolution
        Leiden resolution for ``n_clusters=0``; larger gives more clusters. The default 0.2 (the original's
        Louvain used 0.8) gave the best mean ARI on the project's benchmark sets (``benchmarks/README.md``), but K
        can still be off on single sets and it grows with the number of cells: pass ``n_clusters`` when the
        number of types is known, and lower the resolution for large data.
    batch_penalty
        With ``batch_key``: weight of the batch-alignment penalty, relative to the reconstruction loss. Each step
        adds ``batch_penalty`` × (the step's ZINB loss) × max(0, S − μ₀ − 2σ₀), where S is the squared MMD
        (Gaussian kernel, five bandwidths around the median distance) between the batches' latent codes, the
        current cells against the 2,048 cells seen before them, and μ₀, σ₀ are the mean and standard deviation
        of S over 8 shuffles of the current cells' batch labels. In the MMD of two batches a cell counts only if
        it, or some of its nearest cells of its own batch, has a mutual nearest neighbour among the other batch's
        cells (each among the other's nearest 2 % of that batch's cells in the comparison): a population of one
        batch has none and is left out, so a cell type present in one batch only stays apart instead of being
        pulled onto the other batch's types. Scaling by the loss makes the weight mean the same on every data
        set; the default 1 lets the two terms count alike; 0 turns the penalty off.
    {doc_trainer_tail}

    Returns
    -------
    With ``copy=False`` and ``return_model=False``, `None`; with ``copy=True`` the new `AnnData`; with
    ``return_model=True`` the model (or ``(adata, model)`` when ``copy=True`` too). Sets the following fields:

    `adata.obs['scdeepcluster' | key_added]` : :class:`pandas.Categorical`
        Cluster labels "0", "1", … (clusters that end up empty are dropped from the categories).
    `adata.obsm['X_scdeepcluster' | 'X_' + key_added]` : :class:`numpy.ndarray` (dtype `float32`)
        The latent coordinates, cells × ``n_latent``.
    `adata.obsm['scdeepcluster_proba' | key_added + '_proba']` : :class:`numpy.ndarray` (dtype `float32`)
        Soft assignments Q, cells × clusters; column j belongs to cluster "j".
    `adata.uns['scdeepcluster' | key_added]` : `dict`
        `params`; `n_clusters` (the number used) and `n_clusters_method` ("given" or "leiden");
        `n_clusters_init` labels' sizes; `n_genes_used`; `converged`; `n_epochs_pretrain`, `n_epochs_cluster`;
        `history` (per-epoch losses: `pretrain_zinb`, `cluster_loss`, `cluster_zinb`, `cluster_kl`; with
        held-out cells, `pretrain_validation_zinb`, theirs; with ``batch_key`` and the penalty on,
        `pretrain_batch_mmd` and `cluster_batch_mmd`, the mean MMD² statistic per epoch, near 0 once the batches
        mix);
        `delta_label` (share of changed labels at every update); `time` (seconds of each stage) and `device`.

    Examples
    --------
    >>> import scembed as se
    >>> adata = se.datasets.simulate(1000, 500, n_celltypes=4)
    >>> se.tl.scdeepcluster(adata, n_clusters=4, max_epochs=(20, 50))
    >>> adata.obs["scdeepcluster"].value_counts()  # doctest: +SKIP
    """
    o = _check_options(
        adata,
        n_clusters=n_clusters,
        layer=layer,
        n_top_genes=n_top_genes,
        n_latent=n_latent,
        hidden=hidden,
        noise=noise,
        scale=scale,
        gamma=gamma,
        max_epochs=max_epochs,
        validation_fraction=validation_fraction,
        patience=patience,
        update_interval=update_interval,
        tol=tol,
        batch_size=batch_size,
        n_neighbors=n_neighbors,
        resolution=resolution,
        batch_penalty=batch_penalty,
        show_progress=show_progress,
        return_model=return_model,
        copy=copy,
    )
    keys = output_keys(key_added)
    dev = resolve_device(device)
    seed = seed_int(random_state)
    codes, categories = _batch_codes(adata, batch_key) if batch_key is not None else (None, [])
    X, where = _counts_of(adata, layer, backed=True)  # a backed X stays on disk: read in row slices
    check_real_dtype(getattr(X, "dtype", np.dtype(object)), where)
    # one pass over X: the count checks, the genes used and the library sizes (before any training)
    X, genes, lib = _count_genes(adata, X, where, counts=True, n_top_genes=o["n_top_genes"])
    _resolve_pretraining(o, adata.n_obs, len(categories), seed)
    params = {k: v for k, v in o.items() if k != "rows"}
    params.update(layer=layer or "", batch_key=batch_key or "", random_state=seed, patience=o["patience"] or 0)
    params["n_top_genes"] = -1 if o["n_top_genes"] is None else o["n_top_genes"]
    params["hidden"], params["max_epochs"] = list(o["hidden"]), list(o["max_epochs"])

    data = engine.CountData.fit(
        X, genes, codes, len(categories), scale=o["scale"], standardize_per_batch=True, library=lib
    )
    net, fit = _fit(data, len(genes), len(categories), o, dev, seed, show_progress)
    adata = copy_adata(adata) if copy else adata
    record = {"params": params, "n_clusters_method": "given" if o["n_clusters"] else "leiden", "device": str(dev)}
    record["time"] = {k: float(v) for k, v in fit["times"].items()}
    _write(adata, keys, len(genes), fit, record)
    if not return_model:
        return adata if copy else None
    model = ScDeepClusterModel(
        net,
        var_names=list(map(str, adata.var_names)),
        genes=genes,
        target_sum=data.target_sum,
        gene_mean=data.gene_mean,
        gene_std=data.gene_std,
        layer=layer,
        batch_key=batch_key,
        batch_categories=categories,
    )
    return (adata, model) if copy else model


def _fit(
    data: engine.CountData, n_genes: int, n_batches: int, o: dict, dev: torch.device, seed: int, show_progress
) -> tuple[engine.ZINBAutoencoder, dict[str, Any]]:
    """Pretrain, initialise the clusters, train the clustering stage; the network and what the run produced."""
    log = get_logger()
    pre_epochs, cluster_epochs = o["max_epochs"]
    train_rows, validation_rows = o["rows"]
    times = {}
    with seeded_torch(seed, dev) as noise_gen:
        batch_gen = torch.Generator().manual_seed(seed)
        net = engine.ZINBAutoencoder(n_genes, o["n_latent"], o["hidden"], n_batches).to(dev)
        t0 = time.perf_counter()
        log.info(f"scDeepCluster: pretraining on {data.n_obs} cells × {n_genes} genes ({dev.type})")
        pre_hist = engine.pretrain(
            net,
            data,
            epochs=pre_epochs,
            batch_size=o["batch_size"],
            sigma=o["noise"],
            device=dev,
            generator=batch_gen,
            noise_generator=noise_gen,
            show_progress=show_progress,
            batch_penalty=o["batch_penalty"],
            train_rows=train_rows,
            validation_rows=validation_rows,
            patience=o["patience"],
            validation_seed=seed,
        )
        times["pretrain"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        z0 = engine.embed(net.eval(), data, dev)  # under torchrun: each rank encodes (reads) its own rows
        # under torchrun: computed once on rank 0 and sent to the others (one process: a plain call)
        init_labels, centroids = on_main(
            engine.initial_clusters,
            z0,
            o["n_clusters"],
            knn=o["n_neighbors"],
            resolution=o["resolution"],
            random_state=seed,
            device=dev,
        )
        k_used = centroids.shape[0]
        times["init"] = time.perf_counter() - t0
        how = "given" if o["n_clusters"] else f"Leiden, resolution {o['resolution']:g}"
        log.info(f"scDeepCluster: {k_used} clusters ({how}); clustering stage")
        net.set_centroids(torch.from_numpy(centroids))
        t0 = time.perf_counter()
        cl_hist, converged = {}, True  # one cluster: nothing to refine
        if k_used > 1:
            cl_hist, converged = engine.cluster(
                net,
                data,
                init_labels,
                maxiter=cluster_epochs,
                batch_size=o["batch_size"],
                sigma=o["noise"],
                gamma=o["gamma"],
                update_interval=o["update_interval"],
                tol=o["tol"],
                device=dev,
                generator=batch_gen,
                noise_generator=noise_gen,
                show_progress=show_progress,
                batch_penalty=o["batch_penalty"],
            )
        times["cluster"] = time.perf_counter() - t0
        z, q = engine.infer(net, data, dev, across_ranks=True)
    fit = {"z": z, "q": q, "init_labels": init_labels, "converged": converged, "times": times}
    return net, {**fit, "pre_hist": pre_hist, "cl_hist": cl_hist}


def _resolve_pretraining(o: dict, n_obs: int, n_batches: int, seed: int) -> None:
    """The pretraining's held-out cells, stopping rule and epochs where left to the defaults (``o`` in place).

    The held-out loss measures the reconstruction alone. With a batch penalty acting (two or more batches and
    ``batch_penalty`` > 0) the objective also aligns the batches, which goes on after the reconstruction of
    held-out cells stops improving (stopped there, cellbench_3cl_2batches mixed its batches less), so by default
    that pretraining keeps the fixed schedule under which the penalty was measured: 300 epochs on every cell.
    """
    penalised = n_batches > 1 and o["batch_penalty"] > 0
    held_out = ae_engine.default_holdout(o["validation_fraction"], o["patience"], penalised)
    o["validation_fraction"], o["patience"] = held_out
    o["rows"] = ae_engine.split_validation(n_obs, o["validation_fraction"], seed)
    if o["max_epochs"][0] is None:
        n_train = len(o["rows"][0])
        fixed = penalised and o["validation_fraction"] == 0  # no held-out stop: the penalty's measured schedule
        epochs = ae_engine.PENALISED_EPOCHS if fixed else ae_engine.default_max_epochs(n_train, o["batch_size"])
        o["max_epochs"] = (epochs, o["max_epochs"][1])


def _check_options(adata: AnnData, **o: Any) -> dict[str, Any]:
    """Validate every option before any work (counts included); returns the resolved values."""
    check_adata(adata, min_obs=2)
    for flag in ("return_model", "copy"):
        check_bool(o[flag], flag)
    if o["copy"] and adata.isbacked and o["layer"] is None:  # counts from a layer: in memory, a copy is cheap
        raise ValueError(
            "`adata` is backed (read_h5ad(..., backed='r')) and `copy=True`: a copy would load adata.X into "
            "memory. Pass `copy=False` (the results are written to adata.obs, adata.obsm and adata.uns, in "
            "memory), or call adata = adata.to_memory() first."
        )
    check_optional_bool(o["show_progress"], "show_progress")
    n = adata.n_obs
    n_clusters = o["n_clusters"]
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, numbers.Integral) or n_clusters < 0:
        raise ValueError(f"`n_clusters` must be a non-negative integer (0: estimate by Leiden), got {n_clusters!r}.")
    if n_clusters > n:
        raise ValueError(f"`n_clusters={n_clusters}` is larger than the number of cells ({n}).")
    out: dict[str, Any] = {"n_clusters": int(n_clusters), "n_top_genes": None}
    if o["n_top_genes"] is not None:
        out["n_top_genes"] = check_positive_int(o["n_top_genes"], "n_top_genes")
        if out["n_top_genes"] > adata.n_vars:
            raise ValueError(f"`n_top_genes={out['n_top_genes']}` is larger than the number of genes ({adata.n_vars}).")
    out["n_latent"] = check_positive_int(o["n_latent"], "n_latent")
    out["hidden"] = check_int_sequence(o["hidden"], "hidden")
    out["noise"] = check_in_range(o["noise"], "noise", low=0)
    out["scale"] = check_scale(o["scale"])
    out["gamma"] = check_in_range(o["gamma"], "gamma", low=0)
    if o["max_epochs"] is None:  # the pretraining's epochs follow N (resolved once the held-out cells are known)
        out["max_epochs"] = (None, DEFAULT_CLUSTER_EPOCHS)
    else:
        stages = ("pretraining", "clustering")
        out["max_epochs"] = check_int_pair(o["max_epochs"], "max_epochs", stages=stages, minimum=0)
    if o["validation_fraction"] is not None:
        out["validation_fraction"] = check_in_range(
            o["validation_fraction"], "validation_fraction", low=0, high=1, high_inclusive=False
        )
    else:  # resolved once the batches are known
        out["validation_fraction"] = None
    out["patience"] = None if o["patience"] is None else check_positive_int(o["patience"], "patience")
    out["update_interval"] = check_positive_int(o["update_interval"], "update_interval")
    out["tol"] = check_in_range(o["tol"], "tol", low=0, high=1)
    out["batch_size"] = check_positive_int(o["batch_size"], "batch_size")
    out["n_neighbors"] = check_positive_int(o["n_neighbors"], "n_neighbors", minimum=2)
    if n_clusters == 0 and out["n_neighbors"] > n:
        raise ValueError(f"`n_neighbors={out['n_neighbors']}` must be at most the number of cells ({n}).")
    out["resolution"] = check_in_range(o["resolution"], "resolution", low=0, low_inclusive=False)
    out["batch_penalty"] = check_in_range(o["batch_penalty"], "batch_penalty", low=0)
    return out


def _write(adata: AnnData, keys: OutputKeys, n_genes: int, fit: dict, record: dict) -> None:
    """Labels to ``obs[key]``, latent to ``obsm["X_" + key]``, Q to ``obsm[key + "_proba"]``, record to ``uns[key]``."""
    z, q, init_labels, pre_hist, cl_hist = fit["z"], fit["q"], fit["init_labels"], fit["pre_hist"], fit["cl_hist"]
    k_used = q.shape[1]
    cats = [str(i) for i in range(k_used)]
    adata.obs[keys.obs] = pd.Categorical([cats[i] for i in q.argmax(1)], categories=cats).remove_unused_categories()
    adata.obsm[keys.obsm] = z
    adata.obsm[keys.suffixed("proba")] = q
    adata.uns[keys.uns] = {
        "params": record["params"],
        "n_clusters": int(k_used),
        "n_clusters_method": record["n_clusters_method"],
        "n_clusters_init": np.bincount(init_labels, minlength=k_used).tolist(),
        "n_genes_used": int(n_genes),
        "converged": bool(fit["converged"]),
        "n_epochs_pretrain": len(pre_hist.get("zinb", [])),
        "n_epochs_cluster": len(cl_hist.get("loss", [])),
        "history": {
            "pretrain_zinb": pre_hist.get("zinb", []),
            # the held-out cells' loss, recorded only when some were held out
            **({"pretrain_validation_zinb": pre_hist["validation_zinb"]} if "validation_zinb" in pre_hist else {}),
            "cluster_loss": cl_hist.get("loss", []),
            "cluster_zinb": cl_hist.get("zinb", []),
            "cluster_kl": cl_hist.get("kl", []),
            # the batch penalty's statistic, recorded only when the penalty ran
            **{
                f"{stage}_batch_mmd": h["batch_mmd"]
                for stage, h in (("pretrain", pre_hist), ("cluster", cl_hist))
                if "batch_mmd" in h
            },
        },
        "delta_label": cl_hist.get("delta_label", []),
        "time": record["time"],
        "device": record["device"],
    }
