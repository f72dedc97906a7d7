from __future__ import annotations

import numbers
from collections.abc import Mapping

import numpy as np
from anndata import AnnData
from scipy import sparse


def check_adata(adata: object, *, min_obs: int = 1, name: str = "adata", require_vars: bool = True) -> AnnData:
    """Check that ``adata`` is a non-empty AnnData (at least ``min_obs`` cells and, if ``require_vars``, a variable)."""
    if not isinstance(adata, AnnData):
        raise TypeError(f"`{name}` must be an AnnData, got {type(adata).__name__}.")
    if adata.n_obs < min_obs:
        raise ValueError(f"`{name}` has {adata.n_obs} cells; at least {min_obs} are needed.")
    if require_vars and adata.n_vars == 0:
        raise ValueError(f"`{name}` has no variables (n_vars = 0).")
    return adata


def check_key(mapping: Mapping, key: str, *, arg: str, where: str) -> None:
    """Raise a KeyError naming the argument when ``key`` is missing from ``mapping`` (e.g. ``adata.obsm``)."""
    if key not in mapping:
        available = ", ".join(map(repr, list(mapping.keys())[:20])) or "none"
        raise KeyError(f"`{arg}={key!r}` not found in {where}; available: {available}.")


def check_positive_int(value: object, name: str, *, minimum: int = 1) -> int:
    """Check an integer parameter is ≥ ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be ≥ {minimum}, got {value}.")
    return int(value)


def check_in_range(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Check a real parameter is finite and lies in the given interval."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise TypeError(f"`{name}` must be a finite number, got {value!r}.")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"`{name}` must be {'≥' if low_inclusive else '>'} {low}, got {value}.")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        raise ValueError(f"`{name}` must be {'≤' if high_inclusive else '<'} {high}, got {value}.")
    return float(value)


def _values(X: np.ndarray | sparse.spmatrix | sparse.sparray) -> np.ndarray:
    return X.data if sparse.issparse(X) else np.asarray(X)


def check_finite(X: np.ndarray | sparse.spmatrix | sparse.sparray, name: str) -> None:
    """Raise a ValueError naming ``name`` if X holds NaN or infinite values, or is not numeric."""
    values = _values(X)
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise TypeError(f"{name} must hold real numbers, got dtype {values.dtype}.")
    if values.size and not np.isfinite(values).all():
        n_bad = int((~np.isfinite(values)).sum())
        raise ValueError(f"{name} contains {n_bad} NaN or infinite value(s).")


def check_counts(X: np.ndarray | sparse.spmatrix | sparse.sparray, name: str) -> None:
    """Raise a ValueError naming ``name`` unless X holds non-negative integer counts."""
    check_finite(X, name)
    values = _values(X)
    if values.size and values.min() < 0:
        raise ValueError(f"{name} must hold raw counts, but it has negative values (min {values.min():g}).")
    if values.size and not np.array_equal(values, np.round(values)):
        raise ValueError(
            f"{name} must hold raw (integer) counts, but it has non-integer values; "
            "pass the layer with raw counts via `layer=`."
        )
