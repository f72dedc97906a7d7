"""The model protocol shared by NeuralEEModel, ScDeepClusterModel and IMAPModel: save/load, features, input, device."""

from __future__ import annotations

import inspect
import json
import os
import pickle
import re

import numpy as np
import pytest
import scanpy as sc
import torch
from scipy import sparse

import scembed as se
from scembed._engine.models import IMAPModel, Model, NeuralEEModel, ScDeepClusterModel
from scembed._engine.neuralee import build_network
from scembed._utils._io import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = ("neuralee", "scdeepcluster", "imap")


def _kw(func, **candidates):
    """The candidate arguments ``func`` takes (the tiny settings are listed under old and new parameter names)."""
    params = inspect.signature(func).parameters
    return {k: v for k, v in candidates.items() if k in params}


def _lognorm(adata):
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


# ---------------------------------------------------------------------------------------------- tiny trained models
@pytest.fixture(scope="module")
def neuralee():
    """NeuralEE on a user-made PCA (scanpy's loadings kept in the model), a few epochs."""
    torch.set_num_threads(1)
    adata = _lognorm(se.datasets.simulate(200, 60, n_celltypes=3, random_state=1))
    sc.pp.pca(adata, n_comps=8)
    model = se.tl.neuralee(
        adata, return_model=True, **_kw(se.tl.neuralee, perplexity=10.0, maxit=3, max_epochs=3, patience=None)
    )
    assert model.loadings is not None
    return adata, model


@pytest.fixture(scope="module")
def scdeepcluster():
    torch.set_num_threads(1)
    adata = se.datasets.simulate(200, 80, n_celltypes=3, random_state=2)
    f = se.tl.scdeepcluster
    model = se.tl.scdeepcluster(
        adata,
        3,
        return_model=True,
        **_kw(f, pretrain_epochs=3, maxiter=3, max_epochs=(3, 3), batch_size=64),
    )
    return adata, model


@pytest.fixture(scope="module")
def imap():
    """iMAP on 30 of 60 genes, so that the model's features (all genes) differ from the genes it uses."""
    torch.set_num_threads(1)
    adata = _lognorm(se.datasets.simulate(160, 60, n_batches=2, n_celltypes=3, de_scale=1.5, random_state=0))
    f = se.tl.imap_integrate
    kw = _kw(
        f,
        use_hvg=True,
        n_top_genes=30,
        stage1_epochs=2,
        stage2_epochs=2,
        max_epochs=(2, 2),
        stage1_batch_size=16,
        stage2_batch_size=32,
        batch_size=(16, 32),
        latent_dim=8,
        n_latent=8,
        n_sample=100,
    )
    out, model = se.tl.imap_integrate(adata, copy=True, return_model=True, **kw)
    assert len(model.genes) < adata.n_vars
    return out, model


@pytest.fixture
def trained(request, neuralee, scdeepcluster, imap):
    return {"neuralee": neuralee, "scdeepcluster": scdeepcluster, "imap": imap}[request.param]


def _outputs(kind: str, model, adata) -> list[np.ndarray]:
    """Everything the model computes for ``adata``."""
    if kind == "neuralee":
        return [model.transform(adata)]
    if kind == "scdeepcluster":
        return list(model.predict(adata))
    query = model.order[1]
    return [model.encode(adata), model.correct(adata, query)]


# ---------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("trained", KINDS, indirect=True)
def test_save_load_round_trip_gives_identical_outputs(trained, tmp_path):
    adata, model = trained
    kind = model.kind
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = type(model).load(path, device="cpu")
    assert type(loaded) is type(model) and loaded.var_names == model.var_names
    for a, b in zip(_outputs(kind, model, adata), _outputs(kind, loaded, adata), strict=True):
        np.testing.assert_array_equal(a, b)
    # Model.load picks the class from the file
    assert type(Model.load(path, device="cpu")) is type(model)
    # the file: plain tensors, one JSON metadata entry, a format/version tag
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"format", "version", "metadata", "state_dict"}
    assert payload["format"] == "scembed-model" and payload["version"] == 1
    meta = json.loads(payload["metadata"])
    assert meta["model"] == kind and meta["var_names"] == model.var_names
    assert not [p for p in os.listdir(tmp_path) if p != "model.pt"]  # no temporary file left behind
    (tmp_path / "plain").write_bytes(b"")
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode  # permissions of a normally written file
    (tmp_path / "plain").unlink()
    assert repr(loaded).startswith(type(model).__name__ + "(") and "device='cpu'" in repr(loaded)


