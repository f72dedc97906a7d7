from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from .._settings import settings


def check_random_state(random_state: int | np.random.Generator | None) -> np.random.Generator:
    """Return a NumPy generator; ``None`` uses ``settings.random_state`` (results stay reproducible)."""
    if isinstance(random_state, np.random.Generator):
        return random_state
    if random_state is None:
        random_state = settings.random_state
    if isinstance(random_state, bool) or not isinstance(random_state, int | np.integer):
        raise TypeError(f"`random_state` must be an int or None, got {type(random_state).__name__}.")
    return np.random.default_rng(int(random_state))


def seed_int(random_state: int | None) -> int:
    """The integer seed behind ``random_state`` (``None`` → ``settings.random_state``)."""
    if random_state is None:
        return int(settings.random_state)
    if isinstance(random_state, bool) or not isinstance(random_state, int | np.integer):
        raise TypeError(f"`random_state` must be an int or None, got {type(random_state).__name__}.")
    return int(random_state)


@contextlib.contextmanager
def seeded_torch(random_state: int | None, device: torch.device | None = None) -> Iterator[torch.Generator]:
    """Seed torch inside the block without touching the caller's global RNG state afterwards.

    Network initialisation and dropout draw from torch's global generators, so they are forked and seeded
    here; the block also receives a dedicated :class:`torch.Generator` for explicit sampling.
    """
    seed = seed_int(random_state)
    devices = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices, enabled=True):
        torch.manual_seed(seed)
        gen = torch.Generator(device=device if device is not None else "cpu")
        gen.manual_seed(seed)
        yield gen
