"""Shared numpydoc fragments for the parameters every public function has, and the decorator inserting them.

A docstring names a fragment with ``{name}`` on the line of the parameter (indented like the other entries);
:func:`doc_params` replaces exactly these placeholders, so other braces in a docstring (maths) are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

doc_device = """\
device
        ``"auto"`` (CUDA when present, else CPU; see ``se.settings.device``), ``"cpu"``, ``"cuda"`` or
        ``"cuda:N"``."""

doc_random_state = """\
random_state
        Seed of every random choice the function makes (initial weights, sampling, approximate neighbour search,
        a PCA computed on the fly); ``None`` uses ``se.settings.random_state``. The same seed on the same device
        gives the same result."""

doc_copy = """\
copy
        Return a modified copy instead of writing to ``adata``."""

doc_use_rep = """\
use_rep
        Representation to use: a key of ``adata.obsm`` or ``"X"``. ``None`` (default) takes ``obsm["X_pca"]``,
        or ``X`` when it has fewer than 50 variables, or otherwise a 50-component PCA of ``X`` computed on the fly
        (not stored).
    n_pcs
        Use only the first ``n_pcs`` columns of the representation."""

doc_show_progress = """\
show_progress
        Show a progress bar (stage, loss and time left) on stderr. ``None`` (default): shown unless the verbosity
        (``se.settings.verbosity``, else scanpy's) is 0 or ``se.settings.progress`` is False."""

doc_key_added = """\
key_added
        Base name of the outputs (default: the method's name); see Returns for the keys derived from it. It must
        not start with ``"X_"``: embeddings are written to ``obsm["X_" + key_added]``."""

doc_return_model = """\
return_model
        Also return the trained model, which embeds (or assigns) new cells and can be saved and loaded: the model
        alone, or ``(adata, model)`` with ``copy=True``."""

#: the trailing keywords every trainer shares, in their order (device … copy)
doc_trainer_tail = "\n    ".join(
    [doc_device, doc_random_state, doc_show_progress, doc_key_added, doc_return_model, doc_copy]
)

FRAGMENTS = {
    "doc_device": doc_device,
    "doc_random_state": doc_random_state,
    "doc_copy": doc_copy,
    "doc_use_rep": doc_use_rep,
    "doc_show_progress": doc_show_progress,
    "doc_key_added": doc_key_added,
    "doc_return_model": doc_return_model,
    "doc_trainer_tail": doc_trainer_tail,
}


def doc_params(**fragments: str) -> Callable[[F], F]:
    """Replace the placeholders ``{name}`` in the decorated function's docstring by the given fragments.

    Raises a KeyError at import time if a fragment is given but its placeholder is missing, so a docstring cannot
    silently lose a parameter.
    """

    def decorator(func: F) -> F:
        doc = func.__doc__ or ""
        for name, text in fragments.items():
            token = "{" + name + "}"
            if token not in doc:
                raise KeyError(f"doc_params: {func.__qualname__}'s docstring has no placeholder {token}.")
            doc = doc.replace(token, text)
        left = re.findall(r"\{(doc_\w+)\}", doc)
        if left:
            raise KeyError(f"doc_params: {func.__qualname__}'s docstring has unfilled placeholders {left}.")
        func.__doc__ = doc
        return func

    return decorator


def shared_docs(func: F) -> F:
    """:func:`doc_params` with every shared fragment whose placeholder appears in the docstring."""
    doc = func.__doc__ or ""
    return doc_params(**{k: v for k, v in FRAGMENTS.items() if "{" + k + "}" in doc})(func)
