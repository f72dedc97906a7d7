"""Entropic affinities: scembed ``pp.affinity`` vs openTSNE ``PerplexityBasedNN`` on the same representations.

Every method runs in a fresh subprocess (peak RSS of that process; the input is loaded from a .npy in the child so
both sides pay the same) with the same number of threads. Agreement of P:
- ``ref``: max |P − P_ref| / max P_ref against a float64 brute-force reference (small data only);
- ``TV vs exact``: total-variation distance ½‖P − P_exact‖₁ against scembed's exact P (both sum to 1);
- ``recall``: share of the exact k nearest neighbours found.

Usage::

    python benchmarks/affinity.py                 # pbmc_10x_4k (50 PCs) + simulated 100k x 50
    python benchmarks/affinity.py --large         # + simulated 1.3M x 50
    python benchmarks/affinity.py --quick         # pbmc_10x_4k + simulated 20k only
    python benchmarks/affinity.py --device cuda --sizes 1300000 --no-peers   # GPU scale timing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import DATA, emit, lognorm_pca, run_child, script_command, write_json

PERPLEXITY = 30.0


# ----------------------------------------------------------------------------------------------------- children
def _child(spec: dict) -> dict:
    """Run one method on ``spec['X']`` (a .npy path) and report its time (peak RSS: measured by the runner)."""
    import torch

    torch.set_num_threads(spec["threads"])
    X = np.load(spec["X"])
    start = time.perf_counter()
    if spec["tool"] == "scembed":
        from anndata import AnnData

        import scembed as se

        adata = AnnData(obsm={"X_pca": X})
        se.pp.affinity(
            adata,
            perplexity=PERPLEXITY,
            knn_method=spec["method"],
            n_jobs=spec["threads"],
            device=spec["device"],
            random_state=0,
        )
        if spec["device"].startswith("cuda"):
            torch.cuda.synchronize()
        P = adata.obsp["affinity"]
    else:
        from openTSNE.affinity import PerplexityBasedNN

        aff = PerplexityBasedNN(
            X, perplexity=PERPLEXITY, method=spec["method"], n_jobs=spec["threads"], random_state=0, verbose=False
        )
        P = aff.P
    elapsed = time.perf_counter() - start
    out = {"time": elapsed}
    if spec.get("save"):
        from scipy import sparse

        sparse.save_npz(spec["save"], P.tocsr())
    return out


def run_method(spec: dict) -> dict:
    r = run_child(script_command(__file__, "--child", json.dumps(spec)), spec["threads"])
    if not r["ok"]:
        return {"error": r["error"].splitlines()[-1]}
    return {**r["result"], "rss_gb": r["peak_rss_mib"] / 1024}


# ------------------------------------------------------------------------------------------------------- data
def load_pbmc4k() -> np.ndarray | None:
    path = DATA / "pbmc_10x_4k.h5ad"
    if not path.exists():
        return None
    import anndata as ad

    return lognorm_pca(ad.read_h5ad(path))


def simulated(n: int) -> np.ndarray:
    import scembed as se

    return se.datasets.simulate_embedding(n_cells=n, n_dims=50, random_state=0).obsm["X_pca"]


# ---------------------------------------------------------------------------------------------------- quality
def reference_P(X: np.ndarray, k: int) -> np.ndarray:
    """Dense float64 brute force: all distances, per-row bisection on β over the k nearest, symmetrised."""
    X = X.astype(np.float64)
    n = X.shape[0]
    sq = (X * X).sum(1)
    D2 = np.maximum(sq[:, None] + sq[None, :] - 2 * X @ X.T, 0)
    np.fill_diagonal(D2, np.inf)
    nn = np.argpartition(D2, k, axis=1)[:, :k]
    d = np.take_along_axis(D2, nn, 1)
    d -= d.min(1, keepdims=True)
    lo, hi = np.zeros(n), np.full(n, np.inf)
    beta = np.ones(n)
    for _ in range(100):
        w = np.exp(-beta[:, None] * d)
        p = w / w.sum(1, keepdims=True)
        h = -(p * np.log(np.where(p > 0, p, 1))).sum(1)
        high = h > np.log(PERPLEXITY)
        lo = np.where(high, beta, lo)
        hi = np.where(high, hi, beta)
        beta = np.where(np.isinf(hi), beta * 2, (lo + hi) / 2)
    P = np.zeros((n, n))
    np.put_along_axis(P, nn, p, 1)
    return (P + P.T) / (2 * n)


def neighbour_sets(P) -> list[np.ndarray]:
    return [P.indices[P.indptr[i] : P.indptr[i + 1]] for i in range(P.shape[0])]


# -------------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--large", action="store_true", help="add simulated 1.3M x 50")
    parser.add_argument("--sizes", type=int, nargs="*", help="simulated sizes (overrides the defaults)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw rows here (benchmarks/summary.py)")
    args = parser.parse_args()
    if args.child:
        emit(_child(json.loads(args.child)))
        return

    from scipy import sparse

    sizes = args.sizes if args.sizes is not None else ([20_000] if args.quick else [100_000])
    if args.large:
        sizes = [*sizes, 1_300_000]
    sets: list[tuple[str, np.ndarray]] = []
    if args.sizes is None:
        pbmc = load_pbmc4k()
        if pbmc is not None:
            sets.append(("pbmc_10x_4k (50 PCs)", pbmc))
    sets += [(f"simulated {n:,} x 50", simulated(n)) for n in sizes]

    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads={args.threads}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, X in sets:
            n = X.shape[0]
            xpath = os.path.join(tmp, "X.npy")
            np.save(xpath, X)
            runs = []
            exact_ok = n <= 200_000 or args.device.startswith("cuda")
            if exact_ok:
                runs.append(("scembed", "exact"))
            if not args.device.startswith("cuda"):
                runs.append(("scembed", "annoy"))
            if not args.no_peers:
                runs.append(("openTSNE", "annoy"))
            results = {}
            for tool, method in runs:
                save = os.path.join(tmp, f"{tool}_{method}.npz") if n <= 200_000 else None
                device = args.device if tool == "scembed" else "cpu"
                spec = {"tool": tool, "method": method, "X": xpath, "threads": args.threads, "device": device}
                res = run_method({**spec, "save": save})
                if save and "error" not in res:
                    res["P"] = sparse.load_npz(save)
                results[(tool, method)] = res
                print(f"  {name}: {tool} {method}: {res.get('time', res.get('error'))}", flush=True)
            exact = results.get(("scembed", "exact"), {}).get("P")
            ref = reference_P(X, int(3 * PERPLEXITY)) if n <= 5000 else None
            base = results.get(("openTSNE", "annoy"), {}).get("time")
            for (tool, method), res in results.items():
                row = {"data": name, "tool": tool, "method": method}
                if "error" in res:
                    row["error"] = res["error"]
                    rows.append(row)
                    continue
                row.update(time=res["time"], rss=res["rss_gb"])
                row["ratio"] = res["time"] / base if base else float("nan")
                P = res.get("P")
                if P is not None and ref is not None:
                    row["ref"] = float(np.abs(P.toarray() - ref).max() / ref.max())
                if P is not None and exact is not None:
                    row["tv"] = float(abs(P - exact).sum() / 2)
                    hits = [
                        len(np.intersect1d(a, b)) / max(len(b), 1)
                        for a, b in zip(neighbour_sets(P), neighbour_sets(exact))
                    ]
                    row["recall"] = float(np.mean(hits))
                rows.append(row)

    write_json(args.json, rows, script="affinity", threads=args.threads, device=args.device)
    header = (
        "| data | tool | kNN | time (s) | × openTSNE | peak RSS (GB) | max rel. diff vs float64 ref | TV vs exact "
        "| neighbour overlap vs exact |"
    )
    print("\n" + header)
    print("|" + "---|" * 9)
    fmt = lambda v, f: "–" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, f)  # noqa: E731
    for r in rows:
        if "error" in r:
            print(f"| {r['data']} | {r['tool']} | {r['method']} | failed: {r['error']} | | | | | |")
            continue
        print(
            f"| {r['data']} | {r['tool']} | {r['method']} | {r['time']:.2f} | {fmt(r.get('ratio'), '.2f')} | "
            f"{r['rss']:.2f} | {fmt(r.get('ref'), '.1e')} | {fmt(r.get('tv'), '.4f')} | {fmt(r.get('recall'), '.3f')} |"
        )


if __name__ == "__main__":
    main()
