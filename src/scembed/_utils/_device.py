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


#: the ``precision`` values every trainer that offers mixed precision accepts (Lightning's names)
PRECISIONS = ("auto", "32-true", "bf16-mixed")


def native_bf16(dev: torch.device) -> bool:
    """Whether ``dev`` multiplies bfloat16 matrices in hardware.

    CUDA: ``torch.cuda.is_bf16_supported(including_emulation=False)`` (Ampere and later; older GPUs emulate
    bfloat16, which is slower than float32). CPU: the AVX512-BF16 or AMX-BF16 instructions
    listed in ``/proc/cpuinfo`` (Linux); without them oneDNN emulates bfloat16 products, which is no faster than
    float32, and elsewhere the answer is no.
    """
    if dev.type == "cuda":
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch before 2.4 counts no emulation
            return bool(torch.cuda.is_bf16_supported())
    if dev.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str, dev: torch.device) -> torch.dtype | None:
    """The autocast dtype of a training run: ``torch.bfloat16`` for ``"bf16-mixed"``, ``None`` for ``"32-true"``.

    ``"auto"`` is ``"bf16-mixed"`` where :func:`native_bf16` holds and ``"32-true"`` elsewhere. Mixed precision
    computes the matrix products of the forward and backward passes in bfloat16 and keeps weights, optimiser state
    and losses in float32 (``torch.autocast``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {', '.join(map(repr, PRECISIONS))}; got {precision!r}.")
    if precision == "auto":
        precision = "bf16-mixed" if native_bf16(dev) else "32-true"
    return torch.bfloat16 if precision == "bf16-mixed" else None
