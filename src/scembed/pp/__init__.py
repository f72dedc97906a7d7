"""Preprocessing: affinities and graphs computed once and reused by the tools."""

from ._affinity import affinity

__all__ = ["affinity"]
