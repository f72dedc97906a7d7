"""The trained count autoencoder of ``tl.autoencoder``: embeds new cells, saves and loads itself."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..._utils._model_data import batch_codes, check_expression, counts_of
from ..autoencoder import Autoencoder, encode_all
from ..counts import CountData
from .base import Model, check_batch_size


class AutoencoderModel(Model):
    """A trained deep count autoencoder (:func:`scembed.tl.autoencoder`) with what it needs to embed new cells.

    It keeps the training genes (``var_names``) and the columns used, the normalisation (target sum and gene
    statistics of the encoder input), the likelihood, the layer the data was read from and the batches.
    ``metadata`` is JSON-serialisable; ``net`` is the :class:`~scembed._engine.autoencoder.Autoencoder`. Saving,
    loading, the feature check and the device follow the protocol of :mod:`scembed._engine.models.base`.
    """

    kind = "autoencoder"
    name = "autoencoder"

    def __init__(self, net: Autoencoder, metadata: Mapping[str, Any]):
        self.net = net.eval()
        self.metadata = dict(metadata)
        self.var_names = [str(v) for v in self.metadata["var_names"]]

    # -- protocol hooks
    def _modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def _config(self) -> dict[str, Any]:
        return {k: v for k, v in self.metadata.items() if k != "var_names"}

    @classmethod
    def _from_config(
        cls, config: Mapping[str, Any], var_names: list[str] | None, tensors: Mapping[str, torch.Tensor]
    ) -> AutoencoderModel:
        meta = {**config, "var_names": var_names or []}
        return cls(build_network(meta), meta)

    def _repr_fields(self) -> dict[str, Any]:
        return {
            "likelihood": self.likelihood,
            "dispersion": self.net.dispersion,
            "n_genes_used": len(self.metadata["genes"]),
            "n_latent": self.n_latent,
            "hidden": tuple(self.net.hidden),
            "batch_key": self.metadata.get("batch_key"),
        }

    # -- properties
    @property
    def n_latent(self) -> int:
        """Dimension of the latent space."""
        return int(self.net.n_latent)

    @property
    def likelihood(self) -> str:
        """``"zinb"``, ``"nb"`` or ``"mse"``."""
        return str(self.net.likelihood)

    # -- applying
    def _data(self, adata: Any, layer: str | None) -> CountData:
        if not (hasattr(adata, "var_names") and hasattr(adata, "obs")):
            raise TypeError(f"`adata` must be an AnnData, got {type(adata).__name__}.")
        self.check_var_names(adata.var_names)
        # a backed X stays on disk: checked, normalised and encoded in row slices
        X, where = counts_of(adata, self.metadata.get("layer") if layer is None else layer, backed=True)
        normalize = bool(self.metadata["normalize"])
        check_expression(X, where, counts=normalize)
        codes, n_batches = None, 0
        if self.metadata.get("batch_key"):
            codes, _ = batch_codes(adata, self.metadata["batch_key"], self.metadata["batch_categories"])
            n_batches = len(self.metadata["batch_categories"])
        proto = CountData(
            X=X,
            genes=np.asarray(self.metadata["genes"], dtype=np.int64),
            size_factors=np.ones(0, np.float32),
            target_sum=float(self.metadata["target_sum"]),
            gene_mean=np.asarray(self.metadata["gene_mean"], dtype=np.float32),
            gene_std=np.asarray(self.metadata["gene_std"], dtype=np.float32),
            n_batches=n_batches,
            normalize=normalize,
        )
        data = proto.like(X, codes)
        if normalize and (data.size_factors <= 0).any():
            raise ValueError(f"{where} has cells without counts in the model's genes; remove them first.")
        return data

    def transform(
        self,
        adata: Any,
        *,
        batch_size: int | None = None,
        device: str | torch.device | None = None,
        layer: str | None = None,
    ) -> np.ndarray:
        """Latent coordinates of the cells of ``adata``.

        Parameters
        ----------
        adata
            Cells with the training genes (``adata.var_names`` equal to :attr:`var_names`, same order), the data
            in the training call's ``layer`` (raw counts for the ZINB/NB likelihoods, log-normalised
            expression for MSE) and, for a batch-aware model, the batch column with batches seen in training.
            ``X`` may be on disk (``anndata.read_h5ad(path, backed="r")``): it is read ``batch_size`` rows at a time.
        batch_size
            Cells per forward pass. ``None`` (default): as the training call encoded them, 8,192, or fewer when
            the genes are many (at most 2²⁴ dense entries per pass); this reproduces its ``obsm`` exactly.
        device
            ``"auto"``, ``"cpu"``, ``"cuda"``…; ``None`` (default): where the model is.
        layer
            Read the data from this layer instead of the training call's.

        Returns
        -------
        Cells × ``n_latent`` float32 array.
        """
        batch_size = None if batch_size is None else check_batch_size(batch_size)
        data = self._data(adata, layer)
        with self._on(device) as dev:
            self.net.eval()
            z = encode_all(self.net, data, dev, batch_size=batch_size)
        return z.cpu().numpy()

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device | None = "auto") -> AutoencoderModel:
        """Read a model written by :meth:`save` (``torch.load(weights_only=True)``: no pickled code runs).

        ``device``: where the network is placed (``"auto"``: CUDA when present, else CPU).
        """
        return super().load(path, device=device)  # type: ignore[return-value]


def build_network(meta: Mapping[str, Any]) -> Autoencoder:
    """The (untrained) network that the metadata describes."""
    return Autoencoder(
        len(meta["genes"]),
        int(meta["n_latent"]),
        tuple(meta["hidden"]),
        len(meta["batch_categories"]) if meta.get("batch_key") else 0,
        likelihood=meta["likelihood"],
        batch_encoder=bool(meta["batch_encoder"]),
        dispersion=meta.get("dispersion", "cell"),  # models saved before the choice existed: per cell
    )
