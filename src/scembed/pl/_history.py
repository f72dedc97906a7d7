from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from anndata import AnnData

from .._utils import check_key

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def history(
    adata: AnnData,
    key: str,
    *,
    curves: Sequence[str] | None = None,
    log_y: bool = False,
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes:
    """Plot the per-iteration histories that a tool stored in ``adata.uns[key]["history"]``.

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
    check_key(adata.uns[key], "history", arg="key", where=f"adata.uns[{key!r}]")
    hist = adata.uns[key]["history"]
    names = list(hist) if curves is None else list(curves)
    for name in names:
        check_key(hist, name, arg="curves", where=f"adata.uns[{key!r}]['history']")
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
