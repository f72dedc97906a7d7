from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

from .._settings import settings

_logger = logging.getLogger("scembed")


def _is_main() -> bool:
    from .._engine.distributed import is_main

    return is_main()


def verbosity() -> int:
    """Effective verbosity: scembed's own setting, else scanpy's (0 error … 4 debug)."""
    if settings.verbosity is not None:
        return int(settings.verbosity)
    try:
        import scanpy as sc

        return int(sc.settings.verbosity)
    except Exception:  # scanpy missing or its setting unreadable: default to warnings
        return 1


def get_logger() -> logging.Logger:
    """The package logger, its level following :func:`verbosity`."""
    level = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.INFO}.get(verbosity(), logging.DEBUG)
    _logger.setLevel(level if _is_main() else logging.ERROR)  # under torchrun only rank 0 logs
    if not _logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        _logger.addHandler(handler)
    return _logger


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    show: bool | None = None,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar on stderr with the stage name, tqdm's elapsed and remaining time, and the postfix set by the caller.

    ``show=True``/``False`` forces it on or off; ``None`` shows it unless the verbosity (``se.settings.verbosity``,
    else scanpy's) is 0 or ``se.settings.progress`` is False.
    """
    if show is None:
        show = show_progress_default()
    if not _is_main():  # under torchrun only rank 0 shows progress
        show = False
    return tqdm(iterable, total=total, desc=desc, disable=not show, leave=False, dynamic_ncols=True, **kwargs)


def show_progress_default() -> bool:
    """Whether progress bars are shown when a function gets ``show_progress=None``."""
    return bool(settings.progress) and verbosity() > 0