def test_imap_round_trip_keeps_batches_order_and_genes(imap, tmp_path):
    _, model = imap
    model.save(tmp_path / "m.pt")
    loaded = IMAPModel.load(tmp_path / "m.pt")
    assert loaded.batches == model.batches and loaded.order == model.order and loaded.genes == model.genes
    assert set(loaded.generators) == set(model.generators) and loaded.latent_dim == model.latent_dim


@pytest.mark.parametrize("trained", KINDS, indirect=True)
def test_load_does_not_advance_torch_rng(trained, tmp_path):
    _, model = trained
    model.save(tmp_path / "m.pt")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    type(model).load(tmp_path / "m.pt", device="cpu")
    assert torch.equal(torch.get_rng_state(), before)


def _record(tag: str) -> list:
    """What an unpickled payload would call: appends to a list, so the test sees whether code ran."""
    RAN.append(tag)
    return RAN


RAN: list = []


class _Payload:
    def __reduce__(self):
        return (_record, ("unpickled",))


def _valid_file(path) -> bytes:
    net = build_network(3, 2, (4,))
    meta = {"input": "X", "n_inputs": 3, "n_components": 2, "hidden": [4], "var_names": ["a", "b", "c"]}
    NeuralEEModel(net.eval(), meta).save(path)
    return path.read_bytes()


BAD_FILES = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(_valid_file(p)[: len(_valid_file(p)) // 2]),
    "text": lambda p: p.write_text("these are not weights\n"),
    "other torch file": lambda p: torch.save({"x": torch.ones(3)}, p),
    "torch.save(object())": lambda p: torch.save(object(), p),
    "pickled class": lambda p: torch.save(NeuralEEModel, p),
    "pickled callable": lambda p: torch.save({"state_dict": _Payload()}, p),
    "plain pickle": lambda p: p.write_bytes(pickle.dumps({"a": 1})),
    "metadata not JSON": lambda p: torch.save(
        {"format": "scembed-model", "version": 1, "metadata": "{oops", "state_dict": {}}, p
    ),
    "metadata not an object": lambda p: save_checkpoint(p, {}, []),  # type: ignore[arg-type]
    "pre-release format": lambda p: torch.save({"format": "scembed-1", "metadata": "{}", "state_dict": {}}, p),
    "newer format": lambda p: torch.save(
        {"format": "scembed-model", "version": 99, "metadata": "{}", "state_dict": {}}, p
    ),
    "no config": lambda p: save_checkpoint(p, {}, {"model": "neuralee", "model_version": 1, "var_names": None}),
    "other model kind": lambda p: save_checkpoint(p, {}, {"model": "scdeepcluster", "model_version": 1, "config": {}}),
    "bad config": lambda p: save_checkpoint(
        p, {}, {"model": "neuralee", "model_version": 1, "config": {"input": "X"}, "modules": ["net"]}
    ),
    "missing weights": lambda p: save_checkpoint(
        p,
        {},
        {
            "model": "neuralee",
            "model_version": 1,
            "modules": ["net"],
            "config": {"input": "X", "n_inputs": 3, "n_components": 2, "hidden": [4]},
        },
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_load_refuses_bad_files_with_one_clear_error(case, tmp_path):
    path = tmp_path / "bad.pt"
    BAD_FILES[case](path)
    RAN.clear()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"bad\.pt"):
        NeuralEEModel.load(path, device="cpu")
    assert not RAN  # nothing was unpickled
    assert torch.equal(torch.get_rng_state(), before)


def test_load_wrong_kind_names_both(scdeepcluster, tmp_path):
    _, model = scdeepcluster
    model.save(tmp_path / "sdc.pt")
    with pytest.raises(ValueError, match=r"scDeepCluster model.*not a NeuralEE model"):
        NeuralEEModel.load(tmp_path / "sdc.pt")


def test_load_missing_file_or_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        NeuralEEModel.load(tmp_path / "nope.pt")
    with pytest.raises(OSError, match="directory"):
        NeuralEEModel.load(tmp_path)


def test_load_bad_device(tmp_path):
    _valid_file(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="device"):
        NeuralEEModel.load(tmp_path / "m.pt", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            NeuralEEModel.load(tmp_path / "m.pt", device="cuda")


def test_save_to_directory_missing_folder_or_unwritable(tmp_path):
    net = build_network(3, 2, (4,))
    model = NeuralEEModel(net.eval(), {"input": "X", "n_inputs": 3, "n_components": 2, "hidden": [4]})
    with pytest.raises(IsADirectoryError, match=re.escape(str(tmp_path))):
        model.save(tmp_path)
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        model.save(tmp_path / "no_such_folder" / "m.pt")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileNotFoundError, match="a_file"):
        model.save(tmp_path / "a_file" / "m.pt")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # e.g. running as root: permissions are not enforced
            pytest.skip("the folder stays writable for this user")
        with pytest.raises(PermissionError, match="locked"):
            model.save(locked / "m.pt")
    finally:
        locked.chmod(0o700)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    good = _valid_file(path)
    model = NeuralEEModel.load(path, device="cpu")

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match=r"m\.pt"):
        model.save(path)
    assert path.read_bytes() == good  # the old file is intact
    assert os.listdir(tmp_path) == ["m.pt"]  # and the temporary file is gone


def test_checkpoint_keeps_metadata_as_given(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"w": torch.arange(3.0)}, {"a": [1, 2], "b": np.float32(0.5), "c": None})
    state, meta = load_checkpoint(tmp_path / "c.pt")
    assert meta == {"a": [1, 2], "b": 0.5, "c": None}
    torch.testing.assert_close(state["w"], torch.arange(3.0))


