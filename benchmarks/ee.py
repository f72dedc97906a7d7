"""Benchmark tl.ee against the original NeuralEE EE (neuralee 0.1.6) and openTSNE, side by side.

Every method runs in a fresh subprocess (peak RSS = that process's ru_maxrss) on the same 50-PC input. scembed and
the original get the SAME affinities P (scembed.pp.affinity, perplexity 30, stored dense into the original's
dataset) and the SAME repulsive weights (squared input distances normalised to sum 1 = repulsion="distance") and
λ = 1, so their objectives are directly comparable; both are evaluated with one EEObjective. openTSNE uses its own
affinities (perplexity 30) and optimises another objective: no EE objective is reported for it.

Usage:
    python benchmarks/ee.py --threads 2 --original-python ORIGINAL_PY [--quick] [--json results.json]
    python benchmarks/ee.py --attraction-compare --threads 1   # ms per attraction evaluation, edge sum vs now
ORIGINAL_PY is an interpreter that can import neuralee 0.1.6, e.g. a venv made with
``python -m venv --system-site-packages venv && venv/bin/pip install --no-deps neuralee==0.1.6``; without it the
original runs under this interpreter if it can import neuralee. --quick runs pbmc68k_reduced only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _runner import DATA, emit, lognorm_pca, patch_neuralee_for_today, run_child, script_command, write_json  # noqa: E402

METHODS = ("scembed_ee", "scembed_ee_uniform", "neuralee_EE", "openTSNE")


def prepare(name: str, out: Path) -> None:
    import anndata as ad
    import scanpy as sc

    import scembed as se

    if name == "pbmc68k_reduced":
        a = sc.datasets.pbmc68k_reduced()
        labels = a.obs["bulk_labels"].astype(str).to_numpy()
    else:
        a = ad.read_h5ad(DATA / f"{name}.h5ad")
        lognorm_pca(a, target_sum=None)
        labels = a.obs["celltype"].astype(str).to_numpy()
    X = np.ascontiguousarray(a.obsm["X_pca"][:, :50], dtype=np.float32)
    se.pp.affinity(a, perplexity=30.0, use_rep="X_pca")
    P = a.obsp["affinity"].tocoo()
    np.savez(out, X=X, labels=labels, row=P.row, col=P.col, data=P.data)


def worker(method: str, data: Path, out: Path, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    d = np.load(data, allow_pickle=True)
    X = d["X"]
    n = X.shape[0]
    from scipy import sparse

    P = sparse.csr_matrix((d["data"], (d["row"], d["col"])), shape=(n, n))
    info: dict = {}
    if method.startswith("scembed_ee"):
        import anndata as ad
        import scanpy  # noqa: F401  (imported by scembed's logger on first use: keep it out of the timing)

        import scembed as se

        a = ad.AnnData(np.zeros((n, 1), dtype=np.float32))
        a.obsm["X_pca"] = X
        a.obsp["affinity"] = P
        rep = "uniform" if method.endswith("uniform") else "distance"
        t = time.perf_counter()
        se.tl.ee(a, repulsion=rep, device="cpu")
        elapsed = time.perf_counter() - t
        Y = a.obsm["X_ee"]
        info = {"n_iter": a.uns["ee"]["n_iter"], "stop": a.uns["ee"]["stop_reason"]}
    elif method == "neuralee_EE":
        patch_neuralee_for_today()
        from neuralee.dataset import GeneExpressionDataset
        from neuralee.embedding import NeuralEE

        ds = GeneExpressionDataset(X)
        ds.Wp = P.toarray().astype(np.float32)  # the same affinities as scembed
        sq = (X.astype(np.float64) ** 2).sum(1)
        Wn = np.maximum(sq[:, None] + sq[None] - 2 * X.astype(np.float64) @ X.T.astype(np.float64), 0)
        np.fill_diagonal(Wn, 0)
        ds.Wn = (Wn / Wn.sum()).astype(np.float32)  # the original's normalisation of its dense distances
        del Wn
        model = NeuralEE(ds, d=2, lam=1, device=torch.device("cpu"))
        t = time.perf_counter()
        torch.manual_seed(0)
        res = model.EE(maxit=200, tol=1e-5)
        elapsed = time.perf_counter() - t
        Y = res["X"].numpy()
    elif method == "openTSNE":
        from openTSNE import TSNE

        t = time.perf_counter()
        Y = np.asarray(TSNE(n_jobs=threads, random_state=0).fit(X))
        elapsed = time.perf_counter() - t
    else:
        raise ValueError(method)
    np.save(out, np.asarray(Y, dtype=np.float32))
    emit({"time": elapsed, **info})


def evaluate(data: Path, Y: np.ndarray) -> dict:
    import torch
    from scipy import sparse

    sys.path.insert(0, str(HERE))
    from _metrics import embedding_metrics

    from scembed._engine.ee_objective import EEObjective

    d = np.load(data, allow_pickle=True)
    X, labels = d["X"], d["labels"]
    n = X.shape[0]
    P = sparse.csr_matrix((d["data"], (d["row"], d["col"])), shape=(n, n))
    E = EEObjective(P, lam=1.0, repulsion="distance", X=X).value(torch.as_tensor(Y))
    return {"E": E, **embedding_metrics(X, Y, labels)}


def attraction_compare(names: list[str], threads: int, repeats: int = 50) -> None:
    """ms per evaluation of the attraction: the float32 edge sum (before) vs ``EEObjective.attractive``.

    The edge sum is the former formulation, written here: Σ over the upper-triangle pairs of (W + Wᵀ) of w‖y_n − y_m‖²,
    in float32 with a float64 total (the gradient then needed the sparse product as well, not timed here).
    """
    import torch
    from scipy import sparse

    from scembed._engine.ee_objective import EEObjective

    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="ee_att_"))
    for name in names:
        prepare(name, tmp / f"{name}.npz")
        d = np.load(tmp / f"{name}.npz", allow_pickle=True)
        n = d["X"].shape[0]
        P = sparse.csr_matrix((d["data"], (d["row"], d["col"])), shape=(n, n))
        obj = EEObjective(P, repulsion="uniform")
        upper = sparse.triu(P + P.T, k=1).tocoo()
        ru, cu = torch.as_tensor(upper.row, dtype=torch.int64), torch.as_tensor(upper.col, dtype=torch.int64)
        wu = torch.as_tensor(upper.data, dtype=torch.float32)

        def edge_sum(Y, ru=ru, cu=cu, wu=wu):
            diff = Y[ru] - Y[cu]
            return (wu * (diff * diff).sum(1)).sum(dtype=torch.float64)

        Y = torch.as_tensor(np.random.default_rng(0).normal(size=(n, 2)) * 5, dtype=torch.float32)
        ms = {}
        for label, fn in [("edge sum (value only)", edge_sum), ("attractive (value + gradient)", obj.attractive)]:
            fn(Y)
            t = time.perf_counter()
            for _ in range(repeats):
                fn(Y)
            ms[label] = (time.perf_counter() - t) / repeats * 1e3
        print(f"{name} ({n} cells, {upper.nnz} pairs): " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", nargs=3)
    ap.add_argument("--original-python", default=None, help="an interpreter that can import neuralee 0.1.6")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw rows here (benchmarks/summary.py)")
    ap.add_argument("--attraction-compare", action="store_true", help="ms per attraction evaluation, old vs new")
    args = ap.parse_args()
    names = ["pbmc68k_reduced"] if args.quick else ["pbmc68k_reduced", "pbmc_10x_4k", "worm_neuron_4k"]
    if args.attraction_compare:
        attraction_compare(names, args.threads)
        return
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), Path(args.worker[2]), args.threads)
        return
    tmp = Path(tempfile.mkdtemp(prefix="ee_bench_"))
    rows = []
    for name in names:
        data = tmp / f"{name}.npz"
        prepare(name, data)
        for method in METHODS:
            out = tmp / f"{name}_{method}.npy"
            python = args.original_python if method == "neuralee_EE" else None
            cmd = script_command(__file__, "--threads", args.threads, "--worker", method, data, out, python=python)
            r = run_child(cmd, args.threads)
            if not r["ok"]:
                print(f"{name} {method} failed:\n{r['error']}", flush=True)
                continue
            res = {**r["result"], "peak_gb": r["peak_rss_mib"] / 1024}
            res.update(evaluate(data, np.load(out)), data=name, method=method)
            if method == "openTSNE":
                res["E"] = float("nan")  # another objective: the EE objective of a t-SNE map says nothing
            rows.append(res)
            print(json.dumps(res), flush=True)
    write_json(args.json, rows, script="ee", threads=args.threads)
    header = "| data | method | EE objective | time (s) | peak RSS (GB) | 10-NN pres. | 10-NN acc. | centroid ρ |"
    print("\n" + header + "\n|" + " --- |" * 8)
    for r in rows:
        E = "—" if np.isnan(r["E"]) else f"{r['E']:.5f}"
        print(
            f"| {r['data']} | {r['method']} | {E} | {r['time']:.1f} | {r['peak_gb']:.2f} | {r['knn_pres']:.3f} | "
            f"{r['knn_acc']:.3f} | {r['centroid_rho']:.3f} |"
        )
    print("\nratios (neuralee_EE / scembed_ee): time, objective difference; scembed_ee − openTSNE: acc, ρ")
    for name in names:
        by = {r["method"]: r for r in rows if r["data"] == name}
        if "scembed_ee" in by and "neuralee_EE" in by:
            s, o = by["scembed_ee"], by["neuralee_EE"]
            print(f"{name}: time ×{o['time'] / s['time']:.1f}, ΔE (original − scembed) = {o['E'] - s['E']:+.5f}")
        if "scembed_ee" in by and "openTSNE" in by:
            s, t = by["scembed_ee"], by["openTSNE"]
            print(
                f"{name}: Δacc = {s['knn_acc'] - t['knn_acc']:+.3f}, Δρ = {s['centroid_rho'] - t['centroid_rho']:+.3f}"
            )


if __name__ == "__main__":
    main()
