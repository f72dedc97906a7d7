"""The trained NeuralEE network (:func:`scembed.tl.neuralee`), which embeds new cells."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from scipy import sparse
from torch import nn

from ..._utils._model_data import canonical_matrix, is_anndata, matrix_for_model, obsm_for_model
from ..nn import predict_in_batches
from .base import Model, check_batch_size


class NeuralEEModel(Model):
    """A trained NeuralEE network with what it needs to embed new cells.

    Returned by :func:`scembed.tl.neuralee` with ``return_model=True``. The network maps the *input
    representation* to the embedding; ``metadata["input"]`` says what that is:

    - ``"pca"`` — a PCA of ``adata.X`` computed when the model was fitted;
    - ``"obsm:<key>"`` — the first ``n_inputs`` columns of ``adata.obsm[key]`` (e.g. ``"obsm:X_pca"``);
    - ``"X"`` — ``adata.X`` itself.

    When the model holds PCA loadings (always for ``"pca"``; for ``"obsm:X_pca"`` when scanpy's ``varm["PCs"]``
    reproduced the training ``X_pca``), :meth:`transform` projects ``adata.X`` of new cells with the *training*
    loadings and centre, whatever ``obsm`` the new AnnData holds: a PCA of the new cells alone is a different
    projection. Without loadings, ``adata.obsm[key]`` is read as it is, and must come from the same projection as
    the training data's (a ``UserWarning`` says so).

    Parameters
    ----------
    net
        The trained network (input representation → embedding).
    metadata
        ``input``, ``n_inputs``, ``n_components``, ``hidden`` (the architecture), ``var_names`` (training genes or
        ``None``), and any further JSON-serialisable entries (``rep_name``, ``params``), kept as they are.
    loadings
        ``(n_genes, n_inputs)`` PCA loadings of the training data, or ``None``.
    offset
        ``(n_inputs,)`` projection of the training mean (``X @ loadings - offset`` is the centred projection).
    """

    kind = "neuralee"
    name = "NeuralEE"

    def __init__(
        self,
        net: nn.Module,
        metadata: Mapping[str, Any],
        *,
        loadings: torch.Tensor | np.ndarray | None = None,
        offset: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        self.net = net
        self.metadata = dict(metadata)
        for key in ("input", "n_inputs", "n_components"):
            if key not in self.metadata:
                raise ValueError(f"NeuralEEModel metadata needs {key!r}.")
        if (loadings is None) != (offset is None):
            raise ValueError("`loadings` and `offset` must be given together.")
        self.loadings = None if loadings is None else torch.as_tensor(loadings, dtype=torch.float32)
        self.offset = None if offset is None else torch.as_tensor(offset, dtype=torch.float32)
        if self.loadings is not None:
            if self.loadings.ndim != 2 or self.loadings.shape[1] != self.n_inputs:
                raise ValueError(f"`loadings` must be (n_genes, {self.n_inputs}), got {tuple(self.loadings.shape)}.")
            if tuple(self.offset.shape) != (self.n_inputs,):
                raise ValueError(f"`offset` must have shape ({self.n_inputs},), got {tuple(self.offset.shape)}.")
            names = self.var_names
            if names is not None and len(names) != self.loadings.shape[0]:
                raise ValueError(f"`loadings` has {self.loadings.shape[0]} rows for {len(names)} var_names.")
        elif self.metadata["input"] == "pca":
            raise ValueError("a model with input 'pca' needs its PCA `loadings` and `offset`.")

    # -------------------------------------------------------------------------------- properties
    @property
    def n_inputs(self) -> int:
        """Columns of the input representation."""
        return int(self.metadata["n_inputs"])

    @property
    def n_components(self) -> int:
        """Embedding dimensions."""
        return int(self.metadata["n_components"])

    @property
    def var_names(self) -> list[str] | None:  # type: ignore[override]
        """Genes the model was trained on (``None`` when unknown)."""
        names = self.metadata.get("var_names")
        return [str(v) for v in names] if names else None

    # -------------------------------------------------------------------------------- protocol hooks
    def _modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def _tensors(self) -> dict[str, torch.Tensor]:
        if self.loadings is None:
            return {}
        return {"loadings": self.loadings, "offset": self.offset}

    def _config(self) -> dict[str, Any]:
        return {k: v for k, v in self.metadata.items() if k != "var_names"}

    @classmethod
    def _from_config(
        cls, config: Mapping[str, Any], var_names: list[str] | None, tensors: Mapping[str, torch.Tensor]
    ) -> NeuralEEModel:
        from ..neuralee import build_network

        net = build_network(int(config["n_inputs"]), int(config["n_components"]), tuple(config["hidden"]))
        return cls(
            net, {**config, "var_names": var_names}, loadings=tensors.get("loadings"), offset=tensors.get("offset")
        )

    def _repr_fields(self) -> dict[str, Any]:
        return {
            "input": self.metadata.get("input"),
            "n_inputs": self.n_inputs,
            "n_components": self.n_components,
            "hidden": tuple(self.metadata.get("hidden", ())),
            "pca_loadings": self.loadings is not None,
        }

    # -------------------------------------------------------------------------------- applying
    def _input_from_adata(self, adata: Any) -> tuple[np.ndarray | sparse.csr_matrix, bool]:
        """The matrix to feed and whether it must be projected with the stored loadings first."""
        self.check_var_names(adata.var_names)
        source = str(self.metadata["input"])
        if self.loadings is not None:
            X, where = matrix_for_model(adata, None, None, backed=True)  # a backed X is read in row blocks
            if X.shape[1] != self.loadings.shape[0]:
                raise ValueError(
                    f"{where} has {X.shape[1]} columns; the model's PCA loadings need {self.loadings.shape[0]} genes."
                )
            return X, True
        if source.startswith("obsm:"):
            key = source[5:]
            if key not in adata.obsm:
                raise KeyError(
                    f"the model reads adata.obsm[{key!r}], which this AnnData lacks, and has no PCA loadings to "
                    "compute it from adata.X; compute the representation the same way as for the training data."
                )
            warnings.warn(
                f"NeuralEEModel.transform reads adata.obsm[{key!r}] as it is (the model keeps no loadings to compute "
                "it): it must come from the same projection as the training data's, e.g. the training PCA's "
                "loadings; a representation fitted on the new cells alone (such as their own sc.pp.pca) is a "
                "different projection and gives a wrong embedding.",
                UserWarning,
                stacklevel=3,
            )
            return obsm_for_model(adata, key, self.n_inputs), False
        if source == "X":
            X, where = matrix_for_model(adata, None, None)
            if X.shape[1] != self.n_inputs:
                raise ValueError(f"{where} has {X.shape[1]} columns; the model expects {self.n_inputs}.")
            return X, False
        raise ValueError(f"unknown input representation {source!r} in the model's metadata.")

    def transform(self, data: Any, *, batch_size: int = 65536, device: str | torch.device | None = None) -> np.ndarray:
        """Embed cells with the trained network.

        Parameters
        ----------
        data
            An AnnData, read as described in the class docstring after checking that its ``var_names`` equal the
            training genes in order; or an array (dense, or sparse in any SciPy format): ``(n, n_inputs)`` in the
            input representation, or ``(n, n_genes)`` genes when the model holds PCA loadings. For an array no
            gene check is possible: its columns must be the training features in order.
        batch_size
            Cells per forward pass (a positive integer).
        device
            Where to compute: ``None`` (where the model is), ``"auto"``, ``"cpu"``, ``"cuda"``, ….

        Returns
        -------
        ``(n, n_components)`` float32 embedding (``(0, n_components)`` for no cells).

        Warns
        -----
        UserWarning
            When an AnnData's ``obsm`` representation is read as it is (the model holds no loadings).
        """
        batch_size = check_batch_size(batch_size)
        if is_anndata(data):
            X, project = self._input_from_adata(data)
        else:
            if not (sparse.issparse(data) or hasattr(data, "shape")):
                raise TypeError(f"`data` must be an AnnData or a 2-D array, got {type(data).__name__}.")
            X = canonical_matrix(data, "`data`")
            if X.shape[1] == self.n_inputs:
                project = False
            elif self.loadings is not None and X.shape[1] == self.loadings.shape[0]:
                project = True
            else:
                genes = f" or {self.loadings.shape[0]} genes" if self.loadings is not None else ""
                raise ValueError(
                    f"`data` has {X.shape[1]} columns; the model expects {self.n_inputs} (its input "
                    f"representation){genes}."
                )
        if X.shape[0] == 0:
            return np.zeros((0, self.n_components), dtype=np.float32)
        with self._on(device) as dev:
            W = self.loadings.to(dev) if project else None
            off = self.offset.to(dev) if project else None

            def to_tensor(rows: slice) -> torch.Tensor:
                block = X[rows]
                block = block.toarray() if sparse.issparse(block) else block
                t = torch.as_tensor(np.asarray(block, dtype=np.float32), device=dev)
                return t @ W - off if project else t

            Y = predict_in_batches(self.net, X, batch_size=batch_size, device=dev, to_tensor=to_tensor)
        return Y.numpy()

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device | None = "auto") -> NeuralEEModel:
        """Read a model written by :meth:`save` (no code is unpickled); see :meth:`Model.load`."""
        return super().load(path, device=device)  # type: ignore[return-value]
