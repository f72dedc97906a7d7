"""Run by ``tests/test_distributed.py`` under ``torchrun`` (2 processes, gloo): writes each rank's results to a folder.

Usage: ``python -m torch.distributed.run --standalone --nproc-per-node 2 _distributed_worker.py MODE OUT``.

MODE ``train``: NeuralEE on the global graph (a few epochs), the sharded affinities, deliberate mismatches, the
trainers' helpers, and pp.affinity, tl.scdeepcluster and tl.autoencoder on tiny data, in memory and from a backed
.h5ad (many checks in one launch: the start-up of the processes dominates).
MODE ``early_exit``: rank 1 leaves before the first collective; rank 0 records how its collective (the one of
``se.write_h5ad``) failed.
MODE ``hang``: rank 1 stays alive but never joins the collective; rank 0 records how (and when) it failed.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

#: shared with the test: the data and training parameters
N, D, BATCH, EPOCHS, SEED, PERPLEXITY, K = 96, 5, 16, 3, 7, 5.0, 15
#: tl.autoencoder from a backed .h5ad: cells, rows per block, blocks per read, rows per pass (small, so many blocks)
OOC_N, OOC_BLOCK, OOC_PER_READ, OOC_PASS = 120, 8, 2, 16


def data() -> np.ndarray:
    """Three separated Gaussian blobs."""
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(3, D))
    return (centres[np.arange(N) % 3] + rng.normal(size=(N, D))).astype(np.float32)


def graph(X: np.ndarray):
    """The global affinities, computed with the rows split across ranks (one process: all rows)."""
    from scembed._engine.distributed import knn_affinities

    P, beta, n_bad, method = knn_affinities(X, K, PERPLEXITY, method="exact", device="cpu")
    return P, beta, n_bad, method


def fit(X: np.ndarray, P, *, batch_affinity: str = "graph", epochs: int = EPOCHS):
    """NeuralEE in mini-batch mode for a few epochs, every epoch's loss recorded (no patience)."""
    from scembed._engine.neuralee import fit_neuralee

    torch.manual_seed(SEED)
    return fit_neuralee(
        X,
        P=P,
        batch_size=BATCH,
        batch_affinity=batch_affinity,
        max_epochs=epochs,
        patience=None,
        min_delta=0.0,
        repulsion="uniform",  # the reference in test_distributed.py: uniform repulsion from random weights
        init="random",
        random_state=SEED,
        show_progress=False,
    )


def dec_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Latent coordinates of N cells and 3 centroids for the DEC target check."""
    g = torch.Generator().manual_seed(11)
    return torch.randn(N, 4, generator=g), torch.randn(3, 4, generator=g)


def overlap_net() -> torch.nn.Module:
    """A small float64 network with one wide weight (40 × 8: 2,560 bytes) and small ones, the same on every rank."""
    torch.manual_seed(13)
    return torch.nn.Sequential(torch.nn.Linear(8, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3)).double()


def overlap_batch(rank: int, step: int) -> torch.Tensor:
    """Rank ``rank``'s input at optimiser step ``step`` (different on every rank)."""
    return torch.randn(6, 8, generator=torch.Generator().manual_seed(100 * step + rank), dtype=torch.float64)


#: the early (overlapped) all-reduce threshold in the check below: the 40 × 8 weight goes early, the rest flat
OVERLAP_BYTES = 2048
OVERLAP_STEPS = 3


def overlapped_sgd(rank: int) -> tuple[dict[str, np.ndarray], str]:
    """SGD on :func:`overlap_net` with ``sync_gradients(overlap=True)``; its parameters, and the error of a second
    backward before one step."""
    from scembed._engine import distributed

    net = overlap_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with mock.patch.object(distributed, "EARLY_GRAD_BYTES", OVERLAP_BYTES):
        handle = distributed.sync_gradients(opt, overlap=True)
    for step in range(OVERLAP_STEPS):
        opt.zero_grad(set_to_none=True)
        net(overlap_batch(rank, step)).square().mean().backward()
        opt.step()
    params = {f"overlap_{k}": v.detach().numpy().copy() for k, v in net.state_dict().items()}
    opt.zero_grad(set_to_none=True)
    net(overlap_batch(rank, 0)).sum().backward()  # starts the wide weight's all-reduce (on every rank: matched)
    try:
        net(overlap_batch(rank, 0)).sum().backward()
        message = ""
    except RuntimeError as err:
        message = str(err)
    opt.step()  # waits for the pending all-reduce
    handle.remove()
    net(overlap_batch(rank, 0)).sum().backward()  # no hook any more: accumulating again is allowed
    net(overlap_batch(rank, 0)).sum().backward()
    return params, message


