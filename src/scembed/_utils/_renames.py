"""Renamed parameters: calling with an old name raises a TypeError that names the new one."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def renamed_parameters(**renames: str) -> Callable[[F], F]:
    """Decorate a function whose parameters were renamed (``old="new"``).

    A call with an old name raises ``TypeError("f(): `old` was renamed `new` ...")`` before any work. The wrapper
    keeps the function's name, docstring and signature (:func:`functools.wraps`), so ``inspect.signature`` shows
    the new names only. The mapping is kept in ``func.__renamed_parameters__`` (for tests and docs).
    """
    for old, new in renames.items():
        if not isinstance(new, str) or not new:
            raise TypeError(f"renamed_parameters: the new name of `{old}` must be a non-empty string, got {new!r}.")

    def decorator(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            old = [name for name in kwargs if name in renames]
            if old:
                moves = "; ".join(f"`{name}` was renamed `{renames[name]}`" for name in old)
                raise TypeError(f"{func.__name__}(): {moves} (see help({func.__name__})).")
            return func(*args, **kwargs)

        wrapper.__renamed_parameters__ = dict(renames)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorator
