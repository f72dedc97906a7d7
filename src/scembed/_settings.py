"""Package-wide settings: default device, verbosity, default seed and progress bars."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ScembedSettings:
    """Global defaults used when a function is called with ``device="auto"`` or ``verbosity=None``.

    Attributes
    ----------
    device
        ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    verbosity
        ``None`` follows ``scanpy.settings.verbosity``; otherwise 0 (errors) … 4 (debug).
        Progress bars are shown unless the verbosity is 0 (or ``progress`` is False).
    progress
        Set to ``False`` to turn every progress bar off regardless of verbosity.
    random_state
        Seed used by functions whose ``random_state`` is ``None``.
    """

    device: str = "auto"
    verbosity: int | None = None
    progress: bool = True
    random_state: int = 0

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"scembed.settings({fields})"


settings = ScembedSettings()
