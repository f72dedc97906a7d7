"""NeuralEE benchmark: scembed's tl.neuralee against the original neuralee 0.1.6, openTSNE and UMAP.

Every method runs in its own subprocess (peak RSS = that process's ru_maxrss), on the same 50 PCs of
log-normalised counts, with the same number of threads. Then a scale run on simulated 50-D data.

    python benchmarks/neuralee.py                 # 3 real data sets + 100k/300k/1.3M scale
    python benchmarks/neuralee.py --quick         # pbmc_10x_4k only, scale 100k
    python benchmarks/neuralee.py --scale 1300000 --scale-maxit 20 --skip-real

The original runs from a venv (`python -m venv --system-site-packages /work/venvs/neuralee_nn &&
/work/venvs/neuralee_nn/bin/pip install --no-deps neuralee==0.1.6`), monkeypatched here for today's torch/numpy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"
ORIGINAL_PY = os.environ.get("NEURALEE_PY", "/work/venvs/neuralee_nn/bin/python")
REAL = ["pbmc_10x_4k", "worm_neuron_4k", "cite_pbmc_3762"]


def prepare(name: str, out: Path) -> None:
    import anndata as ad
    import scanpy as sc

    a = ad.read_h5ad(DATA / f"{name}.h5ad")
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.pca(a, n_comps=50, random_state=0)
    np.save(out / "X.npy", a.obsm["X_pca"].astype(np.float32))
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
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
    print(json.dumps({"time": elapsed, "rss_gb": rss, **info}))


def run_original(X: np.ndarray, maxit: int = 500, N_small: float = 1.0) -> np.ndarray:
    """neuralee 0.1.6 with the three fixes it needs today (see ALGORITHMS.md §3)."""
    # this script is called neuralee.py too: keep its folder off the path so `import neuralee` finds the package
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    import types

    sys.modules.setdefault("loompy", types.ModuleType("loompy"))  # only its .loom readers need it; not used here
    import numpy as np
    import torch

    np.str = str  # removed from numpy; the original builds its gene-name arrays with it
    torch.cholesky = lambda A, upper=False: torch.linalg.cholesky(A, upper=upper)

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


def run(method: str, folder: Path, threads: int, opts: dict, timeout: int) -> dict:
    py = ORIGINAL_PY if method == "original" else sys.executable
    cmd = [py, __file__, "--worker", method, str(folder), str(threads), json.dumps(opts)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout}s"}
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"rc {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--datasets", nargs="*", default=None, help=f"subset of {REAL}")
    p.add_argument("--skip-original", action="store_true")
    p.add_argument("--original-maxit", type=int, default=500)
    p.add_argument("--scale", type=int, nargs="*", default=None)
    p.add_argument("--scale-maxit", type=int, default=50)
    p.add_argument("--scale-refine", type=int, default=10, help="refine_epochs on all cells in the scale runs")
    p.add_argument("--timeout", type=int, default=3600)
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    from _metrics import embedding_metrics

    print(f"threads={args.threads}, load average at start {os.getloadavg()}")
    if not args.skip_real:
        names = args.datasets or (REAL[:1] if args.quick else REAL)
        methods = ["scembed", "scembed_full", "original", "opentsne", "umap"]
        if args.skip_original:
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
                        worker_name, opts = "scembed", {"N_small": 1.0, "maxit": 500}
                    if m == "original":
                        opts = {"maxit": args.original_maxit}
                    r = run(worker_name, folder, args.threads, opts, args.timeout)
                    if "error" not in r:
                        Y = np.load(folder / f"Y_{worker_name}.npy")
                        r.update(embedding_metrics(X, Y, labels))
                    rows[m] = r
                t_ref = rows.get("opentsne", {}).get("time")
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
                opts = {"N_small": 5000, "maxit": args.scale_maxit, "refine_epochs": args.scale_refine}
                methods = [("scembed", opts)]
                if n <= 100_000:
                    methods.append(("opentsne", {}))
                for m, opts in methods:
                    r = run(m, folder, args.threads, opts, args.timeout)
                    if "error" in r:
                        print(f"| {n} | {m} | {r['error']} | | | |")
                        continue
                    X, Y = np.load(folder / "X.npy"), np.load(folder / f"Y_{m}.npy")
                    sub = np.random.default_rng(0).choice(n, min(n, 20_000), replace=False)
                    met = embedding_metrics(X[sub], Y[sub], labels[sub])
                    print(
                        f"| {n} | {m} | {r['time']:.1f} | {r['rss_gb']:.2f} | {met['knn_acc']:.3f} | "
                        f"{met['centroid_rho']:.3f} |",
                        flush=True,
                    )
    print(f"\nload average at end {os.getloadavg()}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5]))
    else:
        main()
