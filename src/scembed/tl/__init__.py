"""Tools: embeddings, clustering and integration."""

from .._engine.models import IMAPModel, NeuralEEModel, ScDeepClusterModel
from ._ee import ee
from ._imap import imap_integrate
from ._neuralee import neuralee
from ._scdeepcluster import scdeepcluster

__all__: list[str] = [
    "IMAPModel",
    "NeuralEEModel",
    "ScDeepClusterModel",
    "ee",
    "imap_integrate",
    "neuralee",
    "scdeepcluster",
]