# ---------------------------------------------------------------------------------------------- features
@pytest.mark.parametrize("trained", KINDS, indirect=True)
def test_reordered_or_missing_genes_are_refused(trained):
    adata, model = trained
    kind = model.kind
    with pytest.raises(ValueError, match=r"var_names.*another order"):
        _outputs(kind, model, adata[:, ::-1].copy())
    with pytest.raises(ValueError, match=r"var_names.*missing"):
        _outputs(kind, model, adata[:, 1:].copy())


def test_imap_anndata_equals_array_of_used_genes(imap):
    adata, model = imap
    used = adata[:, model.genes].X
    np.testing.assert_array_equal(model.encode(adata), model.encode(used))
    np.testing.assert_array_equal(model.encode(adata), model.encode(adata.X))  # all training genes, in order
    np.testing.assert_allclose(model.encode(adata), adata.obsm["X_imap"], rtol=1e-5, atol=1e-5)
    query = model.order[1]
    is_q = (adata.obs["batch"].astype(str) == str(query)).to_numpy()
    corrected = adata.layers["imap"][is_q][:, adata.var["imap_used"].to_numpy()]
    corrected = corrected.toarray() if sparse.issparse(corrected) else corrected
    np.testing.assert_allclose(model.correct(adata[is_q], query), corrected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="columns"):
        model.encode(np.zeros((2, 7), dtype=np.float32))
    with pytest.raises(ValueError, match="not one of the trained batches"):
        model.correct(used, "no such batch")


# ---------------------------------------------------------------------------------------------- input forms
def _duplicated(X: sparse.csr_matrix) -> sparse.csr_matrix:
    """The same matrix with every stored entry split into two halves (a CSR with duplicate entries)."""
    X = sparse.csr_matrix(X, dtype=np.float32)
    counts = np.diff(X.indptr)
    indices = np.repeat(X.indices, 2)
    data = np.repeat(X.data / 2, 2)
    indptr = np.concatenate([[0], np.cumsum(2 * counts)])
    dup = sparse.csr_matrix((data, indices, indptr), shape=X.shape)
    assert not dup.has_canonical_format
    return dup


