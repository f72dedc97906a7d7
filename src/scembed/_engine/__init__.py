"""Array/tensor engines behind the public API. Nothing in this package imports AnnData."""
