"""Where a function's outputs go: ``key_added`` is a base name, every AnnData slot derives from it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OutputKeys:
    """The AnnData keys derived from one base name (``key_added``), as scanpy names its outputs."""

    base: str

    @property
    def obsm(self) -> str:
        """Embedding key: ``"X_" + base`` (so ``sc.pl.embedding(adata, basis=base)`` finds it)."""
        return f"X_{self.base}"

    @property
    def uns(self) -> str:
        """Parameters and history: ``base``."""
        return self.base

    @property
    def obs(self) -> str:
        """Labels: ``base``."""
        return self.base

    @property
    def obsp(self) -> str:
        """Cell × cell graph: ``base``."""
        return self.base

    @property
    def layers(self) -> str:
        """Corrected expression: ``base``."""
        return self.base

    def suffixed(self, suffix: str) -> str:
        """A secondary key, ``base + "_" + suffix`` (e.g. ``obsm["scdeepcluster_proba"]``)."""
        return f"{self.base}_{suffix}"


def output_keys(key_added: object, *, arg: str = "key_added") -> OutputKeys:
    """Check ``key_added`` is a base name (a non-empty string not starting with ``"X_"``) and derive the keys."""
    if not isinstance(key_added, str) or not key_added:
        raise TypeError(f"`{arg}` must be a non-empty string, got {key_added!r}.")
    if key_added.startswith("X_"):
        raise ValueError(
            f"`{arg}={key_added!r}` must be a base name without the 'X_' prefix: the embedding goes to "
            f"obsm['X_' + {arg}] and the record to uns[{arg}]; pass `{arg}={key_added[2:]!r}`."
        )
    return OutputKeys(key_added)