def test_imap_duplicate_entries_are_added_up_and_input_forms_agree(imap):
    adata, model = imap
    X = sparse.csr_matrix(adata[:, model.genes].X, dtype=np.float32)
    query = model.order[1]
    ref_code, ref_corr = model.encode(X.toarray()), model.correct(X.toarray(), query)
    dup = _duplicated(X)
    kept = (dup.data.copy(), dup.indices.copy(), dup.indptr.copy())
    np.testing.assert_allclose(model.encode(dup), ref_code, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.correct(dup, query), ref_corr, rtol=1e-6, atol=1e-6)
    for before, after in zip(kept, (dup.data, dup.indices, dup.indptr), strict=True):
        np.testing.assert_array_equal(before, after)  # the caller's matrix is untouched
    assert not dup.has_canonical_format
    forms = [X, X.tocsc(), X.tocoo(), sparse.csr_array(X), sparse.coo_array(X), X.toarray().astype(np.float64)]
    for form in forms:
        np.testing.assert_allclose(model.encode(form), ref_code, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(model.correct(form, query), ref_corr, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("trained", KINDS, indirect=True)
def test_nan_is_refused(trained):
    adata, model = trained
    bad = adata[:5].copy()
    X = bad.X.toarray() if sparse.issparse(bad.X) else np.array(bad.X)
    X[0, 0] = np.nan
    bad.X = sparse.csr_matrix(X)
    with pytest.raises(ValueError, match="NaN"):
        _outputs(model.kind, model, bad)


@pytest.mark.parametrize("trained", KINDS, indirect=True)
def test_zero_cells(trained):
    adata, model = trained
    outs = _outputs(model.kind, model, adata[:0].copy())
    full = _outputs(model.kind, model, adata[:3].copy())
    for empty, some in zip(outs, full, strict=True):
        assert empty.shape == (0, *some.shape[1:]) and empty.dtype == some.dtype


@pytest.mark.parametrize("trained", KINDS, indirect=True)
def test_device_auto_and_unavailable_cuda(trained):
    adata, model = trained
    kind = model.kind

    def run(device):
        if kind == "neuralee":
            return [model.transform(adata, device=device)]
        if kind == "scdeepcluster":
            return list(model.predict(adata, device=device))
        return [model.encode(adata, device=device), model.correct(adata, model.order[1], device=device)]

    before = model.device
    for a, b in zip(run("auto"), _outputs(kind, model, adata), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert model.device == before  # the model is back where it was
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            run("cuda")


# ---------------------------------------------------------------------------------------------- NeuralEE
def test_neuralee_projects_new_cells_with_the_training_pca(neuralee):
    """New cells with their own PCA: the model must use the training loadings, not the new cells' X_pca."""
    adata, model = neuralee
    new = _lognorm(se.datasets.simulate(80, 60, n_celltypes=3, random_state=7))
    sc.pp.pca(new, n_comps=8)  # the user's own PCA of the new cells: a different projection
    Y = model.transform(new)
    stripped = new.copy()
    del stripped.obsm["X_pca"]
    np.testing.assert_array_equal(Y, model.transform(stripped))
    np.testing.assert_allclose(Y, model.transform(new.X), rtol=1e-6, atol=1e-6)  # genes, projected
    # what reading the new cells' own X_pca would give is far from it
    wrong = model.transform(new.obsm["X_pca"])
    assert np.abs(wrong - Y).max() > 0.1 * np.abs(Y).max()
    # the training cells are embedded as in training
    np.testing.assert_allclose(model.transform(adata), adata.obsm["X_neuralee"], rtol=1e-3, atol=1e-3)


def test_neuralee_without_loadings_warns_about_the_projection():
    emb = se.datasets.simulate_embedding(60, 5, n_celltypes=2, random_state=0)
    meta = {"input": "obsm:X_pca", "n_inputs": 5, "n_components": 2, "hidden": [4], "var_names": list(emb.var_names)}
    model = NeuralEEModel(build_network(5, 2, (4,)).eval(), meta)
    with pytest.warns(UserWarning, match="same projection"):
        Y = model.transform(emb)
    np.testing.assert_array_equal(Y, model.transform(emb.obsm["X_pca"]))


def test_neuralee_batch_size_and_sparse_formats(neuralee):
    adata, model = neuralee
    ref = model.transform(adata.X.toarray())
    for bs in (0, -3):
        with pytest.raises(ValueError, match="batch_size"):
            model.transform(adata, batch_size=bs)
    for bs in (1.5, "10", True):
        with pytest.raises(TypeError, match="batch_size"):
            model.transform(adata, batch_size=bs)
    np.testing.assert_allclose(model.transform(adata, batch_size=7), ref, rtol=1e-5, atol=1e-5)
    for form in (adata.X.tocoo(), adata.X.tocsc(), sparse.csr_array(adata.X), _duplicated(adata.X)):
        np.testing.assert_allclose(model.transform(form), ref, rtol=1e-5, atol=1e-5)
    assert model.transform(np.zeros((0, adata.n_vars), dtype=np.float32)).shape == (0, model.n_components)
    with pytest.raises(TypeError, match="data"):
        model.transform("cells")


def test_old_import_locations_still_work():
    from scembed._engine.imap import IMAPModel as I2
    from scembed._engine.neuralee import NeuralEEModel as N2

    assert N2 is NeuralEEModel is se.tl.NeuralEEModel
    assert I2 is IMAPModel is se.tl.IMAPModel
    assert ScDeepClusterModel is se.tl.ScDeepClusterModel
    for cls in (NeuralEEModel, ScDeepClusterModel, IMAPModel):
        assert issubclass(cls, Model)
