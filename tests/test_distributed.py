"""Data-parallel NeuralEE and sharded affinities on torch.distributed (gloo, 2 processes launched by torchrun)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from scipy import sparse

from scembed._engine import distributed
from scembed._engine.affinity import entropic_affinities
from scembed._engine.knn import nearest_neighbors
from scembed._engine.neuralee import GraphSampler, batch_repulsion, build_network, recalibrate_batchnorm
from scembed._engine.scdeepcluster import assignments
from scembed._engine.training import adam

WORKER = Path(__file__).with_name("_distributed_worker.py")
_spec = importlib.util.spec_from_file_location("_distributed_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)


def launch(mode: str, out: Path, *, timeout_s: float = 10.0, limit_s: float = 240.0) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2`` on the worker script, with this checkout's scembed."""
    src = str(Path(distributed.__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        distributed.ENV_TIMEOUT: str(timeout_s),
    }
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", distributed.ENV_ENABLE):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run([*cmd, str(WORKER), mode, str(out)], env=env, capture_output=True, text=True, timeout=limit_s)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One 2-process run of the worker's ``train`` mode; its folder of per-rank results."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("two_ranks")
    proc = launch("train", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def reference_fit(X: np.ndarray, P: sparse.csr_matrix, n_ranks: int) -> tuple[torch.nn.Module, list[float]]:
    """One process doing what ``n_ranks`` ranks do together: each step accumulates the gradients of the W blocks
    ``s·W … s·W + W − 1`` of the shared permutation, divided by W, then one Adam step (the worker's settings)."""
    n, b, ns = worker.N, worker.BATCH, 4
    torch.manual_seed(worker.SEED)
    net = build_network(worker.D, 2, (50, 50))
    opt = adam(net.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(worker.SEED)
    sampler = GraphSampler(P, torch.device("cpu"))
    Xt = torch.as_tensor(X)
    n_blocks = n // b
    n_steps = max(1, n_blocks // n_ranks)
    losses, states = [], []
    for _ in range(worker.EPOCHS):
        net.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for s in range(n_steps):
            u_all = torch.rand(n_ranks * b * ns, generator=gen)
            opt.zero_grad(set_to_none=True)
            for r in range(n_ranks):
                blk = (s * n_ranks + r) % n_blocks
                pos = order[blk * b : (blk + 1) * b]
                _, cols, w = sampler.sample(pos, ns, gen, u=u_all[r * b * ns : (r + 1) * b * ns])
                Yall = net(torch.cat([Xt[pos], Xt[cols]]))
                Yb = Yall[:b]
                diff = Yb.repeat_interleave(ns, 0) - Yall[b:]
                att = (w * (diff * diff).sum(1)).sum() * (n / (b * ns))
                er, gr = batch_repulsion(Yb.detach())
                torch.autograd.backward([att / n_ranks, Yb], [None, gr / n_ranks])
                total += (float(att.detach()) + float(er)) / n_ranks
            opt.step()
        losses.append(total / n_steps)
        states.append(copy.deepcopy(net.state_dict()))
    net.load_state_dict(states[int(np.argmin(losses))])  # keep_best: the first epoch with the lowest loss
    recalibrate_batchnorm(net, Xt)
    return net.eval(), losses


def load_P(path: Path) -> tuple[sparse.csr_matrix, np.ndarray]:
    z = np.load(path)
    n = worker.N
    return sparse.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=(n, n)), z["beta"]


# ------------------------------------------------------------------------------------------- one process
def test_one_process_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    w = distributed.world()
    assert (w.rank, w.size, w.is_main, w.distributed) == (0, 1, True, False)
    x = np.arange(6.0).reshape(3, 2)
    assert distributed.all_gather_rows(x) is x
    assert distributed.mean_across_ranks({"loss": 1.5}) == {"loss": 1.5}
    t = torch.ones(2)
    assert torch.equal(distributed.all_reduce_sum(t), torch.ones(2))
    distributed.check_same_across_ranks("anything", x)  # nothing to compare with
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert distributed.sync_gradients(opt) is None


def test_shards_and_blocks_cover_everything_once():
    for n, size in [(10, 3), (2, 4), (97, 8)]:
        parts = [distributed.shard(n, distributed.World(rank=r, size=size)) for r in range(size)]
        assert np.array_equal(np.concatenate([np.arange(n)[p] for p in parts]), np.arange(n))
        assert max(distributed.shard_sizes(n, size)) - min(distributed.shard_sizes(n, size)) <= 1
    # 2 ranks, 6 blocks, 3 steps: rank 0 takes 0, 2, 4 and rank 1 takes 1, 3, 5
    assert distributed.rank_blocks(6, 3, distributed.World(rank=0, size=2)) == [0, 2, 4]
    assert distributed.rank_blocks(6, 3, distributed.World(rank=1, size=2)) == [1, 3, 5]
    # one pass: disjoint shares; fewer blocks than ranks is refused, naming how many processes the data allow
    shares = [distributed.rank_share(7, distributed.World(rank=r, size=3)) for r in range(3)]
    assert shares == [[0, 3], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match=r"4 processes were started, but the data make only 3 blocks.*at most 3"):
        distributed.rank_share(3, distributed.World(rank=0, size=4))
    distributed.check_enough_blocks(1, distributed.World())  # one process: always enough


def test_other_ranks_are_quiet(monkeypatch):
    from scembed._utils._logging import get_logger, progress

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "1")
    assert not distributed.is_main()
    assert progress(range(3), show=True).disable
    assert get_logger().level == 40  # errors only
    monkeypatch.setenv("RANK", "0")
    assert not progress(range(3), show=True).disable


def test_plain_cuda_is_the_rank_gpu_under_torchrun(monkeypatch):
    """torchrun's LOCAL_RANK picks the GPU for a plain "cuda" (no process group is started to decide it)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv(distributed.ENV_ENABLE, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.local_device(cuda) == cuda  # one process: unchanged
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.local_device(cuda) == torch.device("cuda", 1)
    assert distributed.local_device(torch.device("cuda", 0)) == torch.device("cuda", 0)  # an explicit GPU is kept
    assert distributed.local_device(cpu) == cpu
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv(distributed.ENV_ENABLE, "0")
    assert distributed.local_device(cuda) == cuda


def test_timeout_setting(monkeypatch):
    monkeypatch.delenv(distributed.ENV_TIMEOUT, raising=False)
    assert distributed.timeout_seconds() == distributed.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(distributed.ENV_TIMEOUT, "2.5")
    assert distributed.timeout_seconds() == 2.5
    for bad in ("soon", "0", "-1"):
        monkeypatch.setenv(distributed.ENV_TIMEOUT, bad)
        with pytest.raises(ValueError, match=distributed.ENV_TIMEOUT):
            distributed.timeout_seconds()


def test_reference_with_one_rank_is_the_trainer(one_torch_thread):
    """The accumulating reference below, with W = 1, is fit_neuralee itself: it reproduces the trainer's stream."""
    X = worker.data()
    P, _, _, _ = worker.graph(X)
    net, info = worker.fit(X, P)
    ref, losses = reference_fit(X, P, 1)
    np.testing.assert_allclose(info["history"]["loss"], losses, rtol=1e-6)
    for (name, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------------- two processes
@needs_gloo
@pytest.mark.slow
def test_neuralee_two_ranks_equal_one_process_with_accumulation(two_ranks, one_torch_thread):
    X = worker.data()
    P, _ = load_P(two_ranks / "affinity_rank0.npz")
    ref, losses = reference_fit(X, P, 2)
    got = np.load(two_ranks / "neuralee_rank0.npz")
    np.testing.assert_allclose(got["loss"], losses, rtol=1e-5)
    for name, value in ref.state_dict().items():
        np.testing.assert_allclose(got[name], value.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    Y_ref = ref(torch.as_tensor(X)).detach().numpy()
    np.testing.assert_allclose(got["Y"], Y_ref, rtol=1e-4, atol=1e-4)


@needs_gloo
@pytest.mark.slow
def test_neuralee_ranks_end_identical(two_ranks):
    a, b = np.load(two_ranks / "neuralee_rank0.npz"), np.load(two_ranks / "neuralee_rank1.npz")
    assert set(a.files) == set(b.files)
    for name in a.files:  # weights, BatchNorm statistics (recalibrated on all cells), losses, embedding
        assert np.array_equal(a[name], b[name]), name
    Yb = [np.load(two_ranks / f"neuralee_batch_rank{r}.npy") for r in (0, 1)]
    assert np.array_equal(Yb[0], Yb[1]) and np.isfinite(Yb[0]).all()  # "batch" mode too
    info = [json.loads((two_ranks / f"info_rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world"] for i in info] == [[0, 2, "gloo"], [1, 2, "gloo"]]
    assert [i["is_main"] for i in info] == [True, False]


@needs_gloo
@pytest.mark.slow
def test_sharded_affinities_equal_one_process(two_ranks):
    X = worker.data()
    idx, dist, _ = nearest_neighbors(X, worker.K, method="exact")
    P_ref, beta_ref, _ = entropic_affinities(idx, dist, worker.PERPLEXITY)
    for r in (0, 1):
        P, beta = load_P(two_ranks / f"affinity_rank{r}.npz")
        assert np.array_equal(P.indptr, P_ref.indptr) and np.array_equal(P.indices, P_ref.indices)
        np.testing.assert_allclose(P.data, P_ref.data, rtol=0, atol=1e-6)
        np.testing.assert_allclose(beta, beta_ref, rtol=1e-10)
        assert abs(P.sum() - 1) < 1e-5 and abs(P - P.T).max() == 0


@needs_gloo
@pytest.mark.slow
def test_mismatch_raises_the_same_clear_error_on_every_rank(two_ranks):
    messages = [(two_ranks / f"mismatch_rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1]
    assert "`var_names` differs across the 2 ranks" in messages[0]
    assert "position 7: 'g7' on rank 0, 'other' on rank 1" in messages[0]
    messages = [(two_ranks / f"mismatch_data_rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1]
    assert "`affinity input (X)` differs across the 2 ranks" in messages[0] and "array (96, 5) float32" in messages[0]


@needs_gloo
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["early_exit", "hang"])
def test_a_rank_that_leaves_or_hangs_makes_the_others_fail_not_wait(tmp_path, mode):
    """Rank 1 exits, or stays alive without joining: rank 0's collective raises (lost peer, or the timeout).

    The bound on the seconds is not a speed check: it says that rank 0 gave up because of the timeout it was given
    (5 s), not because something else ended the job.
    """
    timeout_s = 5.0
    proc = launch(mode, tmp_path, timeout_s=timeout_s, limit_s=150)
    assert proc.returncode != 0
    result = json.loads((tmp_path / f"{mode}_rank0.json").read_text())
    assert result["outcome"] != "no error"
    assert result["seconds"] < timeout_s + 30
    assert not list(tmp_path.glob(f"*{mode}_written*"))  # se.write_h5ad wrote nothing, not even a temporary file
    if mode == "hang":
        assert result["seconds"] >= timeout_s * 0.9


@needs_gloo
@pytest.mark.slow
def test_trainer_helpers_across_ranks(two_ranks):
    """DEC targets from sharded latents, rank-0-only work, lock-step mini-batches, per-rank noise streams."""
    h = [np.load(two_ranks / f"helpers_rank{r}.npz") for r in (0, 1)]
    info = [json.loads((two_ranks / f"info_rank{r}.json").read_text()) for r in (0, 1)]
    # DEC: the all-reduced cluster sums give every rank the one-process Q and P of all cells
    z, centroids = worker.dec_inputs()
    q_ref, p_ref = assignments(z, centroids)
    for r in (0, 1):
        np.testing.assert_allclose(h[r]["q"], q_ref.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(h[r]["p"], p_ref.numpy(), rtol=1e-5, atol=1e-7)
    # on_main: rank 0's result everywhere, rank 0's exception everywhere
    assert [i["on_main"] for i in info] == [7, 7]
    assert [i["on_main_error"] for i in info] == ["raised on rank 0"] * 2
    # mini-batches: one shared permutation, rank 0 takes batches 0, 2 and rank 1 batches 1, 3 (batch 4, short, waits)
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(3)).numpy()
    blocks = [perm[i * 5 : (i + 1) * 5] for i in range(4)]
    assert np.array_equal(h[0]["batches"], np.stack([blocks[0], blocks[2]]))
    assert np.array_equal(h[1]["batches"], np.stack([blocks[1], blocks[3]]))
    # BatchNorm statistics: the mean over ranks of each rank's running averages, the same on every rank
    bns = []
    for r in (0, 1):
        bn = torch.nn.BatchNorm1d(3)
        bn(torch.randn(8, 3, generator=torch.Generator().manual_seed(r)))
        bns.append(bn)
    for name in ("running_mean", "running_var"):
        expected = (getattr(bns[0], name) + getattr(bns[1], name)).numpy() / 2
        key = "bn_mean" if name == "running_mean" else "bn_var"
        for r in (0, 1):
            np.testing.assert_allclose(h[r][key], expected, rtol=1e-6)
    # per-rank streams differ, and the shared stream they were split from still agrees across ranks afterwards
    assert not np.array_equal(h[0]["noise"], h[1]["noise"])
    assert np.array_equal(h[0]["shared_after"], h[1]["shared_after"])
    # gradients averaged while the backward pass goes on (overlap): the wide weight early and in place, the rest in
    # one flat buffer; the parameters are those of one process stepping on the mean of both ranks' gradients
    ref = worker.overlap_net()
    for step in range(worker.OVERLAP_STEPS):
        grads = []
        for r in (0, 1):
            ref.zero_grad(set_to_none=True)
            ref(worker.overlap_batch(r, step)).square().mean().backward()
            grads.append([p.grad.clone() for p in ref.parameters()])
        with torch.no_grad():
            for p, g0, g1 in zip(ref.parameters(), *grads, strict=True):
                p -= 0.1 * (g0 + g1) / 2
    for name, value in ref.state_dict().items():
        for r in (0, 1):
            np.testing.assert_allclose(h[r][f"overlap_{name}"], value.numpy(), rtol=1e-12, atol=1e-14)
    assert [i["overlap_error"] for i in info] == [info[0]["overlap_error"]] * 2
    assert "accumulated twice" in info[0]["overlap_error"] and "overlap=False" in info[0]["overlap_error"]


def test_rank_minibatches_one_process_is_minibatches():
    from scembed._engine.training import minibatches

    a = distributed.rank_minibatches(23, 5, generator=torch.Generator().manual_seed(1))
    b = list(minibatches(23, 5, generator=torch.Generator().manual_seed(1)))
    assert len(a) == len(b) == 5 and all(torch.equal(x, y) for x, y in zip(a, b))
    g = torch.Generator().manual_seed(2)
    assert distributed.rank_generator(g) is g


@needs_gloo
@pytest.mark.slow
def test_tools_two_ranks_agree(two_ranks):
    """pp.affinity, tl.scdeepcluster, tl.autoencoder under torchrun: the same result on every rank."""
    a, b = np.load(two_ranks / "tools_rank0.npz"), np.load(two_ranks / "tools_rank1.npz")
    assert set(a.files) == set(b.files)
    for name in a.files:
        assert np.array_equal(a[name], b[name]), name
    assert len(np.unique(a["sdc_labels"])) == 3
    assert any(name.startswith("history_") and a[name].size for name in a.files)  # losses averaged over ranks


@needs_gloo
@pytest.mark.slow
def test_pp_affinity_sharded_equals_one_process(two_ranks):
    """pp.affinity goes through compute_affinities, whose kNN + calibration is split by rows under torchrun."""
    import anndata as ad

    import scembed as se

    got = np.load(two_ranks / "tools_rank0.npz")
    ref = ad.AnnData(worker.data())
    se.pp.affinity(ref, worker.PERPLEXITY, use_rep="X", n_neighbors=worker.K, knn_method="exact")
    P_ref = ref.obsp["affinity"].tocsr()
    assert np.array_equal(got["pp_indptr"], P_ref.indptr) and np.array_equal(got["pp_indices"], P_ref.indices)
    np.testing.assert_allclose(got["pp_data"], P_ref.data, rtol=0, atol=1e-6)


@needs_gloo
@pytest.mark.slow
def test_autoencoder_two_ranks_early_stopping_agrees(two_ranks):
    """tl.autoencoder: rank mini-batches and noise, every rank the same held-out loss, so the same stop and weights."""
    a = np.load(two_ranks / "tools_rank0.npz")
    n_epochs, best = (int(v) for v in a["ae_epochs"])
    val = a["ae_validation_loss"]
    assert 1 <= n_epochs <= 6 and len(val) == len(a["ae_loss"]) == n_epochs
    assert np.isfinite(val).all() and best == int(np.argmin(val))
    if n_epochs < 6:  # stopped by patience 1: the last epoch did not improve on the best
        assert best == n_epochs - 2
    assert np.isfinite(a["ae_latent"]).all() and a["ae_latent"].shape == (120, 4)


@needs_gloo
@pytest.mark.slow
def test_autoencoder_from_backed_h5ad_each_rank_reads_its_own_blocks(two_ranks):
    """Backed X under two ranks: outside training each rank reads only its own contiguous rows; in every epoch the
    ranks read disjoint blocks; every read is one short slice; the result is the in-memory one, on both ranks."""
    n, block, per_pass = worker.OOC_N, worker.OOC_BLOCK, worker.OOC_PASS
    a = np.load(two_ranks / "tools_rank0.npz")
    np.testing.assert_array_equal(a["ooc_latent"], a["ooc_memory_latent"])  # one data path, from disk or memory
    assert a["ooc_latent"].shape == (n, 3) and np.isfinite(a["ooc_latent"]).all()
    reads = [np.load(two_ranks / f"ooc_reads_rank{r}.npy") for r in (0, 1)]
    _check_reads(reads, n, block, per_pass, n_epochs=2)
    messages = [(two_ranks / f"ooc_mismatch_rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1] and "`adata.obs_names` differs across the 2 ranks" in messages[0]
    written = ad.read_h5ad(two_ranks / "written.h5ad")  # se.write_h5ad from both ranks: one complete file
    np.testing.assert_array_equal(written.obsm["X_autoencoder"], a["ooc_memory_latent"])
    assert [p.name for p in two_ranks.glob("*written*")] == ["written.h5ad"]


def _replay(recs: list, prefix: str, net: torch.nn.Module, opt, loss, *, key: str, n_steps: int) -> None:
    """Replay the ranks' recorded steps in one process: per step, the mean over the ranks of the gradients of
    ``loss(net, record, step)``, then one ``opt`` step; the network must end as every rank's did. Parameters are
    recorded by name (``net``'s state dict) or, for keys "0", "1", …, in the order of ``net.parameters()`` (then
    only parameters are compared: BatchNorm statistics are each rank's own until averaged after training)."""
    initial = {k.removeprefix(f"{prefix}_initial_"): k for k in recs[0].files if k.startswith(f"{prefix}_initial_")}
    initial.pop("settings", None)
    for name in initial.values():
        np.testing.assert_array_equal(recs[0][name], recs[1][name])  # the same start on both ranks
    by_order = all(k.isdigit() for k in initial)
    if by_order:
        with torch.no_grad():
            for q, k in zip(net.parameters(), sorted(initial, key=int), strict=True):
                q.copy_(torch.from_numpy(recs[0][initial[k]]))
    else:
        net.load_state_dict({name: torch.from_numpy(recs[0][k]) for name, k in initial.items()})
    assert len(recs[0][f"{prefix}_{key}"]) == len(recs[1][f"{prefix}_{key}"]) == n_steps
    assert not np.array_equal(recs[0][f"{prefix}_{key}"], recs[1][f"{prefix}_{key}"])  # the ranks' batches differ
    for step in range(n_steps):
        grads = []
        for rec in recs:
            net.zero_grad(set_to_none=True)
            loss(net, rec, step).backward()
            grads.append([q.grad.clone() for q in net.parameters()])
        for q, g0, g1 in zip(net.parameters(), *grads, strict=True):
            q.grad = (g0 + g1) / 2
        opt.step()
    final = dict(enumerate(net.parameters())) if by_order else net.state_dict()
    for name, value in final.items():
        for rec in recs:
            np.testing.assert_allclose(rec[f"{prefix}_final_{name}"], value.detach().numpy(), rtol=1e-5, atol=1e-6)


def _tensor(rec, key: str, step: int) -> torch.Tensor:
    return torch.from_numpy(rec[key][step])


@needs_gloo
@pytest.mark.slow
def test_autoencoder_two_ranks_step_on_the_mean_of_their_gradients(two_ranks, one_torch_thread):
    """Replayed in one process from the recorded inputs, every step of tl.autoencoder on 2 ranks is one Adam step on
    the mean of the two ranks' gradients (the wide layers' averaged while backward went on, the rest flat), and
    both ranks end with that network. Adam hides a gradient's scale, so the scale is checked with SGD in
    test_trainer_helpers_across_ranks; this checks that every rank steps on both ranks' batches."""
    from scembed._engine.autoencoder import Autoencoder
    from scembed._engine.zinb import reconstruction_loss

    recs = [np.load(two_ranks / f"steps_rank{r}.npz") for r in (0, 1)]
    net = Autoencoder(40, 3, (16,))

    def loss(net, rec, step):
        out = net.decode(net.encode(_tensor(rec, "ae_noisy", step)))
        return reconstruction_loss("zinb", out, _tensor(rec, "ae_raw", step), _tensor(rec, "ae_sf", step))

    opt = adam(net.parameters(), lr=worker.STEPS_LR, amsgrad=True)
    _replay(recs, "ae", net, opt, loss, key="raw", n_steps=worker.STEPS_N // worker.STEPS_BATCH)  # 2 epochs


@needs_gloo
@pytest.mark.slow
def test_scdeepcluster_two_ranks_step_on_the_mean_of_their_gradients(two_ranks, one_torch_thread):
    """The same replay for scDeepCluster's clustering stage: ZINB of the noisy input + γ·KL(P‖Q) of the clean
    input, with each cell's DEC target from the all-reduced cluster sums, Adadelta on network and centres."""
    from scembed._engine.scdeepcluster import ZINBAutoencoder, kl_divergence, soft_assign, zinb_nll_logits

    recs = [np.load(two_ranks / f"steps_rank{r}.npz") for r in (0, 1)]
    gamma, lr = (float(v) for v in recs[0]["sdc_initial_settings"])
    net = ZINBAutoencoder(40, 3, (16,))
    net.set_centroids(torch.zeros(3, 3))

    def loss(net, rec, step):
        both = torch.cat([_tensor(rec, "sdc_noisy", step), _tensor(rec, "sdc_xin", step)])
        z_noisy, z_clean = net.encode(both).chunk(2)
        recon = zinb_nll_logits(net.decode(z_noisy), _tensor(rec, "sdc_raw", step), _tensor(rec, "sdc_sf", step))
        return recon + gamma * kl_divergence(_tensor(rec, "sdc_p", step), soft_assign(z_clean, net.centroids))

    opt = torch.optim.Adadelta(net.parameters(), lr=lr, rho=0.95)
    _replay(recs, "sdc", net, opt, loss, key="raw", n_steps=worker.STEPS_N // worker.STEPS_BATCH)


@needs_gloo
@pytest.mark.slow
def test_imap_two_ranks_agree_and_stage_one_steps_on_the_mean_of_their_gradients(two_ranks, one_torch_thread):
    """tl.imap_integrate under 2 ranks: the same codes and corrected expression on both; replayed in one process,
    stage I's first step is the Adam step on the mean of the two ranks' gradients (each rank's own mixup cells, its
    BatchNorm on its own batch), not the step on either rank's own. One step only: Adam's first step moves every
    weight by ±lr after the sign of its gradient, so a near-zero gradient whose rounding differs flips a weight,
    and with β₁ = 0.5 such flips grow over later steps; all but a few weights must agree."""
    from scembed._engine import imap as engine

    recs = [np.load(two_ranks / f"steps_rank{r}.npz") for r in (0, 1)]
    for key in ("imap_codes", "imap_layer"):
        np.testing.assert_array_equal(recs[0][key], recs[1][key])
        assert np.isfinite(recs[0][key]).all()
    lambda_recon, lambda_content, lr = (float(v) for v in recs[0]["imap_initial_settings"])
    n_params = sum(1 for k in recs[0].files if k.startswith("imap_initial_")) - 1
    start = [torch.from_numpy(recs[0][f"imap_initial_{i}"]) for i in range(n_params)]
    after = [recs[0][f"imap_final_{i}"] for i in range(n_params)]
    for i in range(n_params):  # the same start and first step on both ranks
        np.testing.assert_array_equal(recs[0][f"imap_initial_{i}"], recs[1][f"imap_initial_{i}"])
        np.testing.assert_array_equal(after[i], recs[1][f"imap_final_{i}"])

    def first_step(ranks: tuple[int, ...]) -> list[np.ndarray]:
        encoder, decoder = engine.make_encoder(40, 8), engine.BatchDecoder(8, 2, 40)
        params = [*encoder.parameters(), *decoder.parameters()]
        with torch.no_grad():
            for q, value in zip(params, start, strict=True):
                q.copy_(value)
        grads = []
        for r in ranks:
            encoder.zero_grad(set_to_none=True)
            decoder.zero_grad(set_to_none=True)
            x, batch, other = (_tensor(recs[r], f"imap_{name}", 0) for name in ("x", "batch", "other"))
            recon, content = engine.stage1_losses(encoder, decoder, x, batch, other)
            (lambda_recon * recon + lambda_content * content).backward()
            grads.append([q.grad.clone() for q in params])
        for q, *gs in zip(params, *grads, strict=True):
            q.grad = sum(gs) / len(gs)
        engine._adam(params, lr).step()
        return [q.detach().numpy() for q in params]

    def agreement(replayed: list[np.ndarray]) -> float:
        same = sum(int(np.isclose(a, b, rtol=1e-5, atol=1e-7).sum()) for a, b in zip(after, replayed, strict=True))
        return same / sum(a.size for a in after)

    assert agreement(first_step((0, 1))) > 0.999
    assert agreement(first_step((0,))) < 0.9 and agreement(first_step((1,))) < 0.9


def _check_reads(reads: list[np.ndarray], n: int, block: int, per_pass: int, n_epochs: int) -> None:
    """Row slices only, at most ``per_pass`` rows; outside training each rank's own contiguous rows; in every epoch
    whole blocks, disjoint between the ranks."""
    for r, log in enumerate(reads):
        assert len(log) and (log[:, 0] >= -1).all()
        assert (log[:, 2] - log[:, 1]).max() <= per_pass
        own = distributed.shard(n, distributed.World(rank=r, size=2))
        outside = log[log[:, 0] == -1]
        assert (outside[:, 1] >= own.start).all() and (outside[:, 2] <= own.stop).all(), (r, own, outside)
        training = log[log[:, 0] >= 0]
        assert (training[:, 1] // block == (training[:, 2] - 1) // block).all()
        assert int(log[:, 0].max()) + 1 == n_epochs
    for e in range(n_epochs):
        mine = [{int(s) // block for _, s, _ in log[log[:, 0] == e]} for log in reads]
        assert mine[0] and mine[1] and not mine[0] & mine[1], (e, mine)


@needs_gloo
@pytest.mark.slow
def test_scdeepcluster_from_backed_h5ad_each_rank_reads_its_own_blocks(two_ranks):
    """tl.scdeepcluster from a backed X under two ranks: both stages read whole blocks, disjoint between the ranks;
    the checks, encodings and DEC targets read only each rank's own rows; the result is the in-memory one."""
    a, b = (np.load(two_ranks / f"tools_rank{r}.npz") for r in (0, 1))
    np.testing.assert_array_equal(a["ooc_sdc_latent"], a["ooc_sdc_memory_latent"])
    np.testing.assert_array_equal(a["ooc_sdc_labels"], a["ooc_sdc_memory_labels"])
    assert a["ooc_sdc_latent"].shape == (worker.OOC_N, 3) and np.isfinite(a["ooc_sdc_latent"]).all()
    assert np.array_equal(a["ooc_sdc_labels"], b["ooc_sdc_labels"])
    reads = [np.load(two_ranks / f"ooc_sdc_reads_rank{r}.npy") for r in (0, 1)]
    # two pretraining epochs, then two clustering epochs (tol=0: every epoch runs)
    _check_reads(reads, worker.OOC_N, worker.OOC_BLOCK, worker.OOC_PASS, n_epochs=4)
