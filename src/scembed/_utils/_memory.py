"""Host memory: hand the C heap's free pages back to the operating system between the stages of a run."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc (Linux); musl, macOS and Windows have none
    except (AttributeError, OSError, TypeError):
        return None


def release_free_memory() -> bool:
    """Return the C heap's free pages to the operating system (glibc's ``malloc_trim(0)``); elsewhere nothing.

    A training step allocates and frees hundreds of megabytes of activations and gradients; glibc keeps what was
    freed mapped for reuse, so the resident size after a stage holds that stage's largest working set. Releasing it
    before the next stage allocates its outputs keeps the peak at the largest single stage's need instead of the sum.
    Returns whether anything was called.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
