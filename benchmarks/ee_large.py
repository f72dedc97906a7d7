"""Large-N check of tl.ee on the CPU: exact EE on N simulated cells (50 dims) with tiled repulsion.

Usage: python benchmarks/ee_large.py [N] [maxiter] [threads] [repulsion] [data] [tol]
``data`` is ``embedding`` (default: well-separated Gaussian clusters, ``simulate_embedding``) or ``counts``
(negative-binomial UMI counts of 10 cell types from ``se.datasets.simulate``, 2,000 genes, log-normalised, 50 PCs:
overlapping types, closer to real data). ``tol`` defaults to 0 (run ``maxiter`` iterations unless the line search
stops first); pass ``1e-5`` for the default stopping rule of ``tl.ee``.
Prints the affinity time, the EE time per iteration and in total, the peak resident memory of the whole run (data
simulation and preprocessing included; it runs in a fresh subprocess through ``_runner``), and the 10-NN accuracy
of the simulated cell types in the embedding (3-fold, on 10,000 random cells).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import emit, run_child, script_command


def parse(argv: list[str]) -> tuple[int, int, int, str, str, float]:
    n = int(argv[0]) if len(argv) > 0 else 60_000
    maxiter = int(argv[1]) if len(argv) > 1 else 20
    threads = int(argv[2]) if len(argv) > 2 else 1
    repulsion = argv[3] if len(argv) > 3 else "uniform"
    data = argv[4] if len(argv) > 4 else "embedding"
    tol = float(argv[5]) if len(argv) > 5 else 0.0
    return n, maxiter, threads, repulsion, data, tol


def child(argv: list[str]) -> dict:
    import numpy as np
    import scanpy as sc
    import torch
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    import scembed as se

    n, maxiter, threads, repulsion, data, tol = parse(argv)
    torch.set_num_threads(threads)
    if data == "counts":
        adata = se.datasets.simulate(n, 2000, n_celltypes=10, random_state=0)
        sc.pp.normalize_total(adata)
        sc.pp.log1p(adata)
        sc.pp.pca(adata, n_comps=50)
    else:
        adata = se.datasets.simulate_embedding(n_cells=n, random_state=0)
    t = time.perf_counter()
    se.pp.affinity(adata, method="exact", n_jobs=threads)
    t_aff = time.perf_counter() - t
    t = time.perf_counter()
    se.tl.ee(adata, repulsion=repulsion, maxiter=maxiter, tol=tol)
    t_ee = time.perf_counter() - t
    info = adata.uns["ee"]
    cells = np.random.default_rng(0).choice(n, min(n, 10_000), replace=False)
    labels = adata.obs["celltype"].to_numpy()[cells]
    acc = cross_val_score(KNeighborsClassifier(10), adata.obsm["X_ee"][cells], labels, cv=3).mean()
    summary = (
        f"N={n} data={data} device={info['params']['device']} threads={threads} repulsion={repulsion} "
        f"solver={info['solver']} "
        f"affinity {t_aff:.1f} s | EE {t_ee:.1f} s for {info['n_iter']} iterations "
        f"({info['n_evaluations']} objective evaluations, {t_ee / max(info['n_iter'], 1):.1f} s/iteration) | "
        f"objective {info['objective'][0]:.4f} -> {info['objective'][-1]:.4f} | "
        f"stop: {info['stop_reason']} | steps {[float(f'{s:.3g}') for s in info['step']]} | 10-NN acc {acc:.3f}"
    )
    return {"summary": summary, "affinity_s": t_aff, "ee_s": t_ee, "n_iter": int(info["n_iter"]), "knn_acc": acc}


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        emit(child(sys.argv[2:]))
        return
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
        return
    threads = parse(sys.argv[1:])[2]
    r = run_child(script_command(__file__, "--child", *sys.argv[1:]), threads)
    if not r["ok"]:
        raise SystemExit(r["error"])
    print(f"{r['result']['summary']} | peak RSS {r['peak_rss_mib'] / 1024:.2f} GB")


if __name__ == "__main__":
    main()
