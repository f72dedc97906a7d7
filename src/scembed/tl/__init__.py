"""Tools: embeddings, clustering and integration."""

__all__: list[str] = []
