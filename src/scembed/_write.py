"""Writing results: atomically, and from one process when ``torchrun`` started several."""

from __future__ import annotations

import os

import torch
from anndata import AnnData

from ._engine import distributed
from ._utils._io import write_atomic


def write_h5ad(adata: AnnData, filename: str | os.PathLike, **kwargs) -> None:
    """Write ``adata`` to an ``.h5ad`` file atomically; under ``torchrun``, rank 0 writes once every rank is done.

    :meth:`anndata.AnnData.write_h5ad` writes in place, so a process that stops part-way (out of memory, a killed
    job) leaves a truncated file that later fails to open, or has replaced a good one. Here the file is written
    under a temporary name in the same folder and renamed over ``filename`` only when complete: ``filename``
    is either the previous file or the whole new one.

    Under ``torchrun`` (several processes, see :mod:`scembed._engine.distributed`) every rank holds the same
    result, and this is called by every rank: the ranks first meet in one collective, then rank 0 alone writes,
    and the others wait for it. A rank that failed before this point never joins, so the others raise after
    ``SCEMBED_DIST_TIMEOUT`` seconds instead of writing a file from an incomplete job.

    Parameters
    ----------
    adata
        The annotated data to write.
    filename
        Path of the ``.h5ad`` file; its folder is created if needed.
    **kwargs
        Passed to :meth:`anndata.AnnData.write_h5ad` (e.g. ``compression="gzip"``).

    Examples
    --------
    >>> import scembed as se
    >>> se.tl.neuralee(adata)  # doctest: +SKIP
    >>> se.write_h5ad(adata, "embedded.h5ad")  # doctest: +SKIP
    """
    if not isinstance(adata, AnnData):
        raise TypeError(f"`adata` must be an AnnData, got {type(adata).__name__}.")
    if not isinstance(filename, str | os.PathLike):
        raise TypeError(f"`filename` must be a path, got {type(filename).__name__}.")
    w = distributed.world()
    done = torch.ones(1)
    if w.distributed:
        distributed.all_reduce_sum(done)  # every rank reached this point (or the timeout raises)
    if w.is_main:
        write_atomic(filename, lambda tmp: adata.write_h5ad(tmp, **kwargs))
    if w.distributed:
        distributed.all_reduce_sum(done)  # the others return once the file is in place
