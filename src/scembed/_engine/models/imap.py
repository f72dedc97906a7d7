"""The trained iMAP networks (:func:`scembed.tl.imap_integrate`), which encode and correct new cells."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import sparse
from torch import nn

from ..._utils._model_data import canonical_matrix, is_anndata, matrix_for_model
from .. import imap as engine
from .base import Model


def _json_label(label: Any) -> Any:
    """A batch label as a JSON value: strings, integers, floats and booleans as they are, anything else as text."""
    if isinstance(label, np.generic):
        label = label.item()
    return label if isinstance(label, str | int | float | bool) else str(label)


class IMAPModel(Model):
    """The trained iMAP networks: encode new cells and correct cells of a known batch.

    Returned by :func:`scembed.tl.imap_integrate` with ``return_model=True``. New data are log-normalised
    expression, preprocessed as the training data.

    Parameters
    ----------
    encoder
        Stage-I content encoder (used genes → ``latent_dim``).
    decoder
        Stage-I batch-conditioned decoder.
    generators
        Stage-II residual generator of every query batch, keyed by batch label; anchor batches have none.
    batches
        Batch labels in stage-I index order.
    order
        Batch labels in integration order (anchor first).
    genes
        Names of the genes (columns) the networks use, in order.
    var_names
        All genes of the training data, in order (``None``: ``genes``). An AnnData given to :meth:`encode` or
        :meth:`correct` must have exactly these ``var_names``; the used genes are taken from it.
    layer
        Layer of the training expression (``None``: ``X``), the default where an AnnData is read.
    """

    kind = "imap"
    name = "iMAP"

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        generators: Mapping[Any, nn.Module] | None = None,
        batches: Sequence[Any] | None = None,
        order: Sequence[Any] | None = None,
        genes: Sequence[str] | None = None,
        *,
        var_names: Sequence[str] | None = None,
        layer: str | None = None,
    ) -> None:
        self.encoder = encoder
        self.decoder = decoder
        self.batches = [] if batches is None else list(batches)
        self.generators = {self._batch(b): g for b, g in ({} if generators is None else generators).items()}
        self.order = [self._batch(b) for b in (self.batches if order is None else order)]
        self.genes = [] if genes is None else [str(g) for g in genes]
        self.layer = layer
        linears = [m for m in encoder.modules() if isinstance(m, nn.Linear)]
        if not linears or linears[0].in_features != len(self.genes):
            width = linears[0].in_features if linears else "?"
            raise ValueError(f"the encoder reads {width} genes, but `genes` names {len(self.genes)}.")
        self.latent_dim = int(linears[-1].out_features)
        if len(self.order) != len(self.batches) or len(set(map(str, self.order))) != len(self.batches):
            raise ValueError(f"`order` {self.order} must list every batch of {self.batches} once.")
        self.var_names, self._gene_index = self._locate(var_names)

    def _locate(self, var_names: Sequence[str] | None) -> tuple[list[str], np.ndarray | None]:
        """Training features and the columns of the used genes among them (``None``: all, in order)."""
        if var_names is None:
            return list(self.genes), None
        names = [str(v) for v in var_names]
        if names == self.genes:
            return names, None
        position: dict[str, int] = {}
        for i, v in enumerate(names):
            position.setdefault(v, i)
        if len(position) != len(names) or any(g not in position for g in self.genes):
            # the used genes cannot be located by name (duplicate or missing names): accept exactly them
            return list(self.genes), None
        return names, np.asarray([position[g] for g in self.genes], dtype=np.int64)

    # -------------------------------------------------------------------------------- protocol hooks
    def _generator_names(self) -> dict[str, Any]:
        return {f"generator.{self.batches.index(b)}": b for b in self.generators}

    def _modules(self) -> dict[str, nn.Module]:
        out = {"encoder": self.encoder, "decoder": self.decoder}
        out.update({name: self.generators[b] for name, b in self._generator_names().items()})
        return out

    def _config(self) -> dict[str, Any]:
        return {
            "genes": self.genes,
            "latent_dim": self.latent_dim,
            "batches": [_json_label(b) for b in self.batches],
            "order": [self.batches.index(b) for b in self.order],
            "generator_batches": [self.batches.index(b) for b in self.generators],
            "layer": self.layer,
        }

    @classmethod
    def _from_config(
        cls, config: Mapping[str, Any], var_names: list[str] | None, tensors: Mapping[str, torch.Tensor]
    ) -> IMAPModel:
        genes, latent = list(config["genes"]), int(config["latent_dim"])
        batches = list(config["batches"])
        encoder = engine.make_encoder(len(genes), latent)
        decoder = engine.BatchDecoder(latent, len(batches), len(genes))
        generators = {
            batches[int(i)]: engine.ResidualGenerator(len(genes), latent) for i in config["generator_batches"]
        }
        return cls(
            encoder,
            decoder,
            generators,
            batches,
            [batches[int(i)] for i in config["order"]],
            genes,
            var_names=var_names,
            layer=config["layer"],
        )

    def _repr_fields(self) -> dict[str, Any]:
        return {"n_genes_used": len(self.genes), "latent_dim": self.latent_dim, "batches": self.batches}

    # -------------------------------------------------------------------------------- applying
    def _matrix(self, data: Any, layer: str | None) -> np.ndarray | sparse.csr_matrix:
        """Expression of the used genes: canonical float32 (dense or CSR), finite values checked."""
        if is_anndata(data):
            X, _ = matrix_for_model(data, self.layer if layer is None else layer, self.var_names)
            return X if self._gene_index is None else X[:, self._gene_index]
        if not (sparse.issparse(data) or hasattr(data, "shape")):
            raise TypeError(f"`data` must be an AnnData or a 2-D array, got {type(data).__name__}.")
        X = canonical_matrix(data, "`data`")
        if X.shape[1] == len(self.genes):
            return X
        if self._gene_index is not None and X.shape[1] == len(self.var_names):
            return X[:, self._gene_index]
        full = f" or all {len(self.var_names)} training genes" if self._gene_index is not None else ""
        raise ValueError(
            f"`data` has {X.shape[1]} columns; the model expects the {len(self.genes)} genes in `model.genes`{full}."
        )

    def _batch(self, batch: Any) -> Any:
        if batch in self.batches:
            return self.batches[self.batches.index(batch)]
        by_text = [b for b in self.batches if str(b) == str(batch)]
        if len(by_text) == 1:
            return by_text[0]
        raise ValueError(f"`batch={batch!r}` is not one of the trained batches {self.batches}.")

    def encode(self, data: Any, *, layer: str | None = None, device: str | torch.device | None = None) -> np.ndarray:
        """Stage-I content representation of new cells.

        Parameters
        ----------
        data
            An AnnData whose ``var_names`` equal the model's ``var_names`` (checked), or an array (dense, or sparse
            in any SciPy format) of the genes in ``model.genes`` — or of all ``model.var_names`` — in order; for an
            array no gene check is possible, only the number of columns is checked. Log-normalised expression.
        layer
            Layer of an AnnData to read (default: the training layer).
        device
            Where to compute: ``None`` (where the model is), ``"auto"``, ``"cpu"``, ``"cuda"``, ….

        Returns
        -------
        ``(n, latent_dim)`` float32.
        """
        X = self._matrix(data, layer)
        if X.shape[0] == 0:
            return np.zeros((0, self.latent_dim), dtype=np.float32)
        with self._on(device) as dev:
            return engine.apply_in_chunks(self.encoder, engine.RowSource(X, dev), np.arange(X.shape[0]))

    def correct(
        self, data: Any, batch: Any, *, layer: str | None = None, device: str | torch.device | None = None
    ) -> np.ndarray:
        """Batch-corrected expression of new cells that all come from the known batch ``batch``.

        Parameters
        ----------
        data
            As for :meth:`encode`.
        batch
            The cells' batch, one of ``model.batches``. Cells of an anchor batch (no generator) are returned as
            they are.
        layer
            Layer of an AnnData to read (default: the training layer).
        device
            Where to compute: ``None`` (where the model is), ``"auto"``, ``"cpu"``, ``"cuda"``, ….

        Returns
        -------
        ``(n, len(model.genes))`` float32 corrected expression of the used genes.
        """
        batch = self._batch(batch)
        X = self._matrix(data, layer)
        n = X.shape[0]
        if n == 0:
            return np.zeros((0, len(self.genes)), dtype=np.float32)
        if batch not in self.generators:  # the anchor is left as it is
            return X.toarray() if sparse.issparse(X) else np.array(X, dtype=np.float32, copy=True)
        with self._on(device) as dev:
            return engine.apply_in_chunks(self.generators[batch], engine.RowSource(X, dev), np.arange(n))

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device | None = "auto") -> IMAPModel:
        """Read a model written by :meth:`save` (no code is unpickled); see :meth:`Model.load`."""
        return super().load(path, device=device)  # type: ignore[return-value]
