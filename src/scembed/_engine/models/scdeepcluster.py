"""The trained scDeepCluster model (:func:`scembed.tl.scdeepcluster`), which assigns new cells to its clusters."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..._utils._model_data import batch_codes, check_expression, counts_of, is_anndata
from .. import scdeepcluster as engine
from .base import Model


class ScDeepClusterModel(Model):
    """A trained scDeepCluster model: assigns new cells to the learnt clusters.

    Returned by :func:`scembed.tl.scdeepcluster` with ``return_model=True``. It keeps the genes it was trained
    on, the normalisation (target sum and gene statistics) and the batches; new data must have the same genes
    (``var_names``) in the same order and raw counts in the same ``layer``.

    Parameters
    ----------
    net
        The trained ZINB autoencoder with its cluster centres.
    var_names
        All genes of the training data, in order (what ``adata.var_names`` of new data must equal).
    genes
        Column indices (into ``var_names``) of the genes the network uses.
    target_sum
        Library size the counts are normalised to.
    gene_mean, gene_std
        Centre and divisor of the normalised log counts of the used genes (the encoder's input scaling, see
        ``scale`` of :func:`scembed.tl.scdeepcluster`): one per gene, or, for a batch-aware model, one per batch
        and gene (each cell standardised with its batch's).
    layer
        Layer of the training counts (``None``: ``X``), the default of :meth:`predict`.
    batch_key
        ``obs`` column of the batch (``None``: a model without batches).
    batch_categories
        The training batches, in the order of the one-hot code.
    """

    kind = "scdeepcluster"
    name = "scDeepCluster"

    def __init__(
        self,
        net: engine.ZINBAutoencoder,
        *,
        var_names: Sequence[str],
        genes: np.ndarray,
        target_sum: float,
        gene_mean: np.ndarray,
        gene_std: np.ndarray,
        layer: str | None,
        batch_key: str | None,
        batch_categories: Sequence[str],
    ):
        self.net = net.eval()
        self.var_names = [str(v) for v in var_names]
        self.genes = np.asarray(genes, dtype=np.int64)
        self.target_sum = float(target_sum)
        self.gene_mean = np.asarray(gene_mean, dtype=np.float32)
        self.gene_std = np.asarray(gene_std, dtype=np.float32)
        self.layer = layer
        self.batch_key = batch_key
        self.batch_categories = [str(b) for b in batch_categories]
        n_used = len(self.genes)
        if self.genes.ndim != 1 or (n_used and not 0 <= self.genes.min() <= self.genes.max() < len(self.var_names)):
            raise ValueError(f"`genes` must index the {len(self.var_names)} var_names.")
        # gene statistics: one row, or one per batch (the input standardised within each batch)
        shapes = {(n_used,), (net.n_batches, n_used)} if net.n_batches else {(n_used,)}
        if self.gene_mean.shape not in shapes or self.gene_std.shape != self.gene_mean.shape or net.n_genes != n_used:
            raise ValueError(f"the network and the gene statistics must cover the {n_used} genes used.")
        if net.n_batches != (len(self.batch_categories) if batch_key is not None else 0):
            raise ValueError("the network's number of batches differs from `batch_categories`.")

    @property
    def n_clusters(self) -> int:
        """Number of clusters."""
        return int(self.net.centroids.shape[0])

    @property
    def n_latent(self) -> int:
        """Dimension of the latent space."""
        return int(self.net.z_dim)

    # -------------------------------------------------------------------------------- protocol hooks
    def _modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            "genes": torch.from_numpy(self.genes),
            "gene_mean": torch.from_numpy(self.gene_mean),
            "gene_std": torch.from_numpy(self.gene_std),
        }

    def _config(self) -> dict[str, Any]:
        return {
            "n_genes_used": len(self.genes),
            "n_latent": self.n_latent,
            "hidden": list(self.net.hidden),
            "n_batches": self.net.n_batches,
            "batch_encoder": bool(self.net.batch_encoder),
            "n_clusters": self.n_clusters,
            "target_sum": self.target_sum,
            "layer": self.layer,
            "batch_key": self.batch_key,
            "batch_categories": self.batch_categories,
        }

    @classmethod
    def _from_config(
        cls, config: Mapping[str, Any], var_names: list[str] | None, tensors: Mapping[str, torch.Tensor]
    ) -> ScDeepClusterModel:
        if var_names is None:
            raise ValueError("no var_names")
        net = engine.ZINBAutoencoder(
            int(config["n_genes_used"]),
            int(config["n_latent"]),
            [int(h) for h in config["hidden"]],
            int(config["n_batches"]),
            batch_encoder=bool(config.get("batch_encoder", True)),  # models saved before it was an option: True
        )
        net.set_centroids(torch.zeros(int(config["n_clusters"]), int(config["n_latent"])))
        return cls(
            net,
            var_names=var_names,
            genes=tensors["genes"].numpy(),
            target_sum=float(config["target_sum"]),
            gene_mean=tensors["gene_mean"].numpy(),
            gene_std=tensors["gene_std"].numpy(),
            layer=config["layer"],
            batch_key=config["batch_key"],
            batch_categories=config["batch_categories"],
        )

    def _repr_fields(self) -> dict[str, Any]:
        return {
            "n_genes_used": len(self.genes),
            "n_latent": self.n_latent,
            "n_clusters": self.n_clusters,
            "batch_key": self.batch_key,
        }

    # -------------------------------------------------------------------------------- applying
    def _data(self, adata: Any, layer: str | None) -> engine.CountData:
        if not is_anndata(adata):
            raise TypeError(f"`adata` must be an AnnData, got {type(adata).__name__}.")
        self.check_var_names(adata.var_names)
        # a backed X stays on disk: checked, normalised and encoded in row slices
        X, where = counts_of(adata, self.layer if layer is None else layer, backed=True)
        if X is None:
            raise ValueError(f"{where} is empty (None).")
        check_expression(X, where, counts=True)
        codes = None
        if self.batch_key is not None:
            codes, _ = batch_codes(adata, self.batch_key, self.batch_categories)
        proto = engine.CountData(
            X=X,
            genes=self.genes,
            size_factors=np.ones(0, np.float32),
            target_sum=self.target_sum,
            gene_mean=self.gene_mean,
            gene_std=self.gene_std,
            n_batches=len(self.batch_categories) if self.batch_key is not None else 0,
        )
        data = proto.like(X, codes)  # canonical counts: duplicate entries added up, the caller's matrix untouched
        if (data.size_factors <= 0).any():
            raise ValueError(f"{where} has cells without counts in the model's genes; remove them first.")
        return data

    def predict(
        self, adata: Any, *, layer: str | None = None, device: str | torch.device | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Assign the cells of ``adata`` to the clusters.

        Parameters
        ----------
        adata
            Raw counts of new cells with the training genes (``adata.var_names`` equal to the model's
            ``var_names``, in order) and, for a batch-aware model, the batch column with batches seen in training.
        layer
            Layer holding the counts (default: the training call's ``layer``).
        device
            Where to compute: ``None`` (where the model is), ``"auto"``, ``"cpu"``, ``"cuda"``, ….

        Returns
        -------
        labels
            Cluster index of every cell (int64).
        proba
            Soft assignments Q, cells × clusters (float32).
        latent
            Latent coordinates, cells × ``n_latent`` (float32).
        """
        data = self._data(adata, layer)
        if data.n_obs == 0:
            return (
                np.zeros(0, dtype=np.int64),
                np.zeros((0, self.n_clusters), dtype=np.float32),
                np.zeros((0, self.n_latent), dtype=np.float32),
            )
        with self._on(device) as dev:
            z, q = engine.infer(self.net, data, dev)
        return q.argmax(1).astype(np.int64), q, z

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device | None = "auto") -> ScDeepClusterModel:
        """Read a model written by :meth:`save` (no code is unpickled); see :meth:`Model.load`."""
        return super().load(path, device=device)  # type: ignore[return-value]
