"""NeuralEE benchmark: scembed's tl.neuralee against the original neuralee 0.1.6, openTSNE and UMAP.

Every method runs in its own subprocess (peak RSS = that process's ru_maxrss), on the same 50 PCs of
log-normalised counts, with the same number of threads. Then a scale run on simulated 50-D data.

On the real sets, NeuralEE, openTSNE and UMAP run once per ``--seeds`` seed and tl.ee once (its spectral start does
not depend on the seed); NeuralEE and tl.ee compute their own affinities (perplexity 30) inside the timed run, and
the EE objective of both embeddings is evaluated afterwards by one ``EEObjective`` on one affinity graph.

    python benchmarks/neuralee.py --original-python ORIGINAL_PY   # 5 real sets + 100k/300k/1.3M scale
    python benchmarks/neuralee.py --seeds 0 1 2 --scale   # 5 real sets: NeuralEE vs tl.ee vs openTSNE vs UMAP
    python benchmarks/neuralee.py --quick         # pbmc_10x_4k only, scale 100k
    python benchmarks/neuralee.py --scale 1300000 --scale-max-epochs 20 --skip-real
    python benchmarks/neuralee.py --vs-ee --seeds 0 1 2   # tl.neuralee at its defaults against tl.ee, same cells
    python benchmarks/neuralee.py --profile 100000        # where the time goes at 100,000 cells
    python benchmarks/neuralee.py --epoch-cost 4096 8192 10000 16384   # full-batch vs mini-batch epoch
    python benchmarks/neuralee.py --skip-real --scale 300000 --opentsne-max 0 --opentsne-recipe  # vs openTSNE's recipe

``--vs-ee`` runs in this process (``--threads`` torch threads) on every real set of ``VS_EE_REAL`` and on simulated
sets (``se.datasets.simulate`` counts → log → 50 PCs, and ``simulate_embedding``), each with one affinity graph
(perplexity 30) shared by both methods; it prints, per set and seed, the 10-NN accuracy, the Spearman correlation
of cell-type centroid distances and the EE objective of both embeddings (one ``EEObjective``, tl.ee's repulsion),
their differences and the times. tl.ee runs once per set (its spectral initialisation does not depend on the seed).

ORIGINAL_PY is an interpreter that can import neuralee 0.1.6 (e.g. ``python -m venv --system-site-packages venv &&
venv/bin/pip install --no-deps neuralee==0.1.6``; ``$NEURALEE_PY`` also works); it is monkeypatched here for
today's torch/numpy. Without it the original is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _runner import DATA, emit, lognorm_pca, patch_neuralee_for_today, run_child, script_command, write_json  # noqa: E402

REAL = ["pbmc_10x_4k", "worm_neuron_4k", "cite_pbmc_3762", "pbmc_10x_2100", "worm_neuron_2100"]
VS_EE_REAL = REAL
VS_EE_SIMULATED = ["simulate:0", "simulate:1", "simulate_embedding:0", "simulate_embedding:1"]


def prepare(name: str, out: Path) -> None:
    import anndata as ad

    a = ad.read_h5ad(DATA / f"{name}.h5ad")
    np.save(out / "X.npy", lognorm_pca(a))
    np.save(out / "labels.npy", a.obs["celltype"].astype(str).to_numpy())


def pcs_adata(X: np.ndarray, threads: int, affinity: bool = False):
    """An AnnData holding the 50 PCs ``X`` (as ``X`` and ``obsm["X_pca"]``), with perplexity-30 affinities if asked.

    The one set-up behind every scembed run here (NeuralEE, tl.ee, the EE objective), so they all see one graph.
    """
    import anndata as ad

    import scembed as se

    a = ad.AnnData(X=X)
    a.obsm["X_pca"] = X
    if affinity:
        se.pp.affinity(a, perplexity=30, n_jobs=threads, random_state=0)
    return a


# ------------------------------------------------------------------------------------------------ workers
def worker(method: str, folder: Path, threads: int, opts: dict) -> None:
    import torch

    torch.set_num_threads(threads)
    if method == "prepare":
        prepare(opts["name"], folder)
        emit({})
        return
    if method == "objective":
        emit(ee_objectives(folder, threads, opts["files"]))
        return
    X = np.load(folder / "X.npy")
    t0 = time.perf_counter()
    info: dict = {}
    if method == "scembed":
        import scembed as se

        a = pcs_adata(X, threads)
        se.tl.neuralee(a, n_jobs=threads, show_progress=False, **opts)
        Y = a.obsm["X_neuralee"]
        info = {
            "epochs": a.uns["neuralee"]["n_epochs"],
            "mode": a.uns["neuralee"]["mode"],
            "seconds": a.uns["neuralee"]["seconds"],
        }
    elif method == "ee":
        import scembed as se

        a = pcs_adata(X, threads, affinity=True)
        se.tl.ee(a, show_progress=False, **opts)
        Y = a.obsm["X_ee"]
    elif method == "original":
        Y = run_original(X, **opts)
    elif method == "opentsne":
        import openTSNE

        Y = np.asarray(openTSNE.TSNE(n_jobs=threads, random_state=opts.get("random_state", 0)).fit(X))
    elif method == "opentsne_recipe":
        Y, info = opentsne_recipe(X, threads)
    elif method == "umap":
        import numba
        import umap

        numba.set_num_threads(threads)
        Y = umap.UMAP(random_state=None, n_jobs=threads).fit_transform(X)
    else:
        raise ValueError(method)
    elapsed = time.perf_counter() - t0
    np.save(folder / f"Y_{method}.npy", np.asarray(Y, dtype=np.float32))
    emit({"time": elapsed, **info})


def ee_objectives(folder: Path, threads: int, files: list[str]) -> dict[str, float]:
    """The EE objective of every saved embedding ``files``, all evaluated by one EEObjective on one affinity graph."""
    import torch

    from scembed._engine.ee_objective import EEObjective

    X = np.load(folder / "X.npy")
    a = pcs_adata(X, threads, affinity=True)
    objective = EEObjective(a.obsp["affinity"], repulsion="distance", X=X)
    return {f: objective.value(torch.as_tensor(np.load(folder / f))) for f in files}


def opentsne_recipe(X: np.ndarray, threads: int, n_sample: int = 25_000) -> tuple[np.ndarray, dict]:
    """openTSNE's own large-data recipe (its "Embedding large data sets" example), with its settings.

    t-SNE of a random sample of 25,000 cells with perplexity-500 affinities and a PCA start; every other cell placed
    at its nearest sample cell (``prepare_partial``, k=1); the whole layout rescaled to standard deviation 1e-4 and
    optimised on the perplexity-50 affinities of all cells, 500 iterations with exaggeration 12, then 250 with 4.
    """
    import openTSNE

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    order = rng.permutation(X.shape[0])
    reverse = np.argsort(order)
    sample, rest = X[order[:n_sample]], X[order[n_sample:]]
    aff_sample = openTSNE.affinity.PerplexityBasedNN(sample, perplexity=500, n_jobs=threads, random_state=0)
    init = openTSNE.initialization.pca(sample, random_state=42)
    sample_embedding = openTSNE.TSNE(n_jobs=threads, random_state=0).fit(affinities=aff_sample, initialization=init)
    rest_init = sample_embedding.prepare_partial(rest, k=1, perplexity=1 / 3)
    init_full = np.vstack((sample_embedding, rest_init))[reverse]
    init_full = init_full / (np.std(init_full[:, 0]) * 10000)
    seconds["sample"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    aff = openTSNE.affinity.PerplexityBasedNN(X, perplexity=50, n_jobs=threads, random_state=0)
    seconds["affinity"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    embedding = openTSNE.TSNEEmbedding(init_full, aff, n_jobs=threads, random_state=42)
    embedding = embedding.optimize(n_iter=500, exaggeration=12)
    embedding = embedding.optimize(n_iter=250, exaggeration=4)
    seconds["optimise"] = time.perf_counter() - t1
    return np.asarray(embedding), {"seconds": seconds}


def run_original(X: np.ndarray, maxit: int = 500, N_small: float = 1.0) -> np.ndarray:
    """neuralee 0.1.6 with the three fixes it needs today (see ALGORITHMS.md §3)."""
    patch_neuralee_for_today()  # also keeps this folder (this script is called neuralee.py) off the import path
    import torch

    class ELoss(torch.autograd.Function):
        # the original's forward returns the integer constant tensor(0), so backward() refuses to run on today's
        # torch; return a float zero and keep its gradient (the EE gradient) unchanged
        @staticmethod
        def forward(ctx, X, Lp, Wn, lam):
            ctx.save_for_backward(X, Lp, Wn)
            ctx.lam = lam
            return X.new_zeros(())

        @staticmethod
        def backward(ctx, grad_output):
            from neuralee._aux.gradient import gradient_ee

            X, Lp, Wn = ctx.saved_tensors
            return gradient_ee(X, Lp, Wn, ctx.lam), None, None, None

    import neuralee.embedding as emb
    from neuralee.dataset import GeneExpressionDataset

    emb.eloss = lambda X, Lp, Wn, lam: ELoss.apply(X, Lp, Wn, lam)
    torch.manual_seed(0)
    np.random.seed(0)
    ds = GeneExpressionDataset(X)
    if N_small >= 1.0:
        ds.affinity(perplexity=30.0)
    else:
        ds.affinity_split(N_small=N_small, perplexity=30.0)
    nee = emb.NeuralEE(ds, d=2, lam=1, device=torch.device("cpu"))
    return nee.fine_tune(maxit=maxit, verbose=False)["X"].numpy()


def run(method: str, folder: Path, threads: int, opts: dict, timeout: int, original_python: str | None) -> dict:
    py = original_python if method == "original" else None
    r = run_child(script_command(__file__, "--worker", method, folder, threads, json.dumps(opts), python=py), threads,
                  timeout=timeout)  # fmt: skip
    if not r["ok"]:
        return {"error": r["error"].splitlines()[-1]}
    return {**r["result"], "rss_gb": r["peak_rss_mib"] / 1024}


# ------------------------------------------------------------------------------------------------ --epoch-cost
def epoch_cost(sizes: list[int], threads: int, epochs: int = 10) -> None:
    """Seconds per training epoch, full batch vs mini-batches of 1,024, at each size, in this process.

    The cost behind ``tl.neuralee``'s default batch size (full batch up to 10,000 cells): an exact epoch is O(N²),
    a mini-batch epoch O(N · 1,024).
    """
    import anndata as ad
    import torch

    import scembed as se

    torch.set_num_threads(threads)
    print("\n| cells | full batch (s / epoch) | batches of 1,024 (s / epoch) | ratio |\n| --- | --- | --- | --- |")
    for n in sizes:
        a = se.datasets.simulate_embedding(n, 50, random_state=0)
        a = ad.AnnData(X=np.asarray(a.X, dtype=np.float32))
        a.obsm["X_pca"] = a.X
        se.pp.affinity(a, perplexity=30, n_jobs=threads, random_state=0)
        cost = {}
        for batch_size in (1.0, 1024):
            kw = dict(batch_size=batch_size, max_epochs=epochs, patience=None, show_progress=False)
            se.tl.neuralee(a, n_jobs=threads, **kw)
            cost[batch_size] = a.uns["neuralee"]["seconds"]["train"] / epochs
        print(f"| {n} | {cost[1.0]:.3f} | {cost[1024]:.3f} | {cost[1.0] / cost[1024]:.2f} |", flush=True)


# ------------------------------------------------------------------------------------------------ --profile
def profile(n: int, threads: int) -> None:
    """Where tl.neuralee's time goes at its defaults on ``simulate_embedding(n, 50)``, in this process.

    The neighbour search and the calibration are timed on their own (the package's two engine calls, as
    ``pp.affinity`` makes them), then ``tl.neuralee`` runs on the stored graph under cProfile: its recorded parts
    (``uns["neuralee"]["seconds"]``) and, within training, the time of the step's parts on the main thread.
    """
    import cProfile
    import pstats

    import anndata as ad
    import torch

    import scembed as se
    from scembed._engine.affinity import entropic_affinities
    from scembed._engine.knn import nearest_neighbors

    torch.set_num_threads(threads)
    X = se.datasets.simulate_embedding(n, 50, random_state=0).X.astype(np.float32)
    t0 = time.perf_counter()
    idx, dist, method = nearest_neighbors(X, 90, n_jobs=threads, random_state=0)
    t1 = time.perf_counter()
    P, _, _ = entropic_affinities(idx, dist, 30.0)
    t2 = time.perf_counter()
    a = ad.AnnData(X)
    a.obsp["affinity"] = P
    prof = cProfile.Profile()
    prof.enable()
    se.tl.neuralee(a, use_rep="X", n_jobs=threads, show_progress=False)
    prof.disable()
    seconds = a.uns["neuralee"]["seconds"]
    print(f"\n{n} cells × 50, {threads} threads, tl.neuralee at its defaults ({a.uns['neuralee']['n_epochs']} epochs)")
    print("\n| part | seconds | share |\n| --- | --- | --- |")
    parts = {f"neighbour search ({method}, k = 90)": t1 - t0, "calibration + symmetrisation": t2 - t1}
    parts.update({k: v for k, v in seconds.items() if k != "total"})
    total = sum(parts.values())
    for name, sec in parts.items():
        print(f"| {name} | {sec:.1f} | {sec / total:.0%} |")
    stats = pstats.Stats(prof).stats
    inside = {
        "in-batch repulsion (batch_repulsion)": ("neuralee.py", "batch_repulsion"),
        "neighbour sampling (GraphSampler.sample)": ("neuralee.py", "sample"),
        "network forward (Sequential.forward)": ("container.py", "forward"),
        "backward (autograd)": ("graph.py", "_engine_run_backward"),
        "optimiser step (Adam)": ("optimizer.py", "wrapper"),
    }
    train = seconds.get("train", 0.0) + seconds.get("refine", 0.0)
    print("\n| within training | seconds (cumulative) | share of training |\n| --- | --- | --- |")
    for label, (file, func) in inside.items():
        cum = sum(v[3] for k, v in stats.items() if k[0].endswith(file) and k[2] == func)
        print(f"| {label} | {cum:.1f} | {cum / train:.0%} |")


# ------------------------------------------------------------------------------------------------ --vs-ee
def vs_ee_data(name: str) -> tuple[np.ndarray, np.ndarray]:
    """50 PCs of log-normalised counts and the cell types of a real set, or of a simulated one (``kind:seed``)."""
    import anndata as ad

    import scembed as se

    if name.startswith("simulate_embedding:"):
        a = se.datasets.simulate_embedding(3000, 50, random_state=int(name.split(":")[1]))
        return np.asarray(a.X, dtype=np.float32), a.obs["celltype"].astype(str).to_numpy()
    if name.startswith("simulate:"):
        a = se.datasets.simulate(3000, 1000, n_celltypes=8, random_state=int(name.split(":")[1]))
    else:
        a = ad.read_h5ad(DATA / f"{name}.h5ad")
    return lognorm_pca(a), a.obs["celltype"].astype(str).to_numpy()


def vs_ee(
    names: list[str], seeds: list[int], threads: int, json_path: Path | None, options: dict | None = None
) -> None:
    """tl.neuralee at its defaults against tl.ee on the same cells and affinities (see the module docstring)."""
    import torch
    from _metrics import centroid_spearman, knn_accuracy

    import scembed as se
    from scembed._engine.ee_objective import EEObjective

    torch.set_num_threads(threads)
    rows = []
    print(f"\ntl.neuralee options beside the defaults: {options or 'none'}")
    print("\n| data | seed | 10-NN acc. NeuralEE / EE (diff) | centroid ρ NeuralEE / EE (diff) | "
          "EE objective NeuralEE / EE (diff) | time NeuralEE / EE (s) | epochs |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        X, labels = vs_ee_data(name)
        a = pcs_adata(X, threads, affinity=True)
        t0 = time.perf_counter()
        se.tl.ee(a, show_progress=False)
        t_ee = time.perf_counter() - t0
        Y_ee = a.obsm["X_ee"]
        obj = EEObjective(a.obsp["affinity"], repulsion=a.uns["ee"]["params"]["repulsion"], X=X)
        e_ee = obj.value(torch.as_tensor(Y_ee))
        acc_ee, rho_ee = knn_accuracy(Y_ee, labels), centroid_spearman(X, Y_ee, labels)
        for seed in seeds:
            t0 = time.perf_counter()
            se.tl.neuralee(a, n_jobs=threads, random_state=seed, show_progress=False, **(options or {}))
            t_nee = time.perf_counter() - t0
            Y = a.obsm["X_neuralee"]
            e = obj.value(torch.as_tensor(Y))
            r = {
                "data": name,
                "seed": seed,
                "knn_acc": knn_accuracy(Y, labels),
                "knn_acc_ee": acc_ee,
                "centroid_rho": centroid_spearman(X, Y, labels),
                "centroid_rho_ee": rho_ee,
                "objective": e,
                "objective_ee": e_ee,
                "time": t_nee,
                "time_ee": t_ee,
                "epochs": a.uns["neuralee"]["n_epochs"],
                "options": options or {},
            }
            rows.append(r)
            print(
                f"| {name} | {seed} | {r['knn_acc']:.3f} / {acc_ee:.3f} ({r['knn_acc'] - acc_ee:+.3f}) | "
                f"{r['centroid_rho']:.3f} / {rho_ee:.3f} ({r['centroid_rho'] - rho_ee:+.3f}) | "
                f"{e:.4f} / {e_ee:.4f} ({100 * (e / e_ee - 1):+.1f} %) | {t_nee:.1f} / {t_ee:.1f} | {r['epochs']} |",
                flush=True,
            )
    write_json(json_path, rows, script="neuralee --vs-ee", threads=threads, load_average_end=os.getloadavg())


# ------------------------------------------------------------------------------------------------ real sets
def real_sets(names: list[str], methods: list[str], seeds: list[int], args: argparse.Namespace) -> list[dict]:
    """Every method on the same 50 PCs of each real set; NeuralEE, openTSNE and UMAP once per seed, tl.ee once.

    This process imports neither torch nor scanpy: a child's peak RSS on Linux starts from its parent's at the fork,
    so the data are prepared and the EE objectives evaluated in children too.
    """
    from _metrics import embedding_metrics

    results: list[dict] = []
    print("\n| data | method | runs | time (s) | × tl.ee | peak RSS (GB) | 10-NN pres. | 10-NN acc. (worst) | "
          "centroid ρ (worst) | EE objective vs tl.ee |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            r = run("prepare", folder, args.threads, {"name": name}, args.timeout, None)
            if "error" in r:
                print(f"| {name} | prepare | {r['error']} | | | | | | | |")
                continue
            X, labels = np.load(folder / "X.npy"), np.load(folder / "labels.npy", allow_pickle=True)
            rows: dict[str, list[dict]] = {}
            for m in methods:
                for seed in [None] if m in ("ee", "original") else seeds:
                    opts: dict = {} if seed is None else {"random_state": seed}
                    if m == "original":
                        opts = {"maxit": args.original_maxit}
                    if m == "umap":
                        opts = {}  # UMAP with a random_state runs single-threaded; its seed is left free
                    r = run(m, folder, args.threads, opts, args.timeout, args.original_python)
                    if "error" not in r:
                        saved = f"Y_{m}_{seed}.npy"
                        (folder / f"Y_{m}.npy").rename(folder / saved)
                        r.update(embedding_metrics(X, np.load(folder / saved), labels), saved=saved)
                    r = {"data": name, "method": m, "seed": seed, **r}
                    rows.setdefault(m, []).append(r)
                    results.append(r)
            ee_family = [r for m in ("scembed", "ee", "original") for r in rows.get(m, []) if "error" not in r]
            values = run("objective", folder, args.threads, {"files": [r["saved"] for r in ee_family]}, args.timeout,
                         None)  # fmt: skip
            for r in ee_family:
                r["objective"] = values.get(r["saved"])
            ee_rows = [r for r in rows.get("ee", []) if "error" not in r]
            ref = ee_rows[0] if ee_rows else None
            for m, rs in rows.items():
                ok = [r for r in rs if "error" not in r]
                if not ok:
                    print(f"| {name} | {m} | {len(rs)} | {rs[0]['error']} | | | | | | |")
                    continue

                def mean(key: str, ok: list[dict] = ok) -> float:
                    return float(np.mean([r[key] for r in ok]))

                def worst(key: str, ok: list[dict] = ok) -> float:
                    return float(np.min([r[key] for r in ok]))

                ratio = f"{mean('time') / ref['time']:.1f}×" if ref else ""
                label = m + (f" ({int(mean('epochs'))} ep)" if "epochs" in ok[0] else "")
                obj = ""
                if ref and ref.get("objective") and ok[0].get("objective"):
                    excess = [100 * (r["objective"] / ref["objective"] - 1) for r in ok]
                    obj = f"{min(excess):+.1f} to {max(excess):+.1f} %"
                print(
                    f"| {name} | {label} | {len(ok)} | {mean('time'):.1f} | {ratio} | {mean('rss_gb'):.2f} | "
                    f"{mean('knn_pres'):.3f} | {mean('knn_acc'):.3f} ({worst('knn_acc'):.3f}) | "
                    f"{mean('centroid_rho'):.3f} ({worst('centroid_rho'):.3f}) | {obj} |",
                    flush=True,
                )
    print("\nMeans over the runs; (worst): the lowest run. tl.ee is deterministic (one run); UMAP's seed is left free "
          "so that it runs multi-threaded. Time includes the affinities of NeuralEE and tl.ee.")  # fmt: skip
    return results


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--datasets", nargs="*", default=None, help=f"subset of {REAL}")
    p.add_argument("--skip-original", action="store_true")
    p.add_argument(
        "--original-python", default=os.environ.get("NEURALEE_PY"), help="an interpreter that can import neuralee 0.1.6"
    )
    p.add_argument("--original-maxit", type=int, default=500, help="the original's maxit (epochs, full batch)")
    p.add_argument("--scale", type=int, nargs="*", default=None)
    p.add_argument(
        "--scale-max-epochs", "--scale-maxit", type=int, default=None, dest="scale_max_epochs",
        help="max_epochs of the scale runs (default: tl.neuralee's)",
    )  # fmt: skip
    p.add_argument(
        "--scale-batch-size", type=int, default=None, help="batch_size of the scale runs (default: tl.neuralee's)"
    )
    p.add_argument(
        "--scale-refine", type=int, default=None, help="refine_max_epochs on all cells (default: tl.neuralee's)"
    )
    p.add_argument(
        "--opentsne-max", type=int, default=300_000, help="run openTSNE beside scembed up to this many cells"
    )
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--json", type=Path, default=None, help="also write the raw rows here (benchmarks/summary.py)")
    p.add_argument(
        "--opentsne-recipe",
        action="store_true",
        help="also run openTSNE's large-data recipe (sample, place, optimise all) at every --scale size",
    )
    p.add_argument(
        "--epoch-cost", type=int, nargs="*", help="seconds per epoch, full batch vs batches of 1,024, at these sizes"
    )
    p.add_argument(
        "--neuralee-options",
        default="{}",
        help="--vs-ee: tl.neuralee options other than the defaults, as JSON (e.g. '{\"batch_size\": 1024}')",
    )
    p.add_argument("--vs-ee", action="store_true", help="tl.neuralee at its defaults against tl.ee (only this)")
    p.add_argument(
        "--seeds", type=int, nargs="*", default=[0, 1, 2], help="seeds of tl.neuralee (and openTSNE on the real sets)"
    )
    p.add_argument("--no-simulated", action="store_true", help="--vs-ee: real sets only")
    p.add_argument("--profile", type=int, default=None, metavar="N", help="where the time goes at N cells (only this)")
    args = p.parse_args()
    if args.profile:
        profile(args.profile, args.threads)
        return
    if args.epoch_cost:
        epoch_cost(args.epoch_cost, args.threads)
        return
    if args.vs_ee:
        names = args.datasets or (VS_EE_REAL + ([] if args.no_simulated else VS_EE_SIMULATED))
        vs_ee(names, args.seeds, args.threads, args.json, json.loads(args.neuralee_options))
        return
    results: list[dict] = []
    sys.path.insert(0, str(HERE))
    from _metrics import embedding_metrics

    print(f"threads={args.threads}, load average at start {os.getloadavg()}")
    if not args.skip_real:
        names = args.datasets or (REAL[:1] if args.quick else REAL)
        seeds = args.seeds[:1] if args.quick else args.seeds
        methods = ["scembed", "ee", "original", "opentsne", "umap"]
        if args.skip_original or not args.original_python:
            methods.remove("original")
        results += real_sets(names, methods, seeds, args)
    scale = args.scale if args.scale is not None else ([100_000] if args.quick else [100_000, 300_000, 1_300_000])
    if scale:
        import scembed as se

        print("\n| cells | method | epochs | time (s) | × openTSNE | peak RSS (GB) | 10-NN acc. (20k) | centroid ρ |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        phases = []
        for n in scale:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                a = se.datasets.simulate_embedding(n, 50, random_state=0)
                np.save(folder / "X.npy", a.X)
                labels = a.obs["celltype"].astype(str).to_numpy()
                del a
                given = {
                    "batch_size": args.scale_batch_size,
                    "max_epochs": args.scale_max_epochs,
                    "refine_max_epochs": args.scale_refine,
                }
                opts = {k: v for k, v in given.items() if v is not None}
                methods = [("scembed", opts)]
                if n <= args.opentsne_max:
                    methods.append(("opentsne", {}))
                if args.opentsne_recipe:
                    methods.append(("opentsne_recipe", {}))
                rows = {}
                for m, o in methods:
                    r = run(m, folder, args.threads, o, args.timeout, args.original_python)
                    if "error" not in r:
                        X, Y = np.load(folder / "X.npy"), np.load(folder / f"Y_{m}.npy")
                        sub = np.random.default_rng(0).choice(n, min(n, 20_000), replace=False)
                        r.update(embedding_metrics(X[sub], Y[sub], labels[sub]))
                    rows[m] = r
                    results.append({"data": f"simulated {n}", "method": m, "options": o, **r})
                t_ref = rows.get("opentsne", rows.get("opentsne_recipe", {})).get("time")
                for m, r in rows.items():
                    if "error" in r:
                        print(f"| {n} | {m} | | {r['error']} | | | | |")
                        continue
                    ratio = f"{r['time'] / t_ref:.2f}×" if t_ref else "–"
                    print(
                        f"| {n} | {m} | {r.get('epochs', '–')} | {r['time']:.1f} | {ratio} | {r['rss_gb']:.2f} | "
                        f"{r['knn_acc']:.3f} | {r['centroid_rho']:.3f} |",
                        flush=True,
                    )
                    if "seconds" in r:
                        parts = ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items())
                        phases.append(f"  {n} {m}: {parts} s")
        if phases:
            print("\nparts of each run (scembed: uns['neuralee']['seconds']; the time column adds start and loading):")
            print("\n".join(phases))
    print(f"\nload average at end {os.getloadavg()}")
    write_json(args.json, results, script="neuralee", threads=args.threads, load_average_end=os.getloadavg())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5]))
    else:
        main()
