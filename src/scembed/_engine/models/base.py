"""The protocol every trained model of scembed follows (NeuralEE, scDeepCluster, iMAP, autoencoder).

A model is what a ``tl`` function returns with ``return_model=True``: the trained networks plus everything needed
to apply them to new cells (the training features, normalisation, batches, projection). Every model subclasses
:class:`Model` and so behaves alike:

Persistence
    ``model.save(path)`` writes ONE torch file holding plain tensors and JSON metadata (see
    :func:`scembed._utils._io.save_checkpoint`): ``{"format": "scembed-model", "version": 1, "metadata": <JSON>,
    "state_dict": {...}}``. The metadata object carries ``"model"`` (the model's :attr:`Model.kind`),
    ``"model_version"``, ``"scembed_version"``, ``"var_names"`` and ``"config"`` (what the subclass needs to rebuild
    its networks). The file is written atomically (a temporary file in the same folder, then ``os.replace``).
    ``Model.load(path, device="auto")`` — on the subclass, or on :class:`Model` itself, which dispatches on the
    stored kind — reads it with ``torch.load(weights_only=True)``, so no code is unpickled; it leaves torch's
    global random state as it was. A missing or unreadable file raises ``FileNotFoundError``/``OSError``; anything
    that is not a complete model of the right kind (empty, truncated, text, pickled objects, bad metadata, other
    weights) raises one ``ValueError`` naming the file.

Features
    :attr:`Model.var_names` holds the training features in order (``None`` when unknown). Every method that takes
    new data accepts an AnnData and calls :meth:`Model.check_var_names` on ``adata.var_names`` first (a reordered,
    missing or extra gene is a ``ValueError`` naming ``var_names``); the AnnData → array step goes through the
    helpers of :mod:`scembed._utils._model_data`, so model maths see only arrays. Where a method also takes an
    array, no feature check is possible: only the number of columns is checked, and the columns must be the
    training features in order.

Device
    :attr:`Model.device` is where the networks live; ``load(device="auto")`` and :meth:`Model.to` place them with
    :func:`scembed._utils.resolve_device` (``"auto"``: CUDA when present, else CPU; ``"cuda"`` without CUDA: a
    ``ValueError``). Methods that compute take ``device=None`` (the model's device) or any device spec; the model
    is moved there for the call and back afterwards.

Writing a new model
    Set the class attributes :attr:`Model.kind` (a short unique name) and :attr:`Model.name` (for messages),
    implement :meth:`Model._modules` (name → network whose ``state_dict`` is saved), optionally
    :meth:`Model._tensors` (extra tensors), :meth:`Model._config` (JSON-serialisable metadata) and the classmethod
    :meth:`Model._from_config` (build the networks, with random weights, from ``config`` and the extra tensors; the
    base class loads the saved weights into them strictly), keep :attr:`Model.var_names` up to date, and
    optionally :meth:`Model._repr_fields`. Bump :attr:`Model.version` when ``config`` changes incompatibly.
"""

from __future__ import annotations

import contextlib
import itertools
import numbers
import os
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..._utils._device import resolve_device
from ..._utils._io import check_features, load_checkpoint, save_checkpoint

_REGISTRY: dict[str, type[Model]] = {}


