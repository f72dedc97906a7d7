from __future__ import annotations

import numbers
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse

from .._constants import SCDEEPCLUSTER
from .._engine import scdeepcluster as engine
from .._engine.models.scdeepcluster import ScDeepClusterModel
from .._utils import (
    check_adata,
    check_counts,
    check_in_range,
    check_positive_int,
    get_logger,
    resolve_device,
    seeded_torch,
)
from .._utils._model_data import batch_codes as _batch_codes
from .._utils._model_data import counts_of as _counts_of
from .._utils._random import seed_int


def scdeepcluster(
    adata: AnnData,
    n_clusters: int = 0,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    select_genes: int = 0,
    z_dim: int = 32,
    encoder: Sequence[int] = (256, 64),
    sigma: float = 2.5,
    gamma: float = 1.0,
    pretrain_epochs: int = 300,
    maxiter: int = 2000,
    update_interval: int = 1,
    tol: float = 1e-3,
    batch_size: int = 256,
    knn: int = 20,
    resolution: float = 0.2,
    device: str = "auto",
    random_state: int | None = 0,
    key_added: str = SCDEEPCLUSTER,
    copy: bool = False,
    return_model: bool = False,
) -> AnnData | ScDeepClusterModel | tuple[AnnData, ScDeepClusterModel] | None:
    """Cluster cells with scDeepCluster: a ZINB denoising autoencoder and deep embedded clustering.

    Tian et al. (2019). Raw counts go through a denoising autoencoder (Gaussian noise ``sigma`` on the z-scored
    log input) whose decoder gives the mean, dispersion and dropout of a zero-inflated negative binomial (ZINB)
    for every count, scaled by the cell's size factor. After pretraining on the ZINB likelihood, cluster centres
    are initialised in the latent space (KMeans with a given ``n_clusters``; with ``n_clusters=0``, Leiden on
    the latent kNN graph chooses the number), and the network and centres are trained jointly on
    ZINB + ``gamma`` · KL(P‖Q), with Q the Student-t soft assignment and P its sharpened target, recomputed
    every ``update_interval`` epochs, until fewer than ``tol`` of the labels change. With ``batch_key``, the
    one-hot batch is given to the encoder and to the decoder. Everything runs in mini-batches (sparse counts are
    densified one batch at a time); float32; seeded.

    Parameters
    ----------
    adata
        Annotated data matrix with raw counts (non-negative integers) in ``X`` or ``layer``.
    n_clusters
        Number of clusters; 0 (default) estimates it by Leiden on the pretrained latent space.
    layer
        Layer with the raw counts (default ``X``).
    batch_key
        Column of ``adata.obs`` with the batch of every cell (batch-aware model); ``None`` for one batch.
    select_genes
        Use only this many genes, chosen for their excess of zeros given their mean expression (Kobak & Berens
        2019, as the original's ``geneSelection``); 0 (default) uses every gene with counts.
    z_dim
        Dimension of the latent space.
    encoder
        Widths of the encoder's hidden layers; the decoder mirrors them.
    sigma
        Standard deviation of the Gaussian noise added to the encoder input in training.
    gamma
        Weight of the clustering loss KL(P‖Q).
    pretrain_epochs
        Epochs of autoencoder pretraining (Adam, lr 1e-3, amsgrad).
    maxiter
        Maximum epochs of the clustering stage (Adadelta, lr 1, ρ 0.95).
    update_interval
        Epochs between recomputations of the target distribution P (and the stopping check).
    tol
        Stop when the share of cells whose label changed since the last update falls below this.
    batch_size
        Cells per mini-batch.
    knn
        Neighbours (including the cell itself, as ``scanpy.pp.neighbors``) of the Leiden graph for
        ``n_clusters=0``.
    resolution
        Leiden resolution for ``n_clusters=0``; larger gives more clusters. The default 0.2 (the original's
        Louvain used 0.8) gave the best mean ARI and nearly the smallest error in K on five annotated data sets
        (10x PBMC, worm neurons, CITE-seq PBMC; benchmarks/README.md), after 50 and after 300 pretraining epochs;
        still, K was off by up to 7 on single sets, and it grows with the number of cells. Pass ``n_clusters``
        when the number of types is known, and lower the resolution for large data.
    device
        ``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda"``.
    random_state
        Seed of the network, noise, mini-batches, KMeans and Leiden; the same seed on the same device gives the
        same result.
    key_added
        Name of the outputs.
    copy
        Return a modified copy instead of writing to ``adata``.
    return_model
        Also return the trained :class:`ScDeepClusterModel` (which can ``predict`` new cells, ``save`` and
        ``load``).

    Returns
    -------
    With ``copy=False`` and ``return_model=False``, `None`; with ``copy=True`` the new `AnnData`; with
    ``return_model=True`` the model (or ``(adata, model)`` when ``copy=True`` too). Sets the following fields:

    `adata.obs['scdeepcluster' | key_added]` : :class:`pandas.Categorical`
        Cluster labels "0", "1", … (clusters that end up empty are dropped from the categories).
    `adata.obsm['X_scdeepcluster' | 'X_' + key_added]` : :class:`numpy.ndarray` (dtype `float32`)
        The latent coordinates, cells × ``z_dim``.
    `adata.obsm['scdeepcluster_proba' | key_added + '_proba']` : :class:`numpy.ndarray` (dtype `float32`)
        Soft assignments Q, cells × clusters; column j belongs to cluster "j".
    `adata.uns['scdeepcluster' | key_added]` : `dict`
        `params`; `n_clusters` (the number used) and `n_clusters_method` ("given" or "leiden");
        `n_clusters_init` labels' sizes; `n_genes_used`; `converged`; `n_epochs_pretrain`, `n_epochs_cluster`;
        `history` with `pretrain_zinb`, `cluster_loss`, `cluster_zinb`, `cluster_kl`, `delta_label`; `time`
        (seconds of each stage) and `device`.

    Examples
    --------
    >>> import scembed as se
    >>> adata = se.datasets.simulate(1000, 500, n_celltypes=4)
    >>> se.tl.scdeepcluster(adata, n_clusters=4, pretrain_epochs=20, maxiter=50)
    >>> adata.obs["scdeepcluster"].value_counts()  # doctest: +SKIP
    """
    # ---- validate everything before any work ----
    check_adata(adata, min_obs=2)
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, numbers.Integral) or n_clusters < 0:
        raise ValueError(f"`n_clusters` must be a non-negative integer (0: estimate by Leiden), got {n_clusters!r}.")
    n_clusters = int(n_clusters)
    n = adata.n_obs
    if n_clusters > n:
        raise ValueError(f"`n_clusters={n_clusters}` is larger than the number of cells ({n}).")
    X, where = _counts_of(adata, layer)
    check_counts(X, where)
    select_genes = check_positive_int(select_genes, "select_genes", minimum=0)
    if select_genes > adata.n_vars:
        raise ValueError(f"`select_genes={select_genes}` is larger than the number of genes ({adata.n_vars}).")
    z_dim = check_positive_int(z_dim, "z_dim")
    if isinstance(encoder, str | bytes) or not isinstance(encoder, Sequence) or len(encoder) == 0:
        raise TypeError(f"`encoder` must be a non-empty sequence of layer widths, got {encoder!r}.")
    hidden = tuple(check_positive_int(h, "encoder") for h in encoder)
    sigma = check_in_range(sigma, "sigma", low=0)
    gamma = check_in_range(gamma, "gamma", low=0)
    pretrain_epochs = check_positive_int(pretrain_epochs, "pretrain_epochs", minimum=0)
    maxiter = check_positive_int(maxiter, "maxiter", minimum=0)
    update_interval = check_positive_int(update_interval, "update_interval")
    tol = check_in_range(tol, "tol", low=0, high=1)
    batch_size = check_positive_int(batch_size, "batch_size")
    knn = check_positive_int(knn, "knn", minimum=2)
    if n_clusters == 0 and knn > n:
        raise ValueError(f"`knn={knn}` must be at most the number of cells ({n}).")
    resolution = check_in_range(resolution, "resolution", low=0, low_inclusive=False)
    if not isinstance(key_added, str) or not key_added:
        raise TypeError(f"`key_added` must be a non-empty string, got {key_added!r}.")
    dev = resolve_device(device)
    seed = seed_int(random_state)
    codes, categories = (None, [])
    if batch_key is not None:
        codes, categories = _batch_codes(adata, batch_key)
    if sparse.issparse(X) and X.format != "csr":
        X = sparse.csr_matrix(X)

    genes = np.arange(adata.n_vars)
    if select_genes:
        genes = engine.select_genes_by_zero_rate(X, select_genes)
    sub = X if len(genes) == adata.n_vars else X[:, genes]
    detected = np.asarray((sub > 0).sum(0)).ravel()
    genes = genes[detected > 0]  # genes without counts carry no information (and have no z-score)
    if len(genes) == 0:
        raise ValueError(f"{where} has no gene with counts.")
    lib = engine.library_sizes(sub)
    if (lib <= 0).any():
        raise ValueError(
            f"{where} has {int((lib <= 0).sum())} cell(s) without counts"
            f"{' in the selected genes' if select_genes else ''}; remove them first, e.g. with "
            "sc.pp.filter_cells(adata, min_counts=1)."
        )
    del sub
    log = get_logger()
    params = {
        "n_clusters": n_clusters,
        "layer": layer or "",
        "batch_key": batch_key or "",
        "select_genes": select_genes,
        "z_dim": z_dim,
        "encoder": list(hidden),
        "sigma": sigma,
        "gamma": gamma,
        "pretrain_epochs": pretrain_epochs,
        "maxiter": maxiter,
        "update_interval": update_interval,
        "tol": tol,
        "batch_size": batch_size,
        "knn": knn,
        "resolution": resolution,
        "random_state": seed,
    }

    # ---- work ----
    times = {}
    data = engine.CountData.fit(X, genes, codes, len(categories))
    with seeded_torch(seed, dev) as noise_gen:
        batch_gen = torch.Generator().manual_seed(seed)
        net = engine.ZINBAutoencoder(len(genes), z_dim, hidden, len(categories)).to(dev)
        t0 = time.perf_counter()
        log.info(f"scDeepCluster: pretraining on {n} cells × {len(genes)} genes ({dev.type})")
        pre_hist = engine.pretrain(
            net,
            data,
            epochs=pretrain_epochs,
            batch_size=batch_size,
            sigma=sigma,
            device=dev,
            generator=batch_gen,
            noise_generator=noise_gen,
        )
        times["pretrain"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        z0 = engine.encode_all(net.eval(), data, dev).cpu().numpy()
        init_labels, centroids = engine.initial_clusters(
            z0, n_clusters, knn=knn, resolution=resolution, random_state=seed, device=dev
        )
        k_used = centroids.shape[0]
        times["init"] = time.perf_counter() - t0
        log.info(
            f"scDeepCluster: {k_used} clusters "
            f"({'given' if n_clusters else f'Leiden, resolution {resolution:g}'}); clustering stage"
        )
        net.set_centroids(torch.from_numpy(centroids))
        t0 = time.perf_counter()
        if k_used > 1:
            cl_hist, converged = engine.cluster(
                net,
                data,
                init_labels,
                maxiter=maxiter,
                batch_size=batch_size,
                sigma=sigma,
                gamma=gamma,
                update_interval=update_interval,
                tol=tol,
                device=dev,
                generator=batch_gen,
                noise_generator=noise_gen,
            )
        else:  # one cluster: nothing to refine
            cl_hist, converged = {}, True
        times["cluster"] = time.perf_counter() - t0
        z, q = engine.infer(net, data, dev)

    labels = q.argmax(1)
    adata = adata.copy() if copy else adata
    cats = [str(i) for i in range(k_used)]
    adata.obs[key_added] = pd.Categorical([cats[i] for i in labels], categories=cats).remove_unused_categories()
    adata.obsm[f"X_{key_added}"] = z
    adata.obsm[f"{key_added}_proba"] = q
    adata.uns[key_added] = {
        "params": params,
        "n_clusters": int(k_used),
        "n_clusters_method": "given" if n_clusters else "leiden",
        "n_clusters_init": np.bincount(init_labels, minlength=k_used).tolist(),
        "n_genes_used": len(genes),
        "converged": bool(converged),
        "n_epochs_pretrain": len(pre_hist.get("zinb", [])),
        "n_epochs_cluster": len(cl_hist.get("loss", [])),
        "history": {
            "pretrain_zinb": pre_hist.get("zinb", []),
            "cluster_loss": cl_hist.get("loss", []),
            "cluster_zinb": cl_hist.get("zinb", []),
            "cluster_kl": cl_hist.get("kl", []),
            "delta_label": cl_hist.get("delta_label", []),
        },
        "time": {k: float(v) for k, v in times.items()},
        "device": str(dev),
    }
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
