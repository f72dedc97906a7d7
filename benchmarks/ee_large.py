"""Large-N check of tl.ee on the CPU: exact EE on N simulated cells (50 dims) with tiled repulsion.

Usage: python benchmarks/ee_large.py [N] [maxiter] [threads] [repulsion] [data] [tol]
``data`` is ``embedding`` (default: well-separated Gaussian clusters, ``simulate_embedding``) or ``counts``
(negative-binomial UMI counts of 10 cell types from ``se.datasets.simulate``, 2,000 genes, log-normalised, 50 PCs:
overlapping types, closer to real data). ``tol`` defaults to 0 (run ``maxiter`` iterations unless the line search
stops first); pass ``1e-5`` for the default stopping rule of ``tl.ee``.
Prints the affinity time, the EE time per iteration and in total, the peak resident memory, and the 10-NN
accuracy of the simulated cell types in the embedding (3-fold, on 10,000 random cells).
"""

from __future__ import annotations

import resource
import sys
import time

import numpy as np
import scanpy as sc
import torch
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

import scembed as se


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 60_000
    maxiter = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    repulsion = sys.argv[4] if len(sys.argv) > 4 else "uniform"
    data = sys.argv[5] if len(sys.argv) > 5 else "embedding"
    tol = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cells = np.random.default_rng(0).choice(n, min(n, 10_000), replace=False)
    labels = adata.obs["celltype"].to_numpy()[cells]
    acc = cross_val_score(KNeighborsClassifier(10), adata.obsm["X_ee"][cells], labels, cv=3).mean()
    print(
        f"N={n} data={data} device={info['params']['device']} threads={threads} repulsion={repulsion} "
        f"solver={info['solver']} "
        f"affinity {t_aff:.1f} s | EE {t_ee:.1f} s for {info['n_iter']} iterations "
        f"({info['n_evaluations']} objective evaluations, {t_ee / max(info['n_iter'], 1):.1f} s/iteration) | "
        f"objective {info['objective'][0]:.4f} -> {info['objective'][-1]:.4f} | peak RSS {peak:.2f} GB | "
        f"stop: {info['stop_reason']} | steps {[float(f'{s:.3g}') for s in info['step']]} | 10-NN acc {acc:.3f}"
    )


if __name__ == "__main__":
    main()
