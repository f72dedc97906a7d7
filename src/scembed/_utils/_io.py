from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def save_checkpoint(
    path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> None:
    """Save a model's weights with JSON metadata (architecture, genes, parameters) in one torch file."""
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "metadata": json.dumps(metadata),
        "format": "scembed-1",
    }
    torch.save(payload, os.fspath(path))


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load what :func:`save_checkpoint` wrote, with ``weights_only=True`` (no pickled code runs)."""
    payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != "scembed-1":
        raise ValueError(f"{os.fspath(path)!r} is not a model saved by scembed.")
    return payload["state_dict"], json.loads(payload["metadata"])


def check_features(expected: Sequence[str], got: Sequence[str], *, what: str = "adata.var_names") -> None:
    """Refuse data whose features differ from those the model was trained on."""
    expected, got = list(map(str, expected)), list(map(str, got))
    if expected == got:
        return
    missing = [g for g in expected if g not in set(got)]
    raise ValueError(
        f"{what} differ from the {len(expected)} features the model was trained on "
        f"({len(got)} given, {len(missing)} missing, e.g. {missing[:5]}); subset the data to the training features "
        "in the same order."
    )
