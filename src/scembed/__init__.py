"""scembed: deep, GPU-accelerated embedding, clustering and batch integration for scanpy/AnnData.

>>> import scembed as se
>>> se.pp.affinity(adata)  # doctest: +SKIP
"""

from . import datasets, pl, pp, tl
from ._settings import settings
from ._write import write_h5ad

__version__ = "0.1.0"

__all__ = ["__version__", "datasets", "pl", "pp", "settings", "tl", "write_h5ad"]
