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


# ---------------------------------------------------------------------------------------------- the vocabulary
#: the one name of each concept, and the synonyms it replaced (or that other packages use) — banned everywhere
VOCABULARY = {
    "max_epochs": ("maxit", "pretrain_epochs", "stage1_epochs", "stage2_epochs", "n_epochs", "epochs"),
    "refine_max_epochs": ("refine_epochs",),
    "batch_size": ("N_small", "stage1_batch_size", "stage2_batch_size"),
    "n_latent": ("z_dim", "latent_dim"),
    "hidden": ("encoder",),
    "noise": ("sigma",),
    "n_neighbors": ("knn",),
    "n_top_genes": ("select_genes",),
    "show_progress": ("verbose",),
    "random_state": ("seed",),
    "n_jobs": ("n_threads", "num_workers"),
    "precision": ("mixed_precision", "amp", "use_amp"),
}
BANNED = {old: new for new, olds in VOCABULARY.items() for old in olds}
#: the trailing keywords, in this order, after every other option
TRAILING = ("n_jobs", "device", "precision", "random_state", "show_progress", "key_added", "return_model", "copy")
#: functions that train (a network or an optimiser): each takes ``show_progress``
TRAINERS = ("tl.ee", "tl.neuralee", "tl.scdeepcluster", "tl.imap_integrate")


def _public_methods():
    for cname, cls in PUBLIC_CLASSES:
        for attr in dir(cls):
            member = getattr(cls, attr)
            if not attr.startswith("_") and callable(member):
                yield f"{cname}.{attr}", member


PUBLIC_CALLABLES = ALL_FUNCTIONS + list(_public_methods())


@pytest.mark.parametrize(("name", "func"), PUBLIC_CALLABLES, ids=[n for n, _ in PUBLIC_CALLABLES])
def test_no_banned_synonyms(name: str, func) -> None:
    for p in inspect.signature(func).parameters:
        assert p not in BANNED, f"{name}: `{p}` is spelled `{BANNED[p]}` in scembed"


@pytest.mark.parametrize(("name", "func"), DATA_FUNCTIONS, ids=[n for n, _ in DATA_FUNCTIONS])
def test_old_names_raise_naming_the_new_one(name: str, func) -> None:
    renamed = getattr(func, "__renamed_parameters__", {})
    params = inspect.signature(func).parameters
    for old, new in renamed.items():
        assert old not in params and new.split("[")[0] in params, (name, old, new)
        with pytest.raises(TypeError, match=re.escape(f"`{old}` was renamed `{new}`")):
            func(None, **{old: 1})


@pytest.mark.parametrize(("name", "func"), DATA_FUNCTIONS, ids=[n for n, _ in DATA_FUNCTIONS])
def test_trailing_keyword_order(name: str, func) -> None:
    params = list(inspect.signature(func).parameters)
    present = [p for p in TRAILING if p in params]
    assert params[-len(present) :] == present, f"{name}: must end with {present}, got {params[-len(present) :]}"


def test_every_trainer_has_show_progress() -> None:
    funcs = dict(DATA_FUNCTIONS)
    for name in TRAINERS:
        p = inspect.signature(funcs[name]).parameters["show_progress"]
        assert p.default is None and p.kind is p.KEYWORD_ONLY, name
    for name, func in DATA_FUNCTIONS:  # anything with a training length trains
        params = inspect.signature(func).parameters
        if "max_epochs" in params or "maxiter" in params:
            assert "show_progress" in params, name


@pytest.mark.parametrize(("name", "func"), DATA_FUNCTIONS, ids=[n for n, _ in DATA_FUNCTIONS])
def test_key_added_is_a_base_name(name: str, func) -> None:
    default = inspect.signature(func).parameters["key_added"].default
    assert not default.startswith("X_"), f"{name}: key_added defaults to a base name, got {default!r}"
    source = inspect.getsource(inspect.unwrap(func))
    assert "output_keys(key_added)" in source, f"{name}: derive the output keys with _utils.output_keys"


@pytest.mark.parametrize(("name", "func"), DATA_FUNCTIONS, ids=[n for n, _ in DATA_FUNCTIONS])
def test_shared_docstring_fragments(name: str, func) -> None:
    from scembed._utils import _docs

    doc = func.__doc__
    assert "{doc_" not in doc, f"{name}: unfilled docstring placeholder"
    params = inspect.signature(func).parameters
    for param in ("device", "random_state", "copy", "show_progress", "key_added", "return_model"):
        if param in params:
            assert getattr(_docs, f"doc_{param}") in doc, f"{name}: `{param}` should use the shared fragment"


def test_citations_and_no_benchmark_figures_in_api_docs() -> None:
    assert "Xiong et al., Frontiers in Genetics 2020" in se.tl.neuralee.__doc__
    for name, func in DATA_FUNCTIONS:
        doc = func.__doc__
        assert "Xiang" not in doc, name
        # measured numbers go stale: they live in benchmarks/README.md, which a docstring may point to
        assert not re.search(r"\b0\.\d{3}\b", doc), f"{name}: benchmark figures belong in benchmarks/README.md"
