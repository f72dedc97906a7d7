from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from anndata import AnnData

from .._utils import check_key

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _declared_history(adata: AnnData, key: str) -> dict[str, np.ndarray]:
    """The per-epoch curves a trainer declared in ``adata.uns[key]["history"]``, as float arrays (1-D or 2-D)."""
    if not isinstance(key, str):
        raise TypeError(f"`key` must be a string key of adata.uns, got {key!r}.")
    check_key(adata.uns, key, arg="key", where="adata.uns")
    entry = adata.uns[key]
    if not isinstance(entry, dict) or not isinstance(entry.get("history"), dict) or not entry["history"]:
        raise KeyError(f"`key={key!r}`: adata.uns[{key!r}] holds no per-epoch 'history' to plot.")
    out = {}
    for name, values in entry["history"].items():
        try:
            arr = np.asarray(values, dtype=float)
        except (TypeError, ValueError) as e:
            raise ValueError(f"adata.uns[{key!r}]['history'][{name!r}] must hold numbers, got {values!r}.") from e
        if arr.ndim not in (1, 2):
            raise ValueError(f"adata.uns[{key!r}]['history'][{name!r}] must be 1- or 2-dimensional, got {arr.shape}.")
        out[name] = arr
    return out


def history(
    adata: AnnData,
    key: str,
    *,
    curves: str | Sequence[str] | None = None,
    log_y: bool = False,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
) -> Axes | list[Axes]:
    """Plot the per-epoch losses a trainer declared in ``adata.uns[key]["history"]``, one panel per quantity.

    Every quantity gets its own panel, y axis and label, so losses of different scales stay readable. A 2-D
    history (one row per query batch, as iMAP's stage II) draws one line per row. Parameters, layer widths and
    flags stored next to the history are not plotted.

    Parameters
    ----------
    adata
        Annotated data matrix on which a tool (``tl.ee``, ``tl.neuralee``, ``tl.scdeepcluster``,
        ``tl.imap_integrate``) has run.
    key
        The tool's ``key_added`` (e.g. ``"ee"``).
    curves
        Name, or names, of the quantities to plot (default: all of the history).
    log_y
        Logarithmic y axes.
    ax
        A matplotlib axes to draw into (one quantity), or a sequence of them, one per quantity (default: a new
        figure).
    show
        Show the figure (default: when no ``ax`` was given and matplotlib is interactive).

    Returns
    -------
    The matplotlib axes of the one quantity, or a list of axes, one per quantity.
    """
    import matplotlib.pyplot as plt

    hist = _declared_history(adata, key)
    if curves is None:
        names = list(hist)
    elif isinstance(curves, str):
        names = [curves]  # one curve, not its letters
    elif isinstance(curves, Sequence | np.ndarray) and all(isinstance(c, str) for c in curves) and len(curves):
        names = list(curves)
    else:
        raise TypeError(f"`curves` must be a curve name or a non-empty list of them, got {curves!r}.")
    for name in names:
        check_key(hist, name, arg="curves", where=f"adata.uns[{key!r}]['history']")
    axes = None if ax is None else [ax] if not isinstance(ax, Sequence | np.ndarray) else list(ax)
    if axes is None:
        n_cols = min(3, len(names))
        n_rows = -(-len(names) // n_cols)
        fig, grid = plt.subplots(n_rows, n_cols, figsize=(4 * n_cols, 3 * n_rows), squeeze=False)
        for extra in grid.ravel()[len(names) :]:
            extra.set_visible(False)
        axes = list(grid.ravel()[: len(names)])
        fig.suptitle(key)
    elif len(axes) != len(names):
        raise ValueError(f"`ax` must hold one axes per quantity ({len(names)}: {names}), got {len(axes)}.")
    for panel, name in zip(axes, names):
        values = hist[name]
        for i, row in enumerate(np.atleast_2d(values)):
            label = f"{name} [{i}]" if values.ndim == 2 else name
            panel.plot(np.arange(1, len(row) + 1), row, label=label)
        panel.set_xlabel("epoch")
        panel.set_ylabel(name)
        if log_y:
            panel.set_yscale("log")
        if values.ndim == 2 and values.shape[0] > 1:
            panel.legend(frameon=False)
    if ax is None:
        axes[0].figure.tight_layout()
    if show or (show is None and ax is None and plt.isinteractive()):
        plt.show()
    return axes[0] if len(axes) == 1 else list(axes)
