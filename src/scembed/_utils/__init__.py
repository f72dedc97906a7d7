"""Utilities shared by every public function: device, seeding, progress, input checks, representations."""

from ._device import PRECISIONS, native_bf16, resolve_device, resolve_precision
from ._docs import doc_params, shared_docs
from ._io import check_features, load_checkpoint, save_checkpoint
from ._keys import OutputKeys, output_keys
from ._logging import get_logger, progress, verbosity
from ._random import check_random_state, seeded_torch
from ._renames import renamed_parameters
from ._rep import get_representation, network_input, pca_on_the_fly, read_rows, row_blocks
from ._validation import (
    check_adata,
    check_affinity_matrix,
    check_bool,
    check_counts,
    check_finite,
    check_in_range,
    check_int_pair,
    check_int_sequence,
    check_key,
    check_n_jobs,
    check_not_backed,
    check_optional_bool,
    check_positive_int,
    copy_adata,
    is_backed_matrix,
)

__all__ = [
    "PRECISIONS",
    "OutputKeys",
    "check_adata",
    "check_affinity_matrix",
    "check_bool",
    "check_counts",
    "check_features",
    "check_finite",
    "check_in_range",
    "check_int_pair",
    "check_int_sequence",
    "check_key",
    "check_n_jobs",
    "check_not_backed",
    "check_optional_bool",
    "check_positive_int",
    "check_random_state",
    "copy_adata",
    "doc_params",
    "get_logger",
    "get_representation",
    "is_backed_matrix",
    "load_checkpoint",
    "native_bf16",
    "network_input",
    "output_keys",
    "pca_on_the_fly",
    "progress",
    "read_rows",
    "renamed_parameters",
    "resolve_device",
    "resolve_precision",
    "row_blocks",
    "save_checkpoint",
    "seeded_torch",
    "shared_docs",
    "verbosity",
]
