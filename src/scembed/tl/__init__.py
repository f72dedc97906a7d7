"""Tools: embeddings, clustering and integration."""

from .._engine.imap import IMAPModel
from .._engine.models.autoencoder import AutoencoderModel
from .._engine.neuralee import NeuralEEModel
from ._autoencoder import autoencoder
from ._ee import ee
from ._imap import imap_integrate
from ._neuralee import neuralee
from ._scdeepcluster import ScDeepClusterModel, scdeepcluster

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
