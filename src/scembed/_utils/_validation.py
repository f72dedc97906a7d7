from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

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


def check_real_dtype(dtype: np.dtype, name: str) -> None:
    """Raise a TypeError naming ``name`` unless ``dtype`` holds real numbers."""
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise TypeError(f"{name} must hold real numbers, got dtype {dtype}.")


def _nonfinite_error(name: str, n_bad: int) -> ValueError:
    return ValueError(f"{name} contains {n_bad} NaN or infinite value(s).")


def check_finite(X: np.ndarray | sparse.spmatrix | sparse.sparray, name: str) -> None:
    """Raise a ValueError naming ``name`` if X holds NaN or infinite values, or is not numeric."""
    values = _values(X)
    check_real_dtype(values.dtype, name)
    if values.size and not np.isfinite(values).all():
        raise _nonfinite_error(name, int((~np.isfinite(values)).sum()))


@dataclass(frozen=True)
class ValueFacts:
    """What the checks of a matrix's stored values need: facts of row blocks (or of ranks) add up with ``+``.

    ``minimum`` and ``n_noninteger`` are over the finite values; a block without values has ``minimum`` inf.
    """

    n_nonfinite: int = 0
    n_noninteger: int = 0
    minimum: float = math.inf

    @classmethod
    def of(cls, X: np.ndarray | sparse.spmatrix | sparse.sparray) -> ValueFacts:
        """The facts of the stored values of ``X`` (of a sparse matrix: its stored entries, duplicates as stored)."""
        values = _values(X)
        if not values.size:
            return cls()
        if np.issubdtype(values.dtype, np.integer) or values.dtype == bool:
            return cls(minimum=float(values.min()))
        finite = np.isfinite(values)
        n_nonfinite = int(values.size - np.count_nonzero(finite))
        if n_nonfinite:
            values = values[finite]
        if not values.size:
            return cls(n_nonfinite=n_nonfinite)
        n_noninteger = int(np.count_nonzero(values != np.round(values)))
        return cls(n_nonfinite, n_noninteger, float(values.min()))

    def __add__(self, other: ValueFacts) -> ValueFacts:
        return ValueFacts(
            self.n_nonfinite + other.n_nonfinite,
            self.n_noninteger + other.n_noninteger,
            min(self.minimum, other.minimum),
        )


def raise_for_counts(facts: ValueFacts, name: str) -> None:
    """The errors of :func:`check_counts` from the facts of the values (e.g. gathered block by block)."""
    if facts.n_nonfinite:
        raise _nonfinite_error(name, facts.n_nonfinite)
    if facts.minimum < 0:
        raise ValueError(f"{name} must hold raw counts, but it has negative values (min {facts.minimum:g}).")
    if facts.n_noninteger:
        raise ValueError(
            f"{name} must hold raw (integer) counts, but it has non-integer values; "
            "pass the layer with raw counts via `layer=`."
        )


def check_counts(X: np.ndarray | sparse.spmatrix | sparse.sparray, name: str) -> None:
    """Raise a ValueError naming ``name`` unless X holds non-negative integer counts.

    Duplicate entries of a non-canonical sparse matrix are added up first (on a copy), as every consumer does.
    """
    check_finite(X, name)
    if sparse.issparse(X) and X.format in ("csr", "csc", "coo") and not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    raise_for_counts(ValueFacts.of(X), name)


