"""Input checks of the count models (autoencoder, scDeepCluster): the matrix of a layer, batches, counts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from ._validation import check_counts, check_finite, check_key


def counts_of(adata: Any, layer: str | None) -> tuple[Any, str]:
    """The matrix ``adata.X`` or ``adata.layers[layer]``, with its name for messages."""
    if layer is None:
        return adata.X, "adata.X"
    if not isinstance(layer, str):
        raise TypeError(f"`layer` must be a string key of adata.layers or None, got {type(layer).__name__}.")
    check_key(adata.layers, layer, arg="layer", where="adata.layers")
    return adata.layers[layer], f"adata.layers[{layer!r}]"


def batch_codes(adata: Any, batch_key: str, categories: Sequence[str] | None = None) -> tuple[np.ndarray, list]:
    """Integer codes of ``adata.obs[batch_key]`` (by sorted label, or by the given ``categories``) and the labels."""
    if not isinstance(batch_key, str):
        raise TypeError(f"`batch_key` must be a string key of adata.obs or None, got {type(batch_key).__name__}.")
    check_key(adata.obs, batch_key, arg="batch_key", where="adata.obs")
    values = adata.obs[batch_key]
    if values.isna().any():
        raise ValueError(f"adata.obs[{batch_key!r}] has {int(values.isna().sum())} missing value(s).")
    values = values.astype(str)
    if categories is None:
        categories = sorted(values.unique())
    unknown = sorted(set(values.unique()) - set(categories))
    if unknown:
        raise ValueError(
            f"adata.obs[{batch_key!r}] holds batches the model was not trained on: {unknown[:5]}; "
            f"known batches: {list(categories)[:10]}."
        )
    codes = pd.Categorical(values, categories=list(categories)).codes.astype(np.int64)
    return codes, list(categories)


def check_expression(X: Any, where: str, *, counts: bool) -> None:
    """Raw counts (non-negative integers) when ``counts``, else non-negative finite values (log-normalised data)."""
    if counts:
        check_counts(X, where)
        return
    check_finite(X, where)
    values = X.data if sparse.issparse(X) else np.asarray(X)
    if values.size and values.min() < 0:
        raise ValueError(
            f"{where} must hold non-negative (log-normalised) expression, but it has negative values "
            f"(min {values.min():g}); scaled data is not accepted."
        )
