"""Shared utilities: device, seeding, validation, representations, checkpoints, the training loop, the MLP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anndata import AnnData
from scipy import sparse

import scembed as se
from scembed._engine.nn import mlp, predict_in_batches
from scembed._engine.training import adam, minibatches, train
from scembed._utils import (
    check_affinity_matrix,
    check_counts,
    check_features,
    check_finite,
    check_in_range,
    check_int_pair,
    check_positive_int,
    doc_params,
    get_representation,
    load_checkpoint,
    output_keys,
    pca_on_the_fly,
    progress,
    renamed_parameters,
    resolve_device,
    save_checkpoint,
    seeded_torch,
)
from scembed._utils._memory import _malloc_trim, release_free_memory


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")).type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="device"):
        resolve_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_settings_device_is_the_auto_default(monkeypatch) -> None:
    monkeypatch.setattr(se.settings, "device", "cpu")
    assert resolve_device("auto").type == "cpu"
    assert "device='cpu'" in repr(se.settings)


def test_seeded_torch_is_reproducible_and_restores_global_state() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with seeded_torch(7) as gen:
        a = torch.rand(4, generator=gen), torch.nn.Linear(3, 2).weight.detach().clone()
    with seeded_torch(7) as gen:
        b = torch.rand(4, generator=gen), torch.nn.Linear(3, 2).weight.detach().clone()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    with pytest.raises(TypeError, match="random_state"):
        with seeded_torch("seven"):
            pass


def test_validation_messages_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`k`"):
        check_positive_int(0, "k")
    with pytest.raises(TypeError, match="`k`"):
        check_positive_int(2.5, "k")
    with pytest.raises(ValueError, match="`lam`"):
        check_in_range(-1.0, "lam", low=0)
    with pytest.raises(ValueError, match="NaN"):
        check_finite(np.array([[1.0, np.nan]]), "adata.X")
    with pytest.raises(ValueError, match=r"NaN|infinite"):
        check_finite(sparse.csr_matrix(np.array([[0, np.inf]])), "adata.X")


@pytest.mark.parametrize(
    ("X", "match"),
    [
        (np.array([[1.0, -1.0]]), "negative"),
        (np.array([[1.0, 0.5]]), "integer"),
        (sparse.csr_matrix(np.array([[1.0, 2.2]])), "integer"),
        (np.array([[1.0, np.nan]]), "NaN"),
    ],
)
def test_check_counts(X, match) -> None:
    with pytest.raises(ValueError, match=match):
        check_counts(X, "layers['counts']")
    check_counts(np.array([[0.0, 3.0]]), "X")


def test_get_representation_rules() -> None:
    rng = np.random.default_rng(0)
    adata = AnnData(rng.normal(size=(80, 60)).astype(np.float32))
    X, name = get_representation(adata)  # no X_pca, ≥ 50 variables: PCA on the fly, not stored
    assert X.shape == (80, 50) and name.startswith("pca") and "X_pca" not in adata.obsm
    adata.obsm["X_pca"] = rng.normal(size=(80, 10))
    X, name = get_representation(adata)
    assert X.dtype == np.float32 and name == "X_pca"
    X, name = get_representation(adata, "X_pca", n_pcs=4)
    assert X.shape == (80, 4)
    small = AnnData(sparse.random(30, 20, density=0.3, format="csr", dtype=np.float32, random_state=0))
    X, name = get_representation(small)  # fewer than 50 variables: X itself, densified
    assert name == "X" and isinstance(X, np.ndarray) and X.shape == (30, 20)
    with pytest.raises(KeyError, match="use_rep"):
        get_representation(adata, "X_umap")
    with pytest.raises(ValueError, match="n_pcs"):
        get_representation(adata, "X_pca", n_pcs=11)


def test_checkpoint_round_trip_and_features(tmp_path) -> None:
    net = mlp((5, 8, 2))
    save_checkpoint(tmp_path / "m.pt", net.state_dict(), {"genes": ["a", "b"], "n": 3})
    state, meta = load_checkpoint(tmp_path / "m.pt")
    assert meta == {"genes": ["a", "b"], "n": 3}
    for k, v in net.state_dict().items():
        torch.testing.assert_close(state[k], v)
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a model saved by scembed"):
        load_checkpoint(tmp_path / "other.pt")
    check_features(["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match="missing"):
        check_features(["a", "b"], ["a", "c"])


def test_mlp_and_batched_prediction() -> None:
    net = mlp((4, 16, 16, 3), batchnorm=True, dropout=0.1)
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    X = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    net.eval()
    full = net(torch.as_tensor(X)).detach()
    torch.testing.assert_close(predict_in_batches(net, X, batch_size=7), full)
    with pytest.raises(ValueError, match="at least"):
        mlp((4,))


def test_minibatches_cover_every_index_once() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = list(minibatches(103, 10, generator=gen))
    assert sorted(torch.cat(batches).tolist()) == list(range(103))
    assert len(list(minibatches(103, 10, drop_last=True))) == 10


def test_adam_helper_takes_the_same_steps_as_torch_adam() -> None:
    # the fused kernel (where available) must follow the same update rule as the default implementation
    torch.manual_seed(0)
    nets = [mlp((5, 8, 3), batchnorm=False) for _ in range(2)]  # (BatchNorm makes the bias gradient rounding noise)
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [
        adam(nets[0].parameters(), lr=1e-2, betas=(0.5, 0.999), amsgrad=True),
        torch.optim.Adam(nets[1].parameters(), lr=1e-2, betas=(0.5, 0.999), amsgrad=True, foreach=False),
    ]
    x = torch.randn(16, 5)
    for _ in range(5):
        for net, opt in zip(nets, opts, strict=True):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_train_early_stopping_and_best_weights() -> None:
    net = torch.nn.Linear(1, 1)
    losses = [5.0, 3.0, 1.0, 2.0, 4.0, 6.0, 7.0, 8.0]

    def step(epoch: int) -> dict[str, float]:
        with torch.no_grad():
            net.weight.fill_(float(epoch))
        return {"loss": losses[epoch], "other": 0.0}

    history, n_run = train(step, len(losses), module=net, keep_best=True, patience=2, show_progress=False)
    assert n_run == 5 and history["loss"] == losses[:5] and history["other"] == [0.0] * 5
    assert net.weight.item() == 2.0  # restored from the best epoch
    with pytest.raises(FloatingPointError, match="epoch 2"):
        train(lambda e: [1.0, float("nan")][e], 2, show_progress=False)


def test_progress_honours_settings(monkeypatch) -> None:
    monkeypatch.setattr(se.settings, "verbosity", 0)
    assert progress(range(3)).disable
    assert not progress(range(3), show=True).disable
    for level in (1, 2):  # shown by default: scanpy's default verbosity (1, warnings) included
        monkeypatch.setattr(se.settings, "verbosity", level)
        assert not progress(range(3)).disable
    assert progress(range(3), show=False).disable
    monkeypatch.setattr(se.settings, "progress", False)
    assert progress(range(3)).disable


def test_progress_follows_scanpy_verbosity(monkeypatch) -> None:
    import scanpy as sc

    monkeypatch.setattr(se.settings, "verbosity", None)
    saved = sc.settings.verbosity
    try:
        sc.settings.verbosity = 0
        assert progress(range(3)).disable
        sc.settings.verbosity = 1
        assert not progress(range(3)).disable
    finally:
        sc.settings.verbosity = saved


def test_train_bar_on_stderr_by_default_and_silent_when_asked(monkeypatch, capfd) -> None:
    monkeypatch.setattr(se.settings, "verbosity", 1)
    monkeypatch.setattr(se.settings, "progress", True)
    train(lambda e: {"loss": 1.0 / (e + 1)}, 3, desc="stage I")
    err = capfd.readouterr().err
    assert "stage I" in err and "loss=" in err and "<" in err  # name, loss, tqdm's elapsed<remaining
    train(lambda e: 1.0, 3, desc="stage I", show_progress=False)
    assert capfd.readouterr().err == ""


def test_train_logs_early_stop(monkeypatch, caplog) -> None:
    import logging

    monkeypatch.setattr(se.settings, "verbosity", 2)
    with caplog.at_level(logging.INFO, logger="scembed"):
        train(lambda e: 1.0, 10, desc="fit", patience=2, show_progress=False)
        train(lambda e: 1.0 / (e + 1), 3, desc="full", patience=5, show_progress=False)
    lines = [r.getMessage() for r in caplog.records if "stopped early" in r.getMessage()]
    assert lines == ["fit: stopped early at epoch 3 of 10"]


def test_renamed_parameters() -> None:
    import inspect

    @renamed_parameters(maxit="max_epochs", N_small="batch_size")
    def f(adata, *, max_epochs: int = 5, batch_size: int = 2) -> int:
        """Doc."""
        return max_epochs * batch_size

    assert f(None, max_epochs=3) == 6
    assert list(inspect.signature(f).parameters) == ["adata", "max_epochs", "batch_size"]
    assert f.__doc__ == "Doc." and f.__name__ == "f"
    assert f.__renamed_parameters__ == {"maxit": "max_epochs", "N_small": "batch_size"}
    with pytest.raises(TypeError, match="`maxit` was renamed `max_epochs`"):
        f(None, maxit=3)
    with pytest.raises(TypeError, match="`N_small` was renamed `batch_size`"):
        f(None, max_epochs=1, N_small=3)
    with pytest.raises(TypeError, match="renamed"):
        se.tl.neuralee(AnnData(np.zeros((5, 2), dtype=np.float32)), maxit=3)


def test_output_keys() -> None:
    keys = output_keys("ee")
    assert (keys.obsm, keys.uns, keys.obs, keys.obsp, keys.layers) == ("X_ee", "ee", "ee", "ee", "ee")
    assert keys.suffixed("proba") == "ee_proba"
    with pytest.raises(ValueError, match=r"without the 'X_' prefix.*key_added='ee'"):
        output_keys("X_ee")
    for bad in ("", None, 3):
        with pytest.raises(TypeError, match="key_added"):
            output_keys(bad)


def test_check_int_pair() -> None:
    assert check_int_pair(3, "max_epochs") == (3, 3)
    assert check_int_pair((0, 7), "max_epochs", minimum=0) == (0, 7)
    assert check_int_pair([1, 2], "max_epochs") == (1, 2)
    with pytest.raises(TypeError, match=r"pair \(stage I, stage II\)"):
        check_int_pair((1, 2, 3), "max_epochs", stages=("stage I", "stage II"))
    with pytest.raises(ValueError, match=r"`batch_size` \(stage II stage\) must be ≥ 2"):
        check_int_pair((4, 1), "batch_size", stages=("stage I", "stage II"), minimum=2)
    with pytest.raises(TypeError, match="first stage"):
        check_int_pair((1.5, 2), "max_epochs")
    with pytest.raises(TypeError, match="pair"):
        check_int_pair(True, "max_epochs")


def test_check_affinity_matrix() -> None:
    P = sparse.csr_matrix(np.array([[0, 0.5], [0.5, 0]]))
    assert check_affinity_matrix(P, 2, "P").nnz == 2
    with pytest.raises(ValueError, match="square"):
        check_affinity_matrix(sparse.csr_matrix((2, 3)), 2, "P")
    with pytest.raises(ValueError, match="negative"):
        check_affinity_matrix(-P, 2, "P")
    with pytest.raises(ValueError, match="all zero"):
        check_affinity_matrix(sparse.csr_matrix((2, 2)), 2, "P")
    with pytest.raises(ValueError, match="NaN"):
        check_affinity_matrix(P * np.nan, 2, "P")


def test_doc_params_fills_placeholders_only() -> None:
    @doc_params(doc_copy="copy\n        Return a copy.")
    def f(copy: bool = False) -> None:
        """Sum p_{j|i}.

        Parameters
        ----------
        {doc_copy}
        """

    assert "copy\n        Return a copy." in f.__doc__ and "p_{j|i}" in f.__doc__
    with pytest.raises(KeyError, match="no placeholder"):
        doc_params(doc_copy="x")(lambda: None)


def test_pca_on_the_fly_returns_loadings() -> None:
    X = np.random.default_rng(0).poisson(1.0, (80, 60)).astype(np.float32)
    rep, name, W, offset = pca_on_the_fly(X, 10, random_state=0)
    assert rep.shape == (80, 10) and W.shape == (60, 10) and offset.shape == (10,) and name == "pca(X, 10)"
    projected, _, W2, _ = pca_on_the_fly(sparse.csr_matrix(X), 10, random_state=0, projected=True)
    np.testing.assert_allclose(projected, X @ W2 - offset, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.abs(projected), np.abs(rep), atol=1e-3)
    adata = AnnData(X)
    X_rep, rep_name = get_representation(adata)  # the same PCA, through the representation rules
    assert rep_name == "pca(X, 50)" and X_rep.shape == (80, 50)


def test_write_h5ad_is_atomic(tmp_path, monkeypatch):
    import anndata as ad

    import scembed as se

    a = ad.AnnData(np.arange(6, dtype=np.float32).reshape(3, 2))
    path = tmp_path / "sub" / "out.h5ad"
    se.write_h5ad(a, path)  # creates the folder
    np.testing.assert_array_equal(ad.read_h5ad(path).X, a.X)
    before = path.read_bytes()

    def fails_half_way(self, filename, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", fails_half_way)
    with pytest.raises(OSError, match="disk full"):
        se.write_h5ad(ad.AnnData(np.zeros((5, 2), dtype=np.float32)), path)
    assert path.read_bytes() == before  # the previous file, whole
    assert [p.name for p in path.parent.iterdir()] == ["out.h5ad"]  # no temporary file left behind
    with pytest.raises(TypeError, match="`adata`"):
        se.write_h5ad(a.X, path)
    with pytest.raises(TypeError, match="`filename`"):
        se.write_h5ad(a, 3)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


@pytest.mark.skipif(
    not Path("/proc/self/status").exists() or _malloc_trim() is None, reason="glibc's malloc_trim on Linux"
)
def test_release_free_memory_returns_freed_heap_pages() -> None:
    # 4,000 blocks of 96 kB sit on the C heap (below glibc's mmap threshold); one more allocated after them keeps
    # them off the heap's top, which free() alone would hand back, so they stay resident until released
    blocks = [np.ones(12_000) for _ in range(4000)]
    keep = np.ones(12_000)
    del blocks
    resident = _rss_bytes()
    assert release_free_memory()
    assert resident - _rss_bytes() > 200 * 2**20  # of the 366 MiB freed
    assert keep.sum() == 12_000
