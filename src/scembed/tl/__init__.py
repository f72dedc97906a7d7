"""Tools: embeddings, clustering and integration."""

from ._ee import ee
from ._imap import imap_integrate
from ._neuralee import neuralee
from ._scdeepcluster import ScDeepClusterModel, scdeepcluster

__all__: list[str] = ["ScDeepClusterModel", "ee", "imap_integrate", "neuralee", "scdeepcluster"]
