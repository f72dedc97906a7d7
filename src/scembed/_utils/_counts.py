"""Input checks of the count models (autoencoder, scDeepCluster): the matrix of a layer, batches, counts."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import sparse

from ._model_data import batch_codes, counts_of
from ._validation import check_counts, check_finite

__all__ = ["batch_codes", "check_expression", "counts_of"]


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
