from __future__ import annotations

import torch

from .._settings import settings


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"``/``None``/``"cpu"``/``"cuda[:N]"``/a :class:`torch.device` into a :class:`torch.device`.

    ``"auto"`` picks ``settings.device`` unless that is ``"auto"`` too, in which case CUDA when present, else CPU.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        device = settings.device
        if device == "auto":
            return _local(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"`device` must be 'auto', 'cpu', 'cuda' or a torch.device, got {device!r}.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device={device!r}` was requested but CUDA is not available; use device='auto' or 'cpu'.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"`device` must be a CPU or CUDA device, got {device!r}.")
    return _local(dev)


def _local(dev: torch.device) -> torch.device:
    from .._engine.distributed import local_device  # under torchrun: "cuda" is this rank's GPU

    return local_device(dev)
