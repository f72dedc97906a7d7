"""Model files: one torch file of plain tensors and JSON metadata, written atomically, read without unpickling code."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: tag of a model file; ``FORMAT_VERSION`` counts incompatible changes of the payload's layout
FORMAT = "scembed-model"
FORMAT_VERSION = 1


def _json_default(value: Any) -> Any:
    """NumPy scalars and arrays in metadata become plain JSON numbers and lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"metadata value of type {type(value).__name__} cannot be stored as JSON")


def save_checkpoint(
    path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> None:
    """Save tensors with JSON metadata in one torch file, atomically.

    The payload is ``{"format": "scembed-model", "version": 1, "metadata": <JSON text>, "state_dict": {...}}``;
    only tensors, strings and integers, so :func:`load_checkpoint` reads it with ``torch.load(weights_only=True)``.
    The file is written to a temporary name in the same folder and renamed over ``path``, so an interrupted save
    never leaves a truncated model behind.

    Raises
    ------
    IsADirectoryError, FileNotFoundError, PermissionError, OSError
        ``path`` is a folder, its folder does not exist, or it cannot be written (the message names ``path``).
    TypeError
        A metadata value is not JSON-serialisable, or a state value is not a tensor.
    """
    target = os.path.abspath(os.fspath(path))
    if os.path.isdir(target):
        raise IsADirectoryError(f"cannot save the model to {os.fspath(path)!r}: it is a directory; give a file name.")
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save the model to {os.fspath(path)!r}: {folder!r} is not an existing folder.")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state entry {key!r} must be a tensor, got {type(value).__name__}.")
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "metadata": json.dumps(metadata, default=_json_default),
        "state_dict": {str(k): v.detach().cpu().contiguous() for k, v in state_dict.items()},
    }
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    except OSError as e:
        raise type(e)(f"cannot write the model file {os.fspath(path)!r}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        mask = os.umask(0)  # mkstemp makes the file private; give it the permissions of a normally created file
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise type(e)(f"cannot write the model file {os.fspath(path)!r}: {e.strerror or e}") from e
        raise


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read what :func:`save_checkpoint` wrote, with ``torch.load(weights_only=True)`` (no pickled code runs).

    Returns
    -------
    state_dict
        The tensors (on the CPU).
    metadata
        The JSON metadata, as given to :func:`save_checkpoint`.

    Raises
    ------
    FileNotFoundError, IsADirectoryError, PermissionError, OSError
        ``path`` is missing, a folder, or unreadable.
    ValueError
        The file is not a model saved by scembed (empty, truncated, text, another torch file, pickled objects,
        a newer format, or metadata that is not a JSON object); the message names the file.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise FileNotFoundError(f"no model file at {name!r}.")
    if os.path.isdir(name):
        raise IsADirectoryError(f"{name!r} is a directory, not a model file.")
    with open(name, "rb"):  # unreadable → PermissionError naming the file, before torch sees it
        pass

    def bad(reason: str) -> ValueError:
        return ValueError(f"{name!r} is not a model saved by scembed ({reason}).")

    if os.path.getsize(name) == 0:
        raise bad("the file is empty")
    if not zipfile.is_zipfile(name):  # every torch.save file is a zip archive
        raise bad("not a torch file: truncated, text or another format")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = torch.load(name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise bad(
            "it holds pickled Python objects, not only tensors and text; not loaded, as that could run code"
        ) from e
    except (OSError, MemoryError):
        raise
    except Exception as e:  # torch raises many kinds of errors for damaged archives
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise bad(f"unreadable or damaged: {first}") from e
    tag = payload.get("format") if isinstance(payload, dict) else None
    if isinstance(tag, str) and tag.startswith("scembed-") and tag != FORMAT:
        raise bad(f"format {tag!r} of an earlier development version, no longer read; train and save the model again")
    if tag != FORMAT:
        raise bad("no scembed format tag")
    version = payload.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise bad(f"format version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{name!r} was written in model format version {version}, newer than this scembed reads "
            f"({FORMAT_VERSION}); upgrade scembed."
        )
    state, text = payload.get("state_dict"), payload.get("metadata")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise bad("its state_dict is not a mapping of names to tensors")
    if not isinstance(text, str):
        raise bad("its metadata is not JSON text")
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad(f"its metadata is not valid JSON: {e}") from e
    if not isinstance(metadata, dict):
        raise bad("its metadata is not a JSON object")
    return state, metadata


def check_features(expected: Sequence[str], got: Sequence[str], *, what: str = "adata.var_names") -> None:
    """Refuse data whose features differ from those the model was trained on (names and order)."""
    expected, got = list(map(str, expected)), list(map(str, got))
    if expected == got:
        return
    got_set = set(got)
    missing = [g for g in expected if g not in got_set]
    if not missing and len(got) == len(expected):
        raise ValueError(
            f"{what} hold the {len(expected)} features the model was trained on, but in another order; reorder the "
            "data to the training order, e.g. adata[:, model.var_names]."
        )
    raise ValueError(
        f"{what} differ from the {len(expected)} features the model was trained on "
        f"({len(got)} given, {len(missing)} missing, e.g. {missing[:5]}); subset the data to the training features "
        "in the same order, e.g. adata[:, model.var_names]."
    )


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then move it in place (no half-written file).

    The folder is created if needed; on any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the permissions of a new file
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