def check_int_pair(
    value: object, name: str, *, stages: tuple[str, str] = ("first", "second"), minimum: int = 1
) -> tuple[int, int]:
    """An int, or a pair of ints, for a two-stage trainer: ``n`` means ``(n, n)``; each must be ≥ ``minimum``.

    ``stages`` names the two stages in the messages, e.g. ``("pretraining", "clustering")``.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, tuple | list) and len(value) == 2:
        pair = tuple(value)
    else:
        raise TypeError(f"`{name}` must be an int or a pair ({stages[0]}, {stages[1]}) of ints, got {value!r}.")
    out = []
    for stage, v in zip(stages, pair):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"`{name}` ({stage} stage) must be an integer, got {v!r}.")
        if v < minimum:
            raise ValueError(f"`{name}` ({stage} stage) must be ≥ {minimum}, got {v}.")
        out.append(int(v))
    return out[0], out[1]


def check_affinity_matrix(P: object, n: int, where: str) -> sparse.csr_matrix:
    """A stored affinity matrix as CSR, checked: n × n, finite, non-negative and not all zero.

    ``where`` names it in the messages (e.g. ``"adata.obsp['affinity']"``).
    """
    if not (sparse.issparse(P) or isinstance(P, np.ndarray)):
        raise TypeError(f"{where} must be a sparse matrix or an array, got {type(P).__name__}.")
    if P.ndim != 2 or P.shape != (n, n):
        raise ValueError(f"{where} must be square, ({n}, {n}) for {n} cells, got {P.shape}.")
    P = sparse.csr_matrix(P)
    check_finite(P, where)
    if P.nnz and P.data.min() < 0:
        raise ValueError(f"{where} holds negative affinities (min {P.data.min():g}).")
    if P.sum() <= 0:
        raise ValueError(f"{where} is all zero.")
    return P


def check_bool(value: object, name: str) -> bool:
    """Check a flag is True or False (NumPy booleans included); a string such as ``"no"`` is refused."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return bool(value)


def check_optional_bool(value: object, name: str) -> bool | None:
    """Check a flag is True, False or None (``show_progress``: None follows the verbosity)."""
    return None if value is None else check_bool(value, name)


def check_n_jobs(value: object, name: str = "n_jobs") -> int | None:
    """Check a thread count: None (all cores), a positive integer, or a negative one (joblib's -1 = all cores)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer or None, got {value!r}.")
    if value == 0:
        raise ValueError(f"`{name}` must be a positive integer, -1 (all cores) or None, got 0.")
    return int(value)


def check_int_sequence(value: object, name: str, *, minimum: int = 1, allow_empty: bool = False) -> tuple[int, ...]:
    """Check a sequence of integers (e.g. ``hidden`` layer widths), each ≥ ``minimum``; a bare int is refused."""
    from collections.abc import Sequence

    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
        raise TypeError(f"`{name}` must be a sequence of integers, e.g. (50, 50), got {value!r}.")
    if len(value) == 0 and not allow_empty:
        raise TypeError(f"`{name}` must be a non-empty sequence of integers, got {value!r}.")
    return tuple(check_positive_int(v, name, minimum=minimum) for v in value)


def is_backed_matrix(X: object) -> bool:
    """Whether ``X`` is an on-disk matrix (``read_h5ad(..., backed='r')``: an h5py dataset or anndata's sparse one)."""
    if X is None or isinstance(X, np.ndarray) or sparse.issparse(X):
        return False
    return type(X).__module__.split(".")[0] in ("h5py", "anndata", "zarr")


def check_not_backed(adata: AnnData, where: str, *, layer: str | None = None) -> None:
    """Refuse an AnnData whose ``X`` is on disk (backed) when ``where`` (e.g. ``"tl.scdeepcluster"``) reads ``X``.

    Layers and ``obsm`` of a backed AnnData are in memory, so reading ``layers[layer]`` is fine.
    """
    if layer is None and is_backed_matrix(getattr(adata, "X", None)):
        raise ValueError(
            f"`adata` is backed (read_h5ad(..., backed='r')): {where} needs adata.X in memory; "
            "call adata = adata.to_memory() first."
        )


def copy_adata(adata: AnnData) -> AnnData:
    """``adata.copy()``, or for a backed AnnData its in-memory copy (``to_memory()``; ``copy()`` needs a file name)."""
    return adata.to_memory() if adata.isbacked else adata.copy()
