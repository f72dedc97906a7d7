"""Tools: embeddings, clustering and integration."""

from ._neuralee import neuralee
from ._scdeepcluster import ScDeepClusterModel, scdeepcluster

__all__: list[str] = ["ScDeepClusterModel", "neuralee", "scdeepcluster"]
