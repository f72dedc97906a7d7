"""Plotting: training histories. Embeddings are plotted with ``sc.pl.embedding(adata, basis=...)``."""

from ._history import history

__all__ = ["history"]
