"""Package-wide settings: default device, verbosity, default seed and progress bars."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

#: verbosity names scanpy accepts for its own setting, and their levels
_VERBOSITY_NAMES = {"error": 0, "warning": 1, "info": 2, "hint": 3, "debug": 4}


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

    def __setattr__(self, name: str, value: Any) -> None:
        """Check a value when it is assigned, so that a wrong one fails here and not in a later call."""
        if name not in self.__dataclass_fields__:
            raise AttributeError(
                f"scembed.settings has no setting {name!r}; settings: {', '.join(self.__dataclass_fields__)}."
            )
        super().__setattr__(name, _check_setting(name, value))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"scembed.settings({fields})"


def _check_setting(name: str, value: Any) -> Any:
    if name == "device":
        import torch

        if isinstance(value, torch.device):
            value = str(value)
        ok = isinstance(value, str) and (
            value == "auto" or value in ("cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit())
        )
        if not ok:
            raise ValueError(f"`settings.device` must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}.")
        return value
    if name == "verbosity":
        if value is None:
            return None
        if isinstance(value, str) and value in _VERBOSITY_NAMES:
            return _VERBOSITY_NAMES[value]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= 4:
            raise ValueError(
                f"`settings.verbosity` must be None, an integer 0 (errors) … 4 (debug) or one of "
                f"{list(_VERBOSITY_NAMES)}, got {value!r}."
            )
        return int(value)
    if name == "progress":
        if not isinstance(value, bool):
            raise TypeError(f"`settings.progress` must be True or False, got {value!r}.")
        return value
    if name == "random_state":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise TypeError(f"`settings.random_state` must be a non-negative integer, got {value!r}.")
        return int(value)
    return value


settings = ScembedSettings()
