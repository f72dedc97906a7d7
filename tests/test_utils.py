"""Shared utilities: device, seeding, validation, representations, checkpoints, the training loop, the MLP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anndata import AnnData
from scipy import sparse

import scembed as se
from scembed._engine.nn import mlp, predict_in_batches
from scembed._engine.training import adam, minibatches, train
from scembed._utils import (
    check_counts,
    check_features,
    check_finite,
    check_in_range,
    check_positive_int,
    get_representation,
    load_checkpoint,
    progress,
    resolve_device,
    save_checkpoint,
    seeded_torch,
)


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
    monkeypatch.setattr(se.settings, "verbosity", 2)
    assert not progress(range(3)).disable
    monkeypatch.setattr(se.settings, "progress", False)
    assert progress(range(3)).disable
