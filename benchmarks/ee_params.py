"""Embedding quality of ``tl.ee`` over perplexity and λ, with openTSNE at the same perplexities (quality only).

Usage: ``python benchmarks/ee_params.py [--datasets …] [--perplexities …] [--lams …] [--threads 2]``.
Same preparation and metrics as ``benchmarks/ee.py`` (log-normalised counts, 50 PCs, ``pp.affinity`` with the
given perplexity, 10-NN preservation, 10-NN accuracy of the known cell types, centroid-distance Spearman ρ);
``repulsion="distance"`` (the default). Times are not reported: this asks which parameters give the best
embedding, not how fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import torch

import scembed as se

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _metrics import embedding_metrics  # noqa: E402
from _runner import DATA, lognorm_pca  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["worm_neuron_4k", "pbmc_10x_4k"])
    parser.add_argument("--perplexities", nargs="+", type=float, default=[10.0, 15.0, 30.0, 50.0])
    parser.add_argument("--lams", nargs="+", type=float, default=[1.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-opentsne", action="store_true", help="skip openTSNE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.datasets:
        a = ad.read_h5ad(DATA / f"{name}.h5ad")
        labels = a.obs["celltype"].astype(str).to_numpy()
        X = lognorm_pca(a, target_sum=None)
        for perplexity in args.perplexities:
            se.pp.affinity(a, perplexity=perplexity, use_rep="X_pca")
            for lam in args.lams:
                se.tl.ee(a, lam=lam, repulsion="distance", device="cpu")
                m = embedding_metrics(X, a.obsm["X_ee"], labels)
                rows.append((name, f"scembed ee, λ={lam:g}", perplexity, m, a.uns["ee"]["n_iter"]))
                print(*rows[-1], flush=True)
            if not args.no_opentsne:
                from openTSNE import TSNE

                Y = np.asarray(TSNE(perplexity=perplexity, n_jobs=args.threads, random_state=0).fit(X))
                rows.append((name, "openTSNE", perplexity, embedding_metrics(X, Y, labels), None))
                print(*rows[-1], flush=True)
    print("\n| data | method | perplexity | 10-NN pres. | 10-NN acc. | centroid ρ | EE iterations |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, method, perplexity, m, n_iter in rows:
        print(
            f"| {name} | {method} | {perplexity:g} | {m['knn_pres']:.3f} | {m['knn_acc']:.3f} | "
            f"{m['centroid_rho']:.3f} | {'' if n_iter is None else n_iter} |"
        )


if __name__ == "__main__":
    main()
