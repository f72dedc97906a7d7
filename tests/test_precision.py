"""Tests of the ``precision`` option (bfloat16 mixed precision) and of how it is chosen."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
import torch
from scipy import sparse

import scembed as se
from scembed._engine import imap as engine
from scembed._utils import _device
from scembed._utils._device import PRECISIONS, native_bf16, resolve_precision

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _dense(m):
    """A layer as a dense array (sparse input may give a sparse or a dense corrected layer)."""
    return m.toarray() if sparse.issparse(m) else np.asarray(m)


def test_resolve_precision_names_and_auto(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("32-true", cpu) is None
    assert resolve_precision("bf16-mixed", cpu) is torch.bfloat16
    assert isinstance(native_bf16(cpu), bool)
    # "auto" follows the hardware: bfloat16 only where products run natively in it
    monkeypatch.setattr(_device, "native_bf16", lambda dev: True)
    assert resolve_precision("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(_device, "native_bf16", lambda dev: False)
    assert resolve_precision("auto", cpu) is None
    with pytest.raises(ValueError, match="`precision`"):
        resolve_precision("16-mixed", cpu)
    assert PRECISIONS == ("auto", "32-true", "bf16-mixed")


def test_native_bf16_reads_the_cpu_flags(monkeypatch, tmp_path):
    # the AVX512-BF16 / AMX-BF16 flags of /proc/cpuinfo, nothing else
    import builtins

    real_open = builtins.open

    def fake(flags):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        return lambda f, *a, **k: real_open(path if f == "/proc/cpuinfo" else f, *a, **k)

    monkeypatch.setattr(builtins, "open", fake("fpu sse avx2 avx512f avx512_bf16"))
    assert native_bf16(torch.device("cpu"))
    monkeypatch.setattr(builtins, "open", fake("fpu sse avx2 avx512f amx_bf16 amx_tile"))
    assert native_bf16(torch.device("cpu"))
    monkeypatch.setattr(builtins, "open", fake("fpu sse avx2 avx512f avx512bw"))
    assert not native_bf16(torch.device("cpu"))


def test_critic_losses_under_bf16_keep_the_penalty_in_float32():
    # the matrix products in bfloat16, the norm of the gradient (a small difference from 1) in float32: both losses
    # come back as float32 and stay within bfloat16's rounding of the float32 values
    torch.manual_seed(0)
    critic = engine.make_critic(50)
    engine.init_weights(critic[0])
    real, fake, eps = torch.rand(64, 50), torch.rand(64, 50), torch.rand(64, 1)
    w32, gp32 = engine.critic_losses(critic, real, fake, eps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w16, gp16 = engine.critic_losses(critic, real, fake, eps)
    assert w16.dtype == gp16.dtype == torch.float32
    assert gp16.item() == pytest.approx(gp32.item(), rel=0.02)
    assert w16.item() == pytest.approx(w32.item(), abs=0.02 * abs(w32.item()) + 1e-3)
    # gradients flow to every parameter in float32
    grads = torch.autograd.grad(-w16 + 10 * gp16, list(critic.parameters()))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def _adata():
    a = se.datasets.simulate(240, 60, n_batches=2, n_celltypes=3, batch_scale=0.5, de_scale=1.5, random_state=0)
    sc.pp.normalize_total(a)
    sc.pp.log1p(a)
    return a


def test_imap_bf16_mixed_trains_reproducibly_and_records_it():
    a = _adata()
    kw = dict(use_hvg=False, max_epochs=3, batch_size=(32, 64), n_latent=16, n_sample=200, show_progress=False)
    b16 = se.tl.imap_integrate(a, precision="bf16-mixed", copy=True, **kw)
    again = se.tl.imap_integrate(a, precision="bf16-mixed", copy=True, **kw)
    b32 = se.tl.imap_integrate(a, precision="32-true", copy=True, **kw)
    assert list(b16.uns["imap"]["params"]["precision"]) == ["bf16-mixed", "bf16-mixed"]
    assert list(b32.uns["imap"]["params"]["precision"]) == ["32-true", "32-true"]
    # the same seed, the same result; the arithmetic changes the numbers, not their scale
    np.testing.assert_array_equal(b16.obsm["X_imap"], again.obsm["X_imap"])
    np.testing.assert_array_equal(_dense(b16.layers["imap"]), _dense(again.layers["imap"]))
    assert not np.array_equal(b16.obsm["X_imap"], b32.obsm["X_imap"])
    for key in ("loss", "recon"):
        l16, l32 = b16.uns["imap"]["stage1"][key], b32.uns["imap"]["stage1"][key]
        assert np.all(np.isfinite(l16)) and l16[-1] == pytest.approx(l32[-1], rel=0.2)
    assert b16.obsm["X_imap"].dtype == b16.layers["imap"].dtype == np.float32


def test_imap_precision_per_stage_and_auto_follows_the_hardware(monkeypatch):
    # the default is float32 in both stages; a pair sets each stage; "auto" is bfloat16 only on hardware that has it
    a = _adata()
    kw = dict(use_hvg=False, max_epochs=(1, 1), batch_size=(32, 64), n_latent=16, n_sample=100, show_progress=False)
    seen = {"stage I": [], "stage II": []}
    stage1, stage2 = engine.train_stage1, engine.train_generator

    def spy1(*args, **kwargs):
        seen["stage I"].append(kwargs["autocast_dtype"])
        return stage1(*args, **kwargs)

    def spy2(*args, **kwargs):
        seen["stage II"].append(kwargs["autocast_dtype"])
        return stage2(*args, **kwargs)

    monkeypatch.setattr(engine, "train_stage1", spy1)
    monkeypatch.setattr(engine, "train_generator", spy2)

    def used(**more):
        return list(se.tl.imap_integrate(a, copy=True, **kw, **more).uns["imap"]["params"]["precision"])

    monkeypatch.setattr(_device, "native_bf16", lambda dev: True)
    assert used() == ["32-true", "32-true"] and seen == {"stage I": [None], "stage II": [None]}
    assert used(precision=("32-true", "auto")) == ["32-true", "bf16-mixed"]
    assert seen["stage I"][-1] is None and seen["stage II"][-1] is torch.bfloat16
    assert used(precision="auto") == ["bf16-mixed", "bf16-mixed"]
    monkeypatch.setattr(_device, "native_bf16", lambda dev: False)
    assert used(precision="auto") == ["32-true", "32-true"]


def test_imap_bad_precision_is_refused_before_any_work():
    a = _adata()
    before = a.copy()
    for bad in ("fp16", ("32-true",), ("32-true", "auto", "auto"), ("32-true", 16), 32):
        with pytest.raises(ValueError, match="`precision`"):
            se.tl.imap_integrate(a, precision=bad, max_epochs=1)
    assert set(a.uns) == set(before.uns) and set(a.layers) == set(before.layers) and set(a.obsm) == set(before.obsm)


def test_native_bf16_on_cuda_does_not_count_emulation(monkeypatch):
    # GPUs before Ampere emulate bfloat16 (slower than float32): "auto" must not pick it there
    asked = []

    def supported(including_emulation=True):
        asked.append(including_emulation)
        return including_emulation  # an emulating GPU: True only when emulation counts

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert not native_bf16(torch.device("cuda"))
    assert asked == [False]
    assert not native_bf16(torch.device("mps"))