def _fail_on_main(rank: int) -> None:
    raise ValueError(f"raised on rank {rank}")


def out_of_core(out: Path, rank: int) -> dict[str, np.ndarray]:
    """tl.autoencoder and tl.scdeepcluster from a backed .h5ad with small blocks, and from the same data in memory.

    Every slice read from the file is logged as ``(epoch, start, stop)``, ``epoch`` −1 outside training (checks,
    statistics, held-out cells, encodings of all cells, DEC targets), to ``ooc_reads_rank{rank}.npy`` (autoencoder)
    and ``ooc_sdc_reads_rank{rank}.npy`` (scDeepCluster: its pretraining epochs, then its clustering epochs).
    """
    import anndata as ad
    from anndata._core.sparse_dataset import _CSRDataset
    from scipy import sparse

    import scembed as se
    from scembed._engine import counts

    sizes = (counts.BLOCK_ROWS, counts.READ_BLOCKS, counts.INFER_BATCH)
    counts.BLOCK_ROWS, counts.READ_BLOCKS, counts.INFER_BATCH = OOC_BLOCK, OOC_PER_READ, OOC_PASS
    read, epoch = _CSRDataset.__getitem__, counts.RowBlocks.epoch
    adata = se.datasets.simulate(OOC_N, 40, n_celltypes=3, random_state=2)
    adata.X = sparse.csr_matrix(adata.X)
    adata.write_h5ad(out / f"backed_rank{rank}.h5ad")
    kw = dict(hidden=(16,), max_epochs=2, batch_size=8, validation_fraction=0.25, patience=None, show_progress=False)
    sdc_kw = dict(n_clusters=3, n_latent=3, hidden=(16,), max_epochs=(2, 2), tol=0.0, batch_size=8, show_progress=False)
    runs = {
        "ooc": lambda a: se.tl.autoencoder(a, 3, **kw),
        "ooc_sdc": lambda a: se.tl.scdeepcluster(a, **sdc_kw),
    }
    results: dict[str, np.ndarray] = {}
    for name, run in runs.items():
        reads, state = [], {"phase": -1, "epochs": 0}

        def spy(self, key, reads=reads, state=state):
            reads.append((state["phase"], key.start, key.stop) if isinstance(key, slice) else (-2, -1, -1))
            return read(self, key)

        def logged_epoch(self, *args, state=state, **kwargs):
            state["phase"], state["epochs"] = state["epochs"], state["epochs"] + 1
            yield from epoch(self, *args, **kwargs)
            state["phase"] = -1

        _CSRDataset.__getitem__, counts.RowBlocks.epoch = spy, logged_epoch
        try:
            backed = ad.read_h5ad(out / f"backed_rank{rank}.h5ad", backed="r")
            run(backed)
            backed.file.close()
        finally:
            _CSRDataset.__getitem__, counts.RowBlocks.epoch = read, epoch
        np.save(out / f"{name}_reads_rank{rank}.npy", np.asarray(reads, dtype=np.int64))
        memory = adata.copy()
        run(memory)
        key = "X_autoencoder" if name == "ooc" else "X_scdeepcluster"
        results[f"{name}_latent"] = np.asarray(backed.obsm[key])
        results[f"{name}_memory_latent"] = np.asarray(memory.obsm[key])
        if name == "ooc_sdc":
            results["ooc_sdc_labels"] = backed.obs["scdeepcluster"].astype(int).to_numpy()
            results["ooc_sdc_memory_labels"] = memory.obs["scdeepcluster"].astype(int).to_numpy()
    other = adata.copy()  # each rank reads other rows: different cells on one rank are refused by their names
    if rank == 1:
        other.obs_names = [*other.obs_names[:-1], "other"]
    try:
        se.tl.autoencoder(other, 3, **kw)
        message = ""
    except ValueError as err:
        message = str(err)
    (out / f"ooc_mismatch_rank{rank}.txt").write_text(message)
    se.tl.autoencoder(adata, 3, **kw)
    counts.BLOCK_ROWS, counts.READ_BLOCKS, counts.INFER_BATCH = sizes
    se.write_h5ad(adata, out / "written.h5ad")  # every rank calls it; rank 0 alone writes, atomically
    return results


