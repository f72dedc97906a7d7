"""Example data generated locally: nothing is downloaded."""

from ._simulate import simulate, simulate_embedding

__all__ = ["simulate", "simulate_embedding"]
