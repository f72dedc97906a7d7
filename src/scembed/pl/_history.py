from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from anndata import AnnData

from .._utils import check_key

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _histories(entry: dict) -> dict[str, np.ndarray]:
    """Per-iteration curves of a tool's ``uns`` entry.

    Its ``history`` dict if it has one, else every numeric sequence in it (one level of nesting: ``outer/inner``).
    """
    if "history" in entry:
        entry = entry["history"]
    found: dict[str, np.ndarray] = {}
    for name, value in entry.items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        for inner, v in items:
            if isinstance(v, str | bytes | dict):
                continue
            arr = np.asarray(v)
            if arr.ndim == 1 and arr.size > 1 and np.issubdtype(arr.dtype, np.number):
                found[f"{name}/{inner}" if inner else name] = arr.astype(float)
    return found


def history(
    adata: AnnData,
    key: str,
    *,
    curves: Sequence[str] | None = None,
    log_y: bool = False,
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes:
    """Plot the per-iteration histories (losses, objective) that a tool stored in ``adata.uns[key]``.

    Parameters
    ----------
    adata
        Annotated data matrix on which a tool (``tl.ee``, ``tl.neuralee``, ``tl.scdeepcluster``,
        ``tl.imap_integrate``) has run.
    key
        The tool's ``key_added`` (e.g. ``"ee"``).
    curves
        Names of the histories to plot (default: all).
    log_y
        Logarithmic y axis.
    ax
        A matplotlib axes to draw into.
    show
        Show the figure (default: when no ``ax`` was given and matplotlib is interactive).

    Returns
    -------
    The matplotlib axes.
    """
    import matplotlib.pyplot as plt

    check_key(adata.uns, key, arg="key", where="adata.uns")
    hist = _histories(adata.uns[key])
    if not hist:
        raise KeyError(f"`key={key!r}`: adata.uns[{key!r}] holds no per-iteration history to plot.")
    names = list(hist) if curves is None else list(curves)
    for name in names:
        check_key(hist, name, arg="curves", where=f"the histories of adata.uns[{key!r}]")
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    for name in names:
        values = np.asarray(hist[name], dtype=float)
        ax.plot(np.arange(1, len(values) + 1), values, label=name)
    ax.set_xlabel("iteration")
    ax.set_title(key)
    if log_y:
        ax.set_yscale("log")
    if len(names) > 1:
        ax.legend(frameon=False)
    if show or (show is None and plt.isinteractive()):
        plt.show()
    return ax