@contextlib.contextmanager
def _small_steps():
    """Blocks of :data:`STEPS_BLOCK` rows read one at a time (every rank 2 blocks per epoch, each 2 whole batches),
    and the early all-reduce from :data:`STEPS_EARLY_BYTES` (the 40-gene input layer and heads take it)."""
    from scembed._engine import counts, distributed

    with (
        mock.patch.object(counts, "BLOCK_ROWS", STEPS_BLOCK),
        mock.patch.object(counts, "READ_BLOCKS", 1),
        mock.patch.object(distributed, "EARLY_GRAD_BYTES", STEPS_EARLY_BYTES),
    ):
        yield


def _step_counts():
    """Dense simulated counts (dense: the losses need no positions of non-zero counts)."""
    import scembed as se

    adata = se.datasets.simulate(STEPS_N, 40, n_celltypes=3, random_state=4)
    adata.X = adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X
    return adata


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().clone().numpy()


def _recorded(prefix: str, record: dict) -> dict[str, np.ndarray]:
    out = {f"{prefix}_initial_{k}": v for k, v in record.pop("initial").items()}
    out.update({f"{prefix}_final_{k}": v for k, v in record.pop("final").items()})
    out.update({f"{prefix}_{name}": np.stack(values) for name, values in record.items()})
    return out


def autoencoder_steps() -> dict[str, np.ndarray]:
    """tl.autoencoder for 2 epochs, every step's inputs recorded: the network after the broadcast of rank 0's
    weights, each step's noisy encoder input and the count terms of its loss, and the network after training.

    From these one process can replay what the ranks did together (the test: the two ranks' gradients of each step
    averaged, one Adam step), which checks the data-parallel update itself, the overlapped all-reduce included.
    """
    import scembed as se
    from scembed._engine import autoencoder as engine

    record: dict = {"noisy": [], "raw": [], "sf": []}
    nets: list[torch.nn.Module] = []
    broadcast, with_noise, loss = engine.broadcast_module_, engine._with_noise, engine.reconstruction_loss

    def spy_broadcast(net):
        broadcast(net)
        nets.append(net)
        record["initial"] = {k: _array(v) for k, v in net.state_dict().items()}

    def spy_noise(x, sigma, generator):
        noisy = with_noise(x, sigma, generator)
        record["noisy"].append(_array(noisy))
        return noisy

    def spy_loss(likelihood, out, raw, sf, nonzero):
        assert nonzero is None
        record["raw"].append(_array(raw))
        record["sf"].append(_array(sf))
        return loss(likelihood, out, raw, sf, nonzero)

    with (
        _small_steps(),
        mock.patch.object(engine, "broadcast_module_", spy_broadcast),
        mock.patch.object(engine, "_with_noise", spy_noise),
        mock.patch.object(engine, "reconstruction_loss", spy_loss),
    ):
        se.tl.autoencoder(
            _step_counts(), 3, hidden=(16,), max_epochs=2, batch_size=STEPS_BATCH, validation_fraction=0,
            lr=STEPS_LR, patience=None, show_progress=False,
        )  # fmt: skip
    record["final"] = {k: _array(v) for k, v in nets[0].state_dict().items()}
    return _recorded("ae", record)


