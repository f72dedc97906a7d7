"""Conventions every public function is held to (scanpy's): checked over the whole public API, so new functions
are held to them too."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import pytest

import scembed as se

PUBLIC_MODULES = {"pp": se.pp, "tl": se.tl, "pl": se.pl, "datasets": se.datasets}
DATA_FUNCTIONS = [
    (f"{m}.{name}", getattr(mod, name))
    for m in ("pp", "tl")
    for mod in [PUBLIC_MODULES[m]]
    for name in mod.__all__
    if inspect.isfunction(getattr(mod, name))
]
ALL_FUNCTIONS = [
    (f"{m}.{name}", getattr(mod, name))
    for m, mod in PUBLIC_MODULES.items()
    for name in mod.__all__
    if inspect.isfunction(getattr(mod, name))
]
PUBLIC_CLASSES = [
    (f"{m}.{name}", getattr(mod, name))
    for m, mod in PUBLIC_MODULES.items()
    for name in mod.__all__
    if inspect.isclass(getattr(mod, name))
]


def test_public_namespaces() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", se.__version__)
    for name in ("pp", "tl", "pl", "datasets", "settings"):
        assert hasattr(se, name)
    assert "affinity" in se.pp.__all__
    for mod in PUBLIC_MODULES.values():
        for name in mod.__all__:
            assert callable(getattr(mod, name)), name


def test_import_is_light() -> None:
    code = (
        "import scembed, sys, torch; assert not torch.cuda.is_initialized(); print('matplotlib.pyplot' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # no plotting backend at import time


@pytest.mark.parametrize(("name", "func"), DATA_FUNCTIONS, ids=[n for n, _ in DATA_FUNCTIONS])
def test_signature_conventions(name: str, func) -> None:
    params = list(inspect.signature(func).parameters.values())
    assert params[0].name == "adata", f"{name}: the first parameter must be `adata`"
    positional = [p for p in params[1:] if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert len(positional) <= 1, f"{name}: options after adata (beyond one main one) must be keyword-only"
    by_name = {p.name: p for p in params}
    assert "copy" in by_name and by_name["copy"].default is False, f"{name}: needs `copy=False`"
    assert by_name["copy"].kind is by_name["copy"].KEYWORD_ONLY
    returns = str(inspect.signature(func).return_annotation)
    assert "AnnData" in returns and "None" in returns, f"{name}: returns AnnData | None (copy)"
    assert "key_added" in by_name and isinstance(by_name["key_added"].default, str), f"{name}: needs `key_added`"
    if "device" in by_name:
        assert by_name["device"].default == "auto"
    if "random_state" in by_name:
        assert isinstance(by_name["random_state"].default, int), f"{name}: random_state defaults to a seed"
    for p in params:
        assert p.kind is not p.VAR_POSITIONAL, f"{name}: no *args"


@pytest.mark.parametrize(("name", "func"), ALL_FUNCTIONS, ids=[n for n, _ in ALL_FUNCTIONS])
def test_docstrings_document_every_parameter(name: str, func) -> None:
    doc = inspect.getdoc(func)
    assert doc, f"{name} has no docstring"
    assert "Parameters\n----------" in doc, f"{name}: numpydoc Parameters section missing"
    documented = set(re.findall(r"^(\w+)(?: : .*)?$", doc.split("Parameters\n----------")[1], flags=re.M))
    for p in inspect.signature(func).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            continue
        assert p.name in documented, f"{name}: parameter `{p.name}` is not documented"
    if name.startswith(("pp.", "tl.")):
        assert "adata." in doc, f"{name}: the docstring must list the AnnData fields it sets"
    for p in inspect.signature(func).parameters.values():
        if p.name != "adata" and p.kind is not p.VAR_KEYWORD:
            assert p.annotation is not inspect.Parameter.empty, f"{name}: `{p.name}` lacks a type hint"


@pytest.mark.parametrize(("name", "cls"), PUBLIC_CLASSES, ids=[n for n, _ in PUBLIC_CLASSES])
def test_public_classes_are_documented(name: str, cls) -> None:
    assert inspect.getdoc(cls), f"{name} has no docstring"
    for attr, member in vars(cls).items():
        if not attr.startswith("_") and callable(member):
            assert inspect.getdoc(member), f"{name}.{attr} has no docstring"
