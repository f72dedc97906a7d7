"""NeuralEE benchmark: scembed's tl.neuralee against the original neuralee 0.1.6, openTSNE and UMAP.

Every method runs in its own subprocess (peak RSS = that process's ru_maxrss), on the same 50 PCs of
log-normalised counts, with the same number of threads. Then a scale run on simulated 50-D data.

    python benchmarks/neuralee.py --original-python ORIGINAL_PY   # 3 real sets + 100k/300k/1.3M scale
    python benchmarks/neuralee.py --quick         # pbmc_10x_4k only, scale 100k
    python benchmarks/neuralee.py --scale 1300000 --scale-max-epochs 20 --skip-real
    python benchmarks/neuralee.py --vs-ee --seeds 0 1 2   # tl.neuralee at its defaults against tl.ee, same cells

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

REAL = ["pbmc_10x_4k", "worm_neuron_4k", "cite_pbmc_3762"]
VS_EE_REAL = ["pbmc_10x_4k", "worm_neuron_4k", "cite_pbmc_3762", "pbmc_10x_2100", "worm_neuron_2100"]
VS_EE_SIMULATED = ["simulate:0", "simulate:1", "simulate_embedding:0", "simulate_embedding:1"]


def prepare(name: str, out: Path) -> None:
    import anndata as ad

    a = ad.read_h5ad(DATA / f"{name}.h5ad")
    np.save(out / "X.npy", lognorm_pca(a))
    np.save(out / "labels.npy", a.obs["celltype"].astype(str).to_numpy())


# ------------------------------------------------------------------------------------------------ workers
def worker(method: str, folder: Path, threads: int, opts: dict) -> None:
    import torch

    torch.set_num_threads(threads)
    X = np.load(folder / "X.npy")
    t0 = time.perf_counter()
    info: dict = {}
    if method == "scembed":
        import anndata as ad

        import scembed as se

        a = ad.AnnData(X=X)
        a.obsm["X_pca"] = X
        se.tl.neuralee(a, n_jobs=threads, **opts)
        Y = a.obsm["X_neuralee"]
        info = {"epochs": a.uns["neuralee"]["n_epochs"], "mode": a.uns["neuralee"]["mode"]}
    elif method == "original":
        Y = run_original(X, **opts)
    elif method == "opentsne":
        import openTSNE

        Y = np.asarray(openTSNE.TSNE(n_jobs=threads, random_state=0).fit(X))
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


def vs_ee(names: list[str], seeds: list[int], threads: int, json_path: Path | None) -> None:
    """tl.neuralee at its defaults against tl.ee on the same cells and affinities (see the module docstring)."""
    import anndata as ad
    import torch
    from _metrics import centroid_spearman, knn_accuracy

    import scembed as se
    from scembed._engine.ee_objective import EEObjective

    torch.set_num_threads(threads)
    rows = []
    print("\n| data | seed | 10-NN acc. NeuralEE / EE (diff) | centroid ρ NeuralEE / EE (diff) | "
          "EE objective NeuralEE / EE (diff) | time NeuralEE / EE (s) | epochs |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        X, labels = vs_ee_data(name)
        a = ad.AnnData(X=X)
        a.obsm["X_pca"] = X
        se.pp.affinity(a, perplexity=30, n_jobs=threads, random_state=0)
        t0 = time.perf_counter()
        se.tl.ee(a, show_progress=False)
        t_ee = time.perf_counter() - t0
        Y_ee = a.obsm["X_ee"]
        obj = EEObjective(a.obsp["affinity"], repulsion=a.uns["ee"]["params"]["repulsion"], X=X)
        e_ee = obj.value(torch.as_tensor(Y_ee))
        acc_ee, rho_ee = knn_accuracy(Y_ee, labels), centroid_spearman(X, Y_ee, labels)
        for seed in seeds:
            t0 = time.perf_counter()
            se.tl.neuralee(a, n_jobs=threads, random_state=seed, show_progress=False)
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
            }
            rows.append(r)
            print(
                f"| {name} | {seed} | {r['knn_acc']:.3f} / {acc_ee:.3f} ({r['knn_acc'] - acc_ee:+.3f}) | "
                f"{r['centroid_rho']:.3f} / {rho_ee:.3f} ({r['centroid_rho'] - rho_ee:+.3f}) | "
                f"{e:.4f} / {e_ee:.4f} ({100 * (e / e_ee - 1):+.1f} %) | {t_nee:.1f} / {t_ee:.1f} | {r['epochs']} |",
                flush=True,
            )
    write_json(json_path, rows, script="neuralee --vs-ee", threads=threads, load_average_end=os.getloadavg())


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
    p.add_argument("--scale-max-epochs", "--scale-maxit", type=int, default=50, dest="scale_max_epochs")
    p.add_argument("--scale-refine", type=int, default=10, help="refine_max_epochs on all cells in the scale runs")
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--json", type=Path, default=None, help="also write the raw rows here (benchmarks/summary.py)")
    p.add_argument("--vs-ee", action="store_true", help="tl.neuralee at its defaults against tl.ee (only this)")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="--vs-ee: seeds of tl.neuralee")
    p.add_argument("--no-simulated", action="store_true", help="--vs-ee: real sets only")
    args = p.parse_args()
    if args.vs_ee:
        names = args.datasets or (VS_EE_REAL + ([] if args.no_simulated else VS_EE_SIMULATED))
        vs_ee(names, args.seeds, args.threads, args.json)
        return
    results: list[dict] = []
    sys.path.insert(0, str(HERE))
    from _metrics import embedding_metrics

    print(f"threads={args.threads}, load average at start {os.getloadavg()}")
    if not args.skip_real:
        names = args.datasets or (REAL[:1] if args.quick else REAL)
        methods = ["scembed", "scembed_full", "original", "opentsne", "umap"]
        if args.skip_original or not args.original_python:
            methods.remove("original")
        print("\n| data | method | time (s) | peak RSS (GB) | kNN pres. | kNN acc. | centroid ρ | vs openTSNE |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for name in names:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                prepare(name, folder)
                X, labels = np.load(folder / "X.npy"), np.load(folder / "labels.npy", allow_pickle=True)
                rows = {}
                for m in methods:
                    opts = {}
                    worker_name = m
                    if m == "scembed_full":
                        worker_name, opts = "scembed", {"batch_size": 1.0, "max_epochs": 500}
                    if m == "original":
                        opts = {"maxit": args.original_maxit}
                    r = run(worker_name, folder, args.threads, opts, args.timeout, args.original_python)
                    if "error" not in r:
                        Y = np.load(folder / f"Y_{worker_name}.npy")
                        r.update(embedding_metrics(X, Y, labels))
                    rows[m] = r
                t_ref = rows.get("opentsne", {}).get("time")
                results += [{"data": name, "method": m, **r} for m, r in rows.items()]
                for m, r in rows.items():
                    if "error" in r:
                        print(f"| {name} | {m} | {r['error']} | | | | | |")
                        continue
                    ratio = f"{r['time'] / t_ref:.2f}×" if t_ref else ""
                    label = m + (f" ({r['epochs']} ep)" if "epochs" in r else "")
                    print(
                        f"| {name} | {label} | {r['time']:.1f} | {r['rss_gb']:.2f} | {r['knn_pres']:.3f} | "
                        f"{r['knn_acc']:.3f} | {r['centroid_rho']:.3f} | {ratio} |",
                        flush=True,
                    )
    scale = args.scale if args.scale is not None else ([100_000] if args.quick else [100_000, 300_000, 1_300_000])
    if scale:
        import scembed as se

        print("\n| cells | method | time (s) | peak RSS (GB) | 10-NN acc. (20k cells) | centroid ρ |")
        print("| --- | --- | --- | --- | --- | --- |")
        for n in scale:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                a = se.datasets.simulate_embedding(n, 50, random_state=0)
                np.save(folder / "X.npy", a.X)
                labels = a.obs["celltype"].astype(str).to_numpy()
                del a
                opts = {"batch_size": 5000, "max_epochs": args.scale_max_epochs, "refine_max_epochs": args.scale_refine}
                methods = [("scembed", opts)]
                if n <= 100_000:
                    methods.append(("opentsne", {}))
                for m, opts in methods:
                    r = run(m, folder, args.threads, opts, args.timeout, args.original_python)
                    if "error" in r:
                        print(f"| {n} | {m} | {r['error']} | | | |")
                        results.append({"data": f"simulated {n}", "method": m, **r})
                        continue
                    X, Y = np.load(folder / "X.npy"), np.load(folder / f"Y_{m}.npy")
                    sub = np.random.default_rng(0).choice(n, min(n, 20_000), replace=False)
                    met = embedding_metrics(X[sub], Y[sub], labels[sub])
                    results.append({"data": f"simulated {n}", "method": m, "options": opts, **r, **met})
                    print(
                        f"| {n} | {m} | {r['time']:.1f} | {r['rss_gb']:.2f} | {met['knn_acc']:.3f} | "
                        f"{met['centroid_rho']:.3f} |",
                        flush=True,
                    )
    print(f"\nload average at end {os.getloadavg()}")
    write_json(args.json, results, script="neuralee", threads=args.threads, load_average_end=os.getloadavg())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5]))
    else:
        main()