def scdeepcluster_steps() -> dict[str, np.ndarray]:
    """tl.scdeepcluster's clustering stage (2 epochs, K = 3), every step's inputs recorded as in
    :func:`autoencoder_steps`: the network and centres when the stage starts, each step's clean and noisy encoder
    input, count terms and DEC targets of its cells, γ and the learning rate, and the network after the stage."""
    import inspect

    import scembed as se
    from scembed._engine import scdeepcluster as engine

    record: dict = {"xin": [], "noisy": [], "raw": [], "sf": [], "p": []}
    cluster, with_noise, nll, kl = engine.cluster, engine._with_noise, engine.zinb_nll_logits, engine.kl_divergence

    def spy_cluster(net, *args, **kwargs):
        lr = kwargs.get("lr", inspect.signature(cluster).parameters["lr"].default)
        record["initial"] = {k: _array(v) for k, v in net.state_dict().items()}
        record["initial"]["settings"] = np.asarray([kwargs["gamma"], lr])
        out = cluster(net, *args, **kwargs)
        record["final"] = {k: _array(v) for k, v in net.state_dict().items()}
        return out

    def spy_noise(x, sigma, generator):  # the clustering stage's (pretraining calls the autoencoder module's)
        noisy = with_noise(x, sigma, generator)
        record["xin"].append(_array(x))
        record["noisy"].append(_array(noisy))
        return noisy

    def spy_nll(out, raw, sf, nonzero=None):
        assert nonzero is None
        record["raw"].append(_array(raw))
        record["sf"].append(_array(sf))
        return nll(out, raw, sf, nonzero)

    def spy_kl(p, q):
        record["p"].append(_array(p))
        return kl(p, q)

    with (
        _small_steps(),
        mock.patch.object(engine, "cluster", spy_cluster),
        mock.patch.object(engine, "_with_noise", spy_noise),
        mock.patch.object(engine, "zinb_nll_logits", spy_nll),
        mock.patch.object(engine, "kl_divergence", spy_kl),
    ):
        se.tl.scdeepcluster(
            _step_counts(), n_clusters=3, n_latent=3, hidden=(16,), max_epochs=(1, 2), tol=0.0,
            batch_size=STEPS_BATCH, show_progress=False,
        )  # fmt: skip
    return _recorded("sdc", record)


def imap_steps() -> dict[str, np.ndarray]:
    """tl.imap_integrate (2 + 2 epochs) with stage I's steps recorded: the networks' parameters when its optimiser is
    made and after its first step (``imap_final_*``), each step's mixup input, batches and target batches, and the
    loss weights and learning rate; also the outputs (codes, corrected expression), which must agree across the
    ranks."""
    import scanpy as sc

    import scembed as se
    from scembed._engine import imap as engine

    record: dict = {"x": [], "batch": [], "other": []}
    train_stage1, adam, losses = engine.train_stage1, engine._adam, engine.stage1_losses

    def spy_train(*args, **kwargs):
        encoder, decoder, history = train_stage1(*args, **kwargs)
        weights = [kwargs["lambda_recon"], kwargs["lambda_content"]]  # as tl.imap_integrate passes them
        record["initial"]["settings"] = np.asarray([*weights, record["initial"]["settings"][0]])
        return encoder, decoder, history

    def spy_adam(params, lr):
        params = list(params)
        opt = adam(params, lr)
        if "initial" not in record:  # stage I's optimiser (stage II makes its own later): its start, its first step
            record["initial"] = {str(i): _array(q) for i, q in enumerate(params)}
            record["initial"]["settings"] = np.asarray([lr])
            handle = []

            def first_step(*_):
                record["final"] = {str(i): _array(q) for i, q in enumerate(params)}
                handle.pop().remove()

            handle.append(opt.register_step_post_hook(first_step))
        return opt

    def spy_losses(encoder, decoder, x, batch, other):
        for name, value in (("x", x), ("batch", batch), ("other", other)):
            record[name].append(_array(value))
        return losses(encoder, decoder, x, batch, other)

    adata = se.datasets.simulate(120, 40, n_batches=2, n_celltypes=3, batch_scale=0.5, random_state=5)
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    with (
        mock.patch.object(engine, "train_stage1", spy_train),
        mock.patch.object(engine, "_adam", spy_adam),
        mock.patch.object(engine, "stage1_losses", spy_losses),
    ):
        se.tl.imap_integrate(
            adata, batch_key="batch", n_latent=8, max_epochs=(2, 2), batch_size=(8, 16), k_within=5, n_sample=60,
            show_progress=False,
        )  # fmt: skip
    out = _recorded("imap", record)
    out["imap_codes"] = np.asarray(adata.obsm["X_imap"])
    out["imap_layer"] = np.asarray(adata.layers["imap"].toarray() if hasattr(adata.layers["imap"], "toarray")
                                   else adata.layers["imap"])  # fmt: skip
    return out


