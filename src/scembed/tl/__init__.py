"""Tools: embeddings, clustering and integration."""

from ._neuralee import neuralee

__all__: list[str] = ["neuralee"]
