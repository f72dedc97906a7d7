"""Data-parallel training: W processes under torchrun (gloo on CPU, NCCL on GPUs) against one process.

``--method neuralee`` (default):

Every run trains NeuralEE in mini-batch "graph" mode on the same simulated 50-D data (``simulate_embedding``: cell
types around lineages), one thread per process. Each rank computes its share of the affinities
(``knn_affinities``: rows split across ranks), then trains; the ranks take whole mini-batches of one shared
permutation and average their gradients before every Adam step, so W ranks do W times fewer, W times larger
steps per epoch. Reported per run: affinity time, training time per epoch (the whole ``fit_neuralee`` call divided
by the epochs, so its one-off setup and the final BatchNorm pass are spread over them: use 10 or more epochs for a
per-epoch figure), every rank's peak RSS (``VmHWM``: its own pages; ``ru_maxrss`` would count the launching
process's RSS at the fork), and the 10-NN accuracy of the cell types in the
embedding (5-fold cross-validation).

``--method autoencoder``: ``tl.autoencoder`` (ZINB, defaults but ``max_epochs``) on simulated raw counts
(``simulate``: 2,000 genes, 8 types) written as a sparse ``.h5ad`` and opened with ``read_h5ad(..., backed="r")``
by every rank, so each rank reads only its own row blocks (out of core). Reported per run: the whole call's time
divided by the epochs (it includes the passes over the file that check the counts and compute the scaling),
every rank's peak RSS, and the 10-NN accuracy of the cell types in the latent.

``--method scdeepcluster``: ``tl.scdeepcluster`` on the same backed file, K given (8), ``max_epochs=(E, E)``
(E pretraining and at most E clustering epochs; ``tol=0``, so all E run), both stages reading row blocks. The
epochs are those of both stages; the set-up includes the passes over the file, the encodings of all cells and
KMeans (rank 0). Reported also: the ARI of the clusters against the types.

``--step-times`` (count methods): every optimiser step of the first training stage is timed by two hooks on its
optimiser, one before the gradient averaging and one after the update, so that a step splits into its work (reading,
forward, backward, and the early all-reduces that run beside the backward pass) and the wait for the gradients plus
the update. Reported per run: the medians over the steps of the slowest rank. ``--no-overlap`` averages every
gradient in one all-reduce before the step (``sync_gradients(overlap=False)``), to compare.

``--independent``: besides each W-process torchrun run, W plain one-process runs started at the same time, each on
all the data, with no communication between them. Their epoch times show what sharing the machine alone costs
(cores, caches, memory bandwidth): the throughput of W such runs is W × (one run alone) / (one run beside W − 1
others), the most a data-parallel run on the same machine could reach.

    python benchmarks/distributed.py                          # 50,000 cells, 1 and 2 processes, 10 epochs
    python benchmarks/distributed.py --n-cells 200000 --ranks 1 2 4 --epochs 20 --json results/distributed.json
    python benchmarks/distributed.py --smoke                  # 600 cells, 1 epoch: checks that it runs
    python benchmarks/distributed.py --method autoencoder --n-cells 200000 --epochs 3
    python benchmarks/distributed.py --method scdeepcluster --n-cells 200000 --epochs 2
    python benchmarks/distributed.py --n-cells 200000 --epochs 3 --independent   # what sharing the machine costs
    python benchmarks/distributed.py --allreduce-mb 8.4       # one gradient all-reduce of 8.4 MB, 2 processes
    python benchmarks/distributed.py --allreduce-mb 8.4 --allreduce-dtypes float32 bfloat16 float16
                                                              # the same sent as 16-bit floats (compression)
    python benchmarks/distributed.py --method autoencoder --n-cells 50000 --epochs 1 --step-times [--no-overlap]

The runs are started with ``python -m torch.distributed.run --standalone --nproc-per-node W`` (torchrun); one
process (W = 1) runs the same worker without torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _runner import own_peak_rss_mib, thread_env, write_json  # noqa: E402


# ------------------------------------------------------------------------------------------------ worker
def time_epochs(engine) -> dict:
    """Wrap ``engine.train`` (the shared training loop as that engine module calls it) so that its calls add their
    seconds and epochs run to the returned dict (``s``, ``epochs``)."""
    loop = {"s": 0.0, "epochs": 0}
    train = engine.train

    def timed_train(step, n_epochs, **kwargs):
        t = time.perf_counter()
        history, n_run = train(step, n_epochs, **kwargs)
        loop["s"] += time.perf_counter() - t
        loop["epochs"] += int(n_run)
        return history, n_run

    engine.train = timed_train
    return loop


def worker(folder: Path, out: Path, opts: dict) -> None:
    """One rank (or the single process): affinities, training, its own numbers written to ``out``."""
    if opts.get("method") in ("autoencoder", "scdeepcluster"):
        counts_worker(folder, out, opts)
        return
    if opts.get("method") == "allreduce":
        allreduce_worker(out, opts)
        return
    import torch

    from scembed._engine import distributed
    from scembed._engine.neuralee import fit_neuralee

    torch.set_num_threads(1)
    w = distributed.init_from_env()
    X = np.load(folder / "X.npy")
    perplexity = float(opts["perplexity"])
    k = min(int(3 * perplexity), X.shape[0] - 1)
    t0 = time.perf_counter()
    P, _, _, method = distributed.knn_affinities(X, k, perplexity, method="auto", n_jobs=1)
    t_aff = time.perf_counter() - t0
    from scembed._engine import neuralee as engine

    loop = time_epochs(engine)  # the epochs themselves, without the set-up (spectral pre-fit, layout)
    torch.manual_seed(0)
    t1 = time.perf_counter()
    net, info = fit_neuralee(
        X,
        P=P,
        batch_size=int(opts["batch_size"]),
        batch_affinity="graph",
        patience=None,
        random_state=0,
        max_epochs=int(opts["epochs"]),
        show_progress=False,
    )
    t_train = time.perf_counter() - t1
    with torch.no_grad():
        Y = net(torch.as_tensor(X)).numpy()
    if w.is_main:
        np.save(out / "Y.npy", Y)
    result = {
        "rank": w.rank,
        "world_size": w.size,
        "knn_method": method,
        "affinity_s": t_aff,
        "train_s": t_train,
        "epochs": int(info["n_epochs"]),
        "s_per_epoch": t_train / max(1, int(info["n_epochs"])),
        "loop_s_per_epoch": loop["s"] / max(1, loop["epochs"]),
        "setup_s": t_train - loop["s"],
        "peak_rss_mib": own_peak_rss_mib(),
        "final_loss": float(info["history"]["loss"][-1]),
        "n_parameters": int(sum(p.numel() for p in net.parameters())),
    }
    (out / f"rank{w.rank}.json").write_text(json.dumps(result))
    if w.distributed:
        torch.distributed.destroy_process_group()


def counts_worker(folder: Path, out: Path, opts: dict) -> None:
    """One rank: ``tl.autoencoder`` or ``tl.scdeepcluster`` on the backed counts file; the latent (rank 0) and
    its numbers to ``out``."""
    import anndata as ad
    import torch

    import scembed as se
    from scembed._engine import distributed

    torch.set_num_threads(1)
    w = distributed.init_from_env()
    from scembed._engine import autoencoder, scdeepcluster

    # the epochs themselves (pretraining loop in autoencoder, clustering loop in scdeepcluster), without the passes
    # that check and scale the counts, the encodings of all cells and the initial clusters
    loop = time_epochs(autoencoder)
    loop_cluster = time_epochs(scdeepcluster)
    steps = time_steps(autoencoder, overlap=not opts.get("no_overlap")) if opts.get("step_times") else None
    a = ad.read_h5ad(folder / "counts.h5ad", backed="r")
    epochs = int(opts["epochs"])
    t0 = time.perf_counter()
    if opts["method"] == "autoencoder":
        se.tl.autoencoder(a, max_epochs=epochs, random_state=0, show_progress=False, device="cpu")
        key, rec = "X_autoencoder", a.uns["autoencoder"]
        n_epochs, final_loss = int(rec["n_epochs"]), float(rec["history"]["loss"][-1])
    else:
        se.tl.scdeepcluster(  # every epoch on every cell (no held-out stop): the epochs timed are the same ones
            a, n_clusters=8, max_epochs=(epochs, epochs), tol=0.0, validation_fraction=0.0, patience=None,
            random_state=0, show_progress=False, device="cpu",
        )  # fmt: skip
        key, rec = "X_scdeepcluster", a.uns["scdeepcluster"]
        n_epochs = int(rec["n_epochs_pretrain"]) + int(rec["n_epochs_cluster"])
        final_loss = float(rec["history"]["cluster_loss"][-1])
        if w.is_main:
            np.save(out / "labels.npy", a.obs["scdeepcluster"].astype(int).to_numpy())
    t_train = time.perf_counter() - t0
    if w.is_main:
        np.save(out / "Y.npy", np.asarray(a.obsm[key]))
    loop_s, loop_epochs = loop["s"] + loop_cluster["s"], loop["epochs"] + loop_cluster["epochs"]
    result = {
        "rank": w.rank,
        "world_size": w.size,
        "knn_method": "",
        "affinity_s": 0.0,
        "train_s": t_train,
        "epochs": n_epochs,
        "s_per_epoch": t_train / max(1, n_epochs),
        "loop_s_per_epoch": loop_s / max(1, loop_epochs),
        "setup_s": t_train - loop_s,
        "peak_rss_mib": own_peak_rss_mib(),
        "final_loss": final_loss,
        "n_parameters": 0,
    }
    if steps is not None:
        result.update(steps.summary())
    (out / f"rank{w.rank}.json").write_text(json.dumps(result))
    if w.distributed:
        torch.distributed.destroy_process_group()


class time_steps:
    """Time every optimiser step of ``train_autoencoder`` (the autoencoder, scDeepCluster's pretraining).

    Wraps the engine's ``adam`` so that its first optimiser gets a step pre-hook registered before the gradient
    averaging (which ``train_autoencoder`` adds afterwards) and a post-hook; the engine's ``averaged_gradients`` is
    called with ``overlap`` as given.
    """

    def __init__(self, engine, *, overlap: bool):
        self.before: list[float] = []
        self.after: list[float] = []
        self.timed = False
        adam, averaged = engine.adam, engine.averaged_gradients

        def timed_adam(params, **kwargs):
            opt = adam(params, **kwargs)
            if not self.timed:
                self.timed = True
                opt.register_step_pre_hook(lambda *_: self.before.append(time.perf_counter()))
                opt.register_step_post_hook(lambda *_: self.after.append(time.perf_counter()))
            return opt

        engine.adam = timed_adam
        engine.averaged_gradients = lambda opt, **_: averaged(opt, overlap=overlap)

    def summary(self) -> dict:
        before, after = np.asarray(self.before), np.asarray(self.after)
        n = min(len(before), len(after))
        work = before[1:n] - after[: n - 1]  # from the end of one update to the next step's gradient averaging
        wait = after[:n] - before[:n]  # the gradient averaging (waiting for the early all-reduces) and the update
        return {
            "steps_timed": int(n),
            "step_work_ms": 1000 * float(np.median(work)),
            "step_wait_ms": 1000 * float(np.median(wait)),
        }


def allreduce_worker(out: Path, opts: dict) -> None:
    """One rank: the gradient all-reduce of the trainers (``all_reduce_mean_``) on a buffer of the given size, timed.

    With a 16-bit ``dtype`` the float32 gradients are cast to it, all-reduced and cast back (what DDP's
    ``bf16_compress_hook`` / ``fp16_compress_hook`` do): half the bytes sent, two casts more.
    """
    import torch

    from scembed._engine import distributed

    torch.set_num_threads(1)
    w = distributed.init_from_env()
    grads = [torch.randn(int(opts["floats"]), generator=torch.Generator().manual_seed(w.rank))]
    dtype = getattr(torch, opts.get("dtype", "float32"))

    def reduce() -> None:
        if dtype == torch.float32:
            distributed.all_reduce_mean_(grads)
            return
        sent = grads[0].to(dtype)
        torch.distributed.all_reduce(sent, op=torch.distributed.ReduceOp.SUM)
        grads[0].copy_(sent).div_(w.size)

    for _ in range(3):  # warm-up: connections and buffers
        reduce()
    torch.distributed.barrier()
    t0 = time.perf_counter()
    repeats = 50
    for _ in range(repeats):
        reduce()
    seconds = (time.perf_counter() - t0) / repeats
    (out / f"rank{w.rank}.json").write_text(json.dumps({"rank": w.rank, "ms": 1000 * seconds}))
    torch.distributed.destroy_process_group()


def allreduce_main(n_ranks: int, mb: float, timeout: float, dtypes: list[str]) -> None:
    """Print the time of one gradient all-reduce of ``mb`` MB (float32) over ``n_ranks`` gloo processes.

    One run per entry of ``dtypes``, the dtype the gradients travel in, one after the other.
    """
    floats = int(mb * 1e6 / 4)
    for dtype in dtypes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            launch(n_ranks, out, out, {"method": "allreduce", "floats": floats, "dtype": dtype}, timeout)
            ms = max(json.loads((out / f"rank{r}.json").read_text())["ms"] for r in range(n_ranks))
        print(
            f"all-reduce of {mb:g} MB of float32 gradients sent as {dtype} over {n_ranks} processes "
            f"(gloo, one machine): {ms:.1f} ms"
        )


# ------------------------------------------------------------------------------------------------ driver
def _command(n_ranks: int, folder: Path, out: Path, opts: dict) -> list[str]:
    args = [str(Path(__file__).resolve()), "--worker", str(folder), str(out), json.dumps(opts)]
    if n_ranks == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n_ranks), *args]


def _env() -> dict:
    env = thread_env(1)
    src = HERE.parent / "src"
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    return env


def launch(n_ranks: int, folder: Path, out: Path, opts: dict, timeout: float) -> float:
    """Run the worker as ``n_ranks`` processes (torchrun) or one plain process; returns the wall time."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        _command(n_ranks, folder, out, opts), env=_env(), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{n_ranks}-process run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def launch_independent(n_runs: int, folder: Path, outs: list[Path], opts: dict, timeout: float) -> float:
    """``n_runs`` plain one-process runs at the same time (no torchrun, nothing shared but the machine)."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(_command(1, folder, out, opts), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for out in outs
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"independent run failed:\n{err.decode()[-4000:]}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", nargs=3, metavar=("DATA", "OUT", "OPTS"), help=argparse.SUPPRESS)
    p.add_argument("--method", choices=["neuralee", "autoencoder", "scdeepcluster"], default="neuralee")
    p.add_argument("--n-cells", type=int, default=50_000)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=2000)
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    p.add_argument("--smoke", action="store_true", help="600 cells, 1 epoch, batch 100: only checks that it runs")
    p.add_argument("--json", default=None, help="write the rows to this file")
    p.add_argument(
        "--independent",
        action="store_true",
        help="also run W plain one-process runs at once for every W > 1 in --ranks: what sharing the machine costs",
    )
    p.add_argument(
        "--step-times",
        action="store_true",
        help="count methods: time every step of the first stage, split into work and the wait for the gradients",
    )
    p.add_argument(
        "--no-overlap",
        action="store_true",
        help="with --step-times: one all-reduce of every gradient before the step instead of the overlapped ones",
    )
    p.add_argument(
        "--allreduce-mb",
        type=float,
        default=None,
        help="only time the trainers' gradient all-reduce of this many MB over the largest --ranks (e.g. 8.4: the "
        "count autoencoder's gradients at 2,000 genes)",
    )
    p.add_argument(
        "--allreduce-dtypes",
        nargs="+",
        default=["float32"],
        choices=["float32", "bfloat16", "float16"],
        help="with --allreduce-mb: the dtypes the gradients are sent in, each timed in turn (16-bit: compressed)",
    )
    args = p.parse_args()
    if args.worker:
        data, out, opts = args.worker
        worker(Path(data), Path(out), json.loads(opts))
        return
    if args.allreduce_mb is not None:
        allreduce_main(max(args.ranks), args.allreduce_mb, args.timeout, args.allreduce_dtypes)
        return
    if args.smoke:
        args.n_cells, args.epochs, args.batch_size, args.perplexity = 600, 1, 100, 10.0

    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    from scembed.datasets import simulate_embedding

    opts = {"epochs": args.epochs, "batch_size": args.batch_size, "perplexity": args.perplexity, "method": args.method}
    opts.update(step_times=args.step_times, no_overlap=args.no_overlap)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.method in ("autoencoder", "scdeepcluster"):
            from scembed.datasets import simulate

            a = simulate(args.n_cells, 2000, n_celltypes=8, random_state=0)
            a.obs = a.obs[["celltype"]].astype(str)
            a.write_h5ad(folder / "counts.h5ad")  # CSR on disk; every rank opens it backed
        else:
            a = simulate_embedding(args.n_cells, 50, random_state=0)
            np.save(folder / "X.npy", np.asarray(a.obsm["X_pca"], dtype=np.float32))
        labels = a.obs["celltype"].astype(str).to_numpy()
        del a
        runs = [(n, "torchrun" if n > 1 else "alone") for n in args.ranks]
        if args.independent:
            runs += [(n, "independent") for n in args.ranks if n > 1]
        for n_ranks, mode in runs:
            if mode == "independent":
                outs = [folder / f"i{n_ranks}_{i}" for i in range(n_ranks)]
                for out in outs:
                    out.mkdir()
                wall = launch_independent(n_ranks, folder, outs, opts, args.timeout)
                per_rank = [json.loads((out / "rank0.json").read_text()) for out in outs]
                out = outs[0]
            else:
                out = folder / f"w{n_ranks}"
                out.mkdir()
                wall = launch(n_ranks, folder, out, opts, args.timeout)
                per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(n_ranks)]
            Y = np.load(out / "Y.npy")
            acc = float(cross_val_score(KNeighborsClassifier(n_neighbors=10), Y, labels, cv=5).mean())
            row = {
                "method": args.method,
                "mode": mode,
                "n_cells": args.n_cells,
                "processes": n_ranks,
                "batch_size": args.batch_size,
                "epochs": per_rank[0]["epochs"],
                "wall_s": wall,
                "affinity_s": max(r["affinity_s"] for r in per_rank),
                "s_per_epoch": max(r["s_per_epoch"] for r in per_rank),
                "loop_s_per_epoch": max(r.get("loop_s_per_epoch", r["s_per_epoch"]) for r in per_rank),
                "setup_s": max(r.get("setup_s", 0.0) for r in per_rank),
                "peak_rss_mib_per_rank": [round(r["peak_rss_mib"], 1) for r in per_rank],
                "knn_acc": acc,
                "final_loss": per_rank[0]["final_loss"],
                "n_parameters": per_rank[0]["n_parameters"],
                "knn_method": per_rank[0]["knn_method"],
            }
            if "step_work_ms" in per_rank[0]:
                row["overlap"] = not args.no_overlap
                for key in ("step_work_ms", "step_wait_ms"):
                    row[key] = max(r[key] for r in per_rank)
            if (out / "labels.npy").exists():
                from sklearn.metrics import adjusted_rand_score

                row["ari"] = float(adjusted_rand_score(labels, np.load(out / "labels.npy")))
            rows.append(row)
    print(
        f"{'method':>13} {'mode':>11} {'cells':>9} {'procs':>5} {'epochs':>6} {'affinity s':>10} {'setup s':>8} "
        f"{'s/epoch':>8} {'epoch only':>10} {'RSS/rank MiB':>14} {'10-NN acc':>9} {'ARI':>6}"
    )
    for r in rows:
        rss = "/".join(f"{v:.0f}" for v in r["peak_rss_mib_per_rank"])
        ari = f"{r['ari']:.3f}" if "ari" in r else ""
        print(
            f"{r['method']:>13} {r['mode']:>11} {r['n_cells']:>9} {r['processes']:>5} {r['epochs']:>6} "
            f"{r['affinity_s']:>10.2f} {r['setup_s']:>8.1f} {r['s_per_epoch']:>8.3f} {r['loop_s_per_epoch']:>10.3f} "
            f"{rss:>14} {r['knn_acc']:>9.3f} {ari:>6}"
        )
    one = {r["method"]: r for r in rows if r["processes"] == 1}
    for r in rows:
        if r["processes"] > 1 and r["method"] in one:
            ref, w = one[r["method"]], r["processes"]
            if r["mode"] == "independent":
                # each of the W runs covers all the data: together they do W epochs in the time of one of theirs
                speed = w * ref["loop_s_per_epoch"] / r["loop_s_per_epoch"]
                print(f"{r['method']} {w} independent runs at once: {speed:.2f}x the throughput of one run alone")
                continue
            aff = f"affinities {ref['affinity_s'] / r['affinity_s']:.2f}x, " if r["affinity_s"] > 0 else ""
            speed = ref["loop_s_per_epoch"] / r["loop_s_per_epoch"]
            print(f"{r['method']} {w} processes vs 1: {aff}training epochs {speed:.2f}x the throughput")
    for r in rows:
        if "step_work_ms" in r:
            print(
                f"{r['method']} {r['processes']} process(es), overlap {r['overlap']}: median step work "
                f"{r['step_work_ms']:.1f} ms, gradient wait + update {r['step_wait_ms']:.1f} ms (slowest rank)"
            )
    if args.json:
        write_json(args.json, rows, script="distributed.py", threads_per_process=1)


if __name__ == "__main__":
    main()
