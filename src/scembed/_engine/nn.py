"""Building blocks of the networks: one multilayer-perceptron builder used by every method."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence

import torch
from torch import nn


def mlp(
    sizes: Sequence[int],
    *,
    batchnorm: bool = True,
    activation: type[nn.Module] | None = nn.ReLU,
    dropout: float = 0.0,
    final_activation: bool = False,
) -> nn.Sequential:
    """A stack of Linear (+ BatchNorm) (+ activation) (+ dropout) layers through ``sizes``.

    ``sizes = (d_in, h1, ..., d_out)``. The last layer is a plain Linear unless ``final_activation``, in which
    case it gets the same normalisation/activation as the hidden layers.
    """
    if len(sizes) < 2:
        raise ValueError(f"an MLP needs at least an input and an output size, got {tuple(sizes)}")
    layers: list[nn.Module] = []
    n_layers = len(sizes) - 1
    for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(d_in, d_out))
        if i < n_layers - 1 or final_activation:
            if batchnorm:
                layers.append(nn.BatchNorm1d(d_out))
            if activation is not None:
                layers.append(activation())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@torch.no_grad()
def predict_in_batches(
    module: nn.Module, X, *, batch_size: int = 65536, device: torch.device | str = "cpu", to_tensor=None
) -> torch.Tensor:
    """Apply ``module`` in eval mode to the rows of ``X`` in batches; returns a CPU float32 tensor.

    ``to_tensor(rows)`` turns a slice of ``X`` into a float32 tensor (default: ``torch.as_tensor``), so sparse or
    on-disk inputs are densified one batch at a time.
    """
    was_training = module.training
    module.eval()
    n = X.shape[0]
    out = []
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        batch = to_tensor(rows) if to_tensor is not None else torch.as_tensor(X[rows], dtype=torch.float32)
        out.append(module(batch.to(device)).float().cpu())
    module.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type; a context that changes nothing for ``dtype=None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
