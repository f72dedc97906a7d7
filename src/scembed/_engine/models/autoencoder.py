"""The trained count autoencoder of ``tl.autoencoder``: embeds new cells, saves and loads itself."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..._utils._counts import batch_codes, check_expression, counts_of
from ..._utils._device import resolve_device
from ..._utils._io import check_features, load_checkpoint, save_checkpoint
from ..autoencoder import Autoencoder, encode_all
from ..counts import INFER_BATCH, CountData

_KIND = "autoencoder"


class AutoencoderModel:
    """A trained deep count autoencoder (:func:`scembed.tl.autoencoder`) with what it needs to embed new cells.

    It keeps the training genes (``var_names``) and the columns used, the normalisation (target sum and gene
    statistics of the encoder input), the likelihood, the layer the data was read from and the batches.
    ``metadata`` is JSON-serialisable; ``net`` is the :class:`~scembed._engine.autoencoder.Autoencoder`.
    """

    def __init__(self, net: Autoencoder, metadata: Mapping[str, Any], *, device: str | torch.device = "auto"):
        self.net = net.cpu().eval()
        self.metadata = dict(metadata)
        self.device = device  # where transform computes by default

    # -- properties
    @property
    def var_names(self) -> list[str]:
        """Genes of the training data, in order (new data must have exactly these)."""
        return list(self.metadata["var_names"])

    @property
    def n_latent(self) -> int:
        """Dimension of the latent space."""
        return int(self.net.n_latent)

    @property
    def likelihood(self) -> str:
        """``"zinb"``, ``"nb"`` or ``"mse"``."""
        return str(self.net.likelihood)

    def __repr__(self) -> str:
        return (
            f"AutoencoderModel(likelihood={self.likelihood!r}, n_genes={len(self.metadata['genes'])}, "
            f"n_latent={self.n_latent}, hidden={self.net.hidden}, batch_key={self.metadata.get('batch_key')!r})"
        )

    # -- applying
    def _data(self, adata: Any, layer: str | None) -> CountData:
        if not (hasattr(adata, "var_names") and hasattr(adata, "obs")):
            raise TypeError(f"`adata` must be an AnnData, got {type(adata).__name__}.")
        check_features(self.var_names, list(adata.var_names))
        X, where = counts_of(adata, self.metadata.get("layer") if layer is None else layer)
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
        batch_size: int = INFER_BATCH,
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
        batch_size
            Cells per forward pass; the default reproduces the training call's ``obsm`` exactly.
        device
            ``"auto"``, ``"cpu"``, ``"cuda"``…; ``None`` (default): the model's ``device`` (``"auto"`` unless
            :meth:`load` was given another).
        layer
            Read the data from this layer instead of the training call's.

        Returns
        -------
        Cells × ``n_latent`` float32 array.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        data = self._data(adata, layer)
        dev = resolve_device(self.device if device is None else device)
        net = self.net.to(dev).eval()
        try:
            z = encode_all(net, data, dev, batch_size=batch_size)
        finally:
            self.net.cpu()
        return z.cpu().numpy()

    # -- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the weights and JSON metadata (genes, normalisation, batches) to one torch file; see :meth:`load`."""
        save_checkpoint(path, self.net.state_dict(), {**self.metadata, "kind": _KIND})

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "auto") -> AutoencoderModel:
        """Read a model written by :meth:`save` (``torch.load(weights_only=True)``: no pickled code runs).

        ``device`` is where :meth:`transform` computes by default (``"auto"``: CUDA when present).
        """
        state, meta = load_checkpoint(path)
        if meta.get("kind") != _KIND:
            raise ValueError(f"{os.fspath(path)!r} does not hold an autoencoder model (kind={meta.get('kind')!r}).")
        net = build_network(meta)
        net.load_state_dict(state)
        return cls(net, meta, device=device)


def build_network(meta: Mapping[str, Any]) -> Autoencoder:
    """The (untrained) network that the metadata describes."""
    return Autoencoder(
        len(meta["genes"]),
        int(meta["n_latent"]),
        tuple(meta["hidden"]),
        len(meta["batch_categories"]) if meta.get("batch_key") else 0,
        likelihood=meta["likelihood"],
        batch_encoder=bool(meta["batch_encoder"]),
    )
