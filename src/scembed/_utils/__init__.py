"""Utilities shared by every public function: device, seeding, progress, input checks, representations."""

from ._device import resolve_device
from ._io import check_features, load_checkpoint, save_checkpoint
from ._logging import get_logger, progress, verbosity
from ._random import check_random_state, seeded_torch
from ._rep import get_representation, to_dense_rows
from ._validation import (
    check_adata,
    check_counts,
    check_finite,
    check_in_range,
    check_key,
    check_positive_int,
)

__all__ = [
    "check_adata",
    "check_counts",
    "check_features",
    "check_finite",
    "check_in_range",
    "check_key",
    "check_positive_int",
    "check_random_state",
    "get_logger",
    "get_representation",
    "load_checkpoint",
    "progress",
    "resolve_device",
    "save_checkpoint",
    "seeded_torch",
    "to_dense_rows",
    "verbosity",
]
