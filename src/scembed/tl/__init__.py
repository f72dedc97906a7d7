"""Tools: embeddings, clustering and integration."""

from .._engine.models import AutoencoderModel, IMAPModel, NeuralEEModel, ScDeepClusterModel
from ._autoencoder import autoencoder
from ._ee import ee
from ._imap import imap_integrate
from ._neuralee import neuralee
from ._scdeepcluster import scdeepcluster

__all__: list[str] = [
    "AutoencoderModel",
    "IMAPModel",
    "NeuralEEModel",
    "ScDeepClusterModel",
    "autoencoder",
    "ee",
    "imap_integrate",
    "neuralee",
    "scdeepcluster",
]