class Model:
    """Base class of the trained models: save/load, training features, device, ``repr``.

    See the module docstring of :mod:`scembed._engine.models.base` for the protocol.
    """

    #: short unique name stored in saved files (``metadata["model"]``)
    kind: ClassVar[str] = ""
    #: human-readable name used in messages
    name: ClassVar[str] = "scembed"
    #: version of this model's ``config`` layout; files with a newer one are refused
    version: ClassVar[int] = 1
    #: training features in order (``None``: unknown, no check)
    var_names: list[str] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _REGISTRY[cls.kind] = cls

    # -------------------------------------------------------------------------------- subclass hooks
    def _modules(self) -> dict[str, nn.Module]:
        """Networks whose weights are saved, by a name without dots at either end."""
        raise NotImplementedError

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Tensors saved besides the networks' weights (e.g. projection loadings)."""
        return {}

    def _config(self) -> dict[str, Any]:
        """JSON-serialisable metadata :meth:`_from_config` needs to rebuild the model."""
        return {}

    @classmethod
    def _from_config(
        cls, config: Mapping[str, Any], var_names: list[str] | None, tensors: Mapping[str, torch.Tensor]
    ) -> Model:
        """A model with the saved architecture (random weights; the caller loads the saved weights)."""
        raise NotImplementedError

    def _repr_fields(self) -> dict[str, Any]:
        """Fields shown by ``repr`` (besides the number of features and the device)."""
        return {}

    # -------------------------------------------------------------------------------- features
    @property
    def n_vars(self) -> int | None:
        """Number of training features (``None`` when unknown)."""
        return None if self.var_names is None else len(self.var_names)

    def check_var_names(self, names: Any, *, what: str = "adata.var_names") -> None:
        """Raise a ValueError unless ``names`` equal the training features in order (no check when unknown)."""
        if self.var_names is not None:
            check_features(self.var_names, list(names), what=what)

    # -------------------------------------------------------------------------------- device
    @property
    def device(self) -> torch.device:
        """Where the networks' parameters are."""
        for module in self._modules().values():
            first = next(itertools.chain(module.parameters(), module.buffers()), None)
            if first is not None:
                return first.device
        return torch.device("cpu")

    def to(self, device: str | torch.device | None = "auto") -> Model:
        """Move the networks to ``device`` (resolved by :func:`scembed._utils.resolve_device`); returns the model."""
        dev = resolve_device(device)
        for module in self._modules().values():
            module.to(dev)
        return self

    @contextlib.contextmanager
    def _on(self, device: str | torch.device | None) -> Iterator[torch.device]:
        """Run a block with the networks on ``device`` (``None``: where they are) and move them back after."""
        before = self.device
        dev = before if device is None else resolve_device(device)
        if dev == before:
            yield dev
            return
        self.to(dev)
        try:
            yield dev
        finally:
            self.to(before)

    def _eval(self) -> None:
        for module in self._modules().values():
            module.eval()

    # -------------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the model to one file (weights as plain tensors, JSON metadata), atomically.

        Parameters
        ----------
        path
            File to write (replaced if it exists). Read it back with :meth:`load`.

        Raises
        ------
        OSError
            ``path`` is a directory, its folder does not exist or it cannot be written (names ``path``).
        """
        modules = self._modules()
        state: dict[str, torch.Tensor] = {}
        for prefix, module in modules.items():
            for k, v in module.state_dict().items():
                state[f"{prefix}.{k}"] = v
        for k, v in self._tensors().items():
            if v is not None:
                state[f"tensors.{k}"] = v
        from ... import __version__

        metadata = {
            "model": self.kind,
            "model_version": self.version,
            "scembed_version": __version__,
            "var_names": None if self.var_names is None else [str(v) for v in self.var_names],
            "modules": list(modules),
            "config": self._config(),
        }
        save_checkpoint(path, state, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device | None = "auto") -> Model:
        """Read a model written by :meth:`save`.

        ``torch.load(weights_only=True)``: only tensors and JSON are read, no code is unpickled, and torch's global
        random state is left as it was. Called on :class:`Model` itself, the stored kind picks the class.

        Parameters
        ----------
        path
            The model file.
        device
            Where to put the networks: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"``, ….

        Returns
        -------
        The model, in eval mode, on ``device``.

        Raises
        ------
        FileNotFoundError, OSError
            The file is missing or unreadable.
        ValueError
            The file is not a complete model of this kind (the message names the file), or ``device`` is invalid
            or unavailable.
        """
        dev = resolve_device(device)
        name = os.fspath(path)
        state, meta = load_checkpoint(path)
        kind = meta.get("model")
        target = _REGISTRY.get(kind) if cls is Model else cls
        if target is None or kind != target.kind:
            what = "an unknown model" if kind not in _REGISTRY else f"a {_REGISTRY[kind].name} model"
            expected = "an scembed model" if cls is Model else f"a {cls.name} model"
            raise ValueError(f"{name!r} holds {what} (model={kind!r}), not {expected}.")
        version = meta.get("model_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"{name!r}: bad model_version {version!r} in the metadata.")
        if version > target.version:
            raise ValueError(
                f"{name!r} holds a {target.name} model of version {version}, newer than this scembed reads "
                f"({target.version}); upgrade scembed."
            )
        config, var_names, modules = meta.get("config"), meta.get("var_names"), meta.get("modules")
        if not isinstance(config, dict):
            raise ValueError(f"{name!r}: the metadata has no 'config' object.")
        if var_names is not None and (
            not isinstance(var_names, list) or not all(isinstance(v, str) for v in var_names)
        ):
            raise ValueError(f"{name!r}: 'var_names' in the metadata must be a list of strings.")
        tensors = {k[len("tensors.") :]: v for k, v in state.items() if k.startswith("tensors.")}
        # building networks draws their initial weights from torch's global generator: keep the caller's state
        with torch.random.fork_rng(devices=[]):
            try:
                model = target._from_config(config, var_names, tensors)
                built = model._modules()
                if not isinstance(modules, list) or sorted(modules) != sorted(built):
                    raise ValueError(f"the file's networks {modules!r} are not the model's {sorted(built)}")
                used = {k for k in state if k.startswith("tensors.")}
                for prefix, module in built.items():
                    sub = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
                    used.update(f"{prefix}.{k}" for k in sub)
                    module.load_state_dict(sub, strict=True)
                extra = sorted(set(state) - used)
                if extra:
                    raise ValueError(f"unexpected weights {extra[:5]}")
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ValueError(f"{name!r} is not a complete {target.name} model: {msg}.") from e
        model._eval()
        model.to(dev)
        return model

    # -------------------------------------------------------------------------------- display
    def __repr__(self) -> str:
        fields = {**self._repr_fields(), "n_vars": self.n_vars, "device": str(self.device)}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


def check_batch_size(batch_size: object) -> int:
    """A positive integer number of rows per forward pass (TypeError/ValueError naming ``batch_size`` otherwise)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size}.")
    return int(batch_size)
