"""Trained models: one module per model, all following the protocol of :mod:`.base` (save/load, features, device)."""

from .autoencoder import AutoencoderModel
from .base import Model
from .imap import IMAPModel
from .neuralee import NeuralEEModel
from .scdeepcluster import ScDeepClusterModel

__all__ = ["AutoencoderModel", "IMAPModel", "Model", "NeuralEEModel", "ScDeepClusterModel"]