#: the recorded runs: cells, rows per block, mini-batch size (every step whole), the autoencoder's learning rate,
#: and the early all-reduce size (the 40-gene input layer and heads, 16 × 40 and 120 × 16 floats, take it)
STEPS_N, STEPS_BLOCK, STEPS_BATCH, STEPS_LR, STEPS_EARLY_BYTES = 64, 16, 8, 0.01, 2048


def tools() -> dict[str, np.ndarray]:
    """The public API under torchrun on tiny data: pp.affinity, tl.scdeepcluster, tl.autoencoder (early stopping)."""
    import anndata as ad

    import scembed as se

    out: dict[str, np.ndarray] = {}
    # pp.affinity: the kNN + calibration of compute_affinities, rows split across ranks
    b = ad.AnnData(data())
    se.pp.affinity(b, PERPLEXITY, use_rep="X", n_neighbors=K, knn_method="exact")
    P = b.obsp["affinity"].tocsr()
    out.update(pp_data=P.data, pp_indices=P.indices, pp_indptr=P.indptr)
    from scembed._engine import counts

    # the count trainers read rows in blocks (512 rows by default, one for 120 cells); 2 ranks need ≥ 2 blocks each
    block_rows, counts.BLOCK_ROWS = counts.BLOCK_ROWS, 16
    a = se.datasets.simulate(120, 60, n_celltypes=3, n_batches=2, random_state=0)
    se.tl.scdeepcluster(
        a, n_clusters=3, batch_size=32, max_epochs=(2, 2), n_latent=4, hidden=(16,), random_state=0, show_progress=False
    )
    history = a.uns["scdeepcluster"].get("history", {})
    out.update({f"history_{k}": np.asarray(v, dtype=np.float64) for k, v in history.items() if isinstance(v, list)})
    out["sdc_latent"] = np.asarray(a.obsm["X_scdeepcluster"])
    out["sdc_labels"] = a.obs["scdeepcluster"].astype(int).to_numpy()
    # tl.autoencoder: held-out cells, patience 1 (lr large enough that the validation loss may stop improving)
    se.tl.autoencoder(
        a,
        4,
        hidden=(16,),
        max_epochs=6,
        batch_size=16,
        lr=3e-2,
        validation_fraction=0.25,
        patience=1,
        random_state=0,
        show_progress=False,
    )
    counts.BLOCK_ROWS = block_rows
    rec = a.uns["autoencoder"]
    out["ae_latent"] = np.asarray(a.obsm["X_autoencoder"])
    out["ae_loss"] = np.asarray(rec["history"]["loss"], dtype=np.float64)
    out["ae_validation_loss"] = np.asarray(rec["history"]["validation_loss"], dtype=np.float64)
    out["ae_epochs"] = np.asarray([rec["n_epochs"], rec["best_epoch"]])
    return out


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    from scembed._engine import distributed

    w = distributed.init_from_env()
    rank = w.rank
    if mode == "train":
        X = data()
        P, beta, n_bad, method = graph(X)
        np.savez(
            out / f"affinity_rank{rank}.npz",
            data=P.data,
            indices=P.indices,
            indptr=P.indptr,
            beta=beta,
            n_bad=n_bad,
        )
        net, info = fit(X, P)
        Y = net(torch.as_tensor(X)).detach().numpy()
        state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
        np.savez(out / f"neuralee_rank{rank}.npz", Y=Y, loss=np.asarray(info["history"]["loss"]), **state)
        # in-batch affinities ("batch" mode): the same block split, no graph
        net_b, _ = fit(X, None, batch_affinity="batch", epochs=1)
        np.save(out / f"neuralee_batch_rank{rank}.npy", net_b(torch.as_tensor(X)).detach().numpy())
        # a deliberate mismatch: rank 1 holds other genes
        genes = [f"g{i}" for i in range(20)]
        if rank == 1:
            genes[7] = "other"
        try:
            distributed.check_same_across_ranks("var_names", genes)
            message = ""
        except ValueError as err:
            message = str(err)
        (out / f"mismatch_rank{rank}.txt").write_text(message)
        # different data on one rank: the affinities refuse before any work, on every rank
        X_other = X.copy()
        if rank == 1:
            X_other[5, 2] += 1.0
        try:
            distributed.knn_affinities(X_other, K, PERPLEXITY, method="exact")
            message = ""
        except ValueError as err:
            message = str(err)
        (out / f"mismatch_data_rank{rank}.txt").write_text(message)
        # the trainers' helpers: DEC targets from sharded latents, rank-0-only work, lock-step mini-batches
        z, centroids = dec_inputs()
        q, p = distributed.dec_assignments(z[distributed.shard(len(z))], centroids)
        gen = torch.Generator().manual_seed(3)
        batches = distributed.rank_minibatches(23, 5, generator=gen)
        shared = torch.Generator().manual_seed(5)
        noise = distributed.rank_generator(shared)
        on_main_value = distributed.on_main(lambda: 10 * rank + 7)
        bn = torch.nn.BatchNorm1d(3)
        bn(torch.randn(8, 3, generator=torch.Generator().manual_seed(rank)))  # statistics of this rank's batch
        distributed.average_buffers_(bn)
        try:
            distributed.on_main(_fail_on_main, rank)
            on_main_error = ""
        except ValueError as err:
            on_main_error = str(err)
        overlap_params, overlap_error = overlapped_sgd(rank)
        np.savez(
            out / f"helpers_rank{rank}.npz",
            **overlap_params,
            q=q.numpy(),
            p=p.numpy(),
            batches=torch.stack(batches).numpy(),
            noise=torch.rand(4, generator=noise).numpy(),
            shared_after=torch.rand(4, generator=shared).numpy(),
            bn_mean=bn.running_mean.numpy(),
            bn_var=bn.running_var.numpy(),
        )
        info_out = {
            "on_main": on_main_value,
            "on_main_error": on_main_error,
            "overlap_error": overlap_error,
            "world": [w.rank, w.size, w.backend],
            "is_main": distributed.is_main(),
            "method": method,
        }
        (out / f"info_rank{rank}.json").write_text(json.dumps(info_out))
        np.savez(out / f"tools_rank{rank}.npz", **tools(), **out_of_core(out, rank))
        np.savez(out / f"steps_rank{rank}.npz", **autoencoder_steps(), **scdeepcluster_steps(), **imap_steps())
    elif mode in ("early_exit", "hang"):
        if rank == 1:
            if mode == "hang":
                time.sleep(120)  # alive but never joins the collective; torchrun ends it once rank 0 has failed
            return  # leaves without a word; rank 0 must not wait forever
        import anndata as ad

        import scembed as se

        start = time.monotonic()
        try:  # the collective that fails is the one se.write_h5ad makes before writing: no file must appear
            se.write_h5ad(ad.AnnData(np.ones((3, 2), dtype=np.float32)), out / f"{mode}_written.h5ad")
            outcome = "no error"
        except Exception as err:  # gloo reports the lost peer or the timeout as a RuntimeError subclass
            outcome = f"{type(err).__name__}: {err}"
        (out / f"{mode}_rank0.json").write_text(json.dumps({"seconds": time.monotonic() - start, "outcome": outcome}))
        sys.exit(3 if outcome != "no error" else 0)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
