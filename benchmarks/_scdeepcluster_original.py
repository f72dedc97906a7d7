"""Run the original scDeepCluster_pytorch on one of ../shared/data's sets; one JSON line on stdout.

Called by ``benchmarks/scdeepcluster.py`` (methods ``original_k`` / ``original_auto``) with the original's
interpreter and its code directory on ``sys.path``; see benchmarks/README.md for how to assemble that directory.
It follows the steps of the original's ``run_scDeepCluster.py`` (``read_dataset``, ``normalize``, the
``scDeepCluster`` model, ``pretrain_autoencoder``, KMeans or Louvain centroids, ``fit``), with the original's
defaults. Differences, all outside the method: it reads the .h5ad instead of an .h5 file; it seeds numpy as well
as torch with ``seed`` (the original seeds torch with 42 and leaves KMeans unseeded); it sets torch's default dtype
to float64, as the original's code needs (its ``fit`` builds float64 tensors from the data); the checkpoints it
writes go to a temporary folder that is removed afterwards.

    python _scdeepcluster_original.py DATA.h5ad N_CLUSTERS SEED PRETRAIN_EPOCHS MAXITER THREADS

N_CLUSTERS 0 estimates K as the original does; -1 uses the true number of cell types.
"""

import contextlib
import io
import json
import re
import shutil
import sys
import tempfile
import time

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import torch
from preprocess import normalize, read_dataset  # the original's modules
from scDeepCluster import scDeepCluster
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def main(path: str, n_clusters: int, seed: int, pretrain: int, maxiter: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(seed)
    np.random.seed(seed)
    source = ad.read_h5ad(path)
    truth = source.obs["celltype"].astype(str).to_numpy()
    y = pd.Categorical(truth).codes
    if n_clusters < 0:  # the true number of types
        n_clusters = len(set(truth))
    x = source.X.toarray().astype(np.float64)  # the original reads a dense matrix from its .h5 file
    workdir = tempfile.mkdtemp()
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        adata = sc.AnnData(x)
        adata.obs["Group"] = y
        adata = read_dataset(adata, transpose=False, test_split=False, copy=True)
        adata = normalize(adata, size_factors=True, normalize_input=True, logtrans_input=True)
        X, X_raw, sf = adata.X, adata.raw.X, adata.obs.size_factors.to_numpy()
        model = scDeepCluster(
            input_dim=adata.n_vars,
            z_dim=32,
            encodeLayer=[256, 64],
            decodeLayer=[64, 256],
            sigma=2.5,
            gamma=1.0,
            device="cpu",
        )
        model.pretrain_autoencoder(
            x=X, X_raw=X_raw, size_factor=sf, batch_size=256, epochs=pretrain, ae_weights=f"{workdir}/AE.pth.tar"
        )
        t_pretrain = time.perf_counter() - t0
        fit = dict(X=X, X_raw=X_raw, size_factor=sf, y=y, batch_size=256, num_epochs=maxiter, update_interval=1)
        if n_clusters > 0:
            k = n_clusters
            labels, *_ = model.fit(
                n_clusters=k, init_centroid=None, y_pred_init=None, tol=1e-3, save_dir=workdir, **fit
            )
        else:  # Louvain (k=20, resolution 0.8) on the pretrained latent space and its cluster means
            latent = sc.AnnData(model.encodeBatch(torch.tensor(X)).cpu().numpy())
            sc.pp.neighbors(latent, n_neighbors=20, use_rep="X")
            sc.tl.louvain(latent, resolution=0.8)
            init = np.asarray(latent.obs["louvain"], dtype=int)
            centres = pd.DataFrame(latent.X).groupby(init).mean().to_numpy()
            k = len(centres)
            labels, *_ = model.fit(
                n_clusters=k, init_centroid=centres, y_pred_init=init, tol=1e-3, save_dir=workdir, **fit
            )
    elapsed = time.perf_counter() - t0
    shutil.rmtree(workdir, ignore_errors=True)
    text = log.getvalue()
    init_ari = re.search(r"Initializing k-means: NMI= [\d.]+, ARI= ([\d.]+)", text)
    converged = "Reach tolerance threshold" in text
    updates = text.count("Clustering   ")  # one per target update; the first comes before any training epoch
    return {
        "k": int(k),
        "k_true": len(set(truth)),
        "epochs": updates - 1 if converged else updates,  # training epochs, as scembed's n_epochs_cluster
        "converged": converged,
        "init_ari": float(init_ari.group(1)) if init_ari else None,
        "time": elapsed,
        "time_pretrain": t_pretrain,
        "ari": float(adjusted_rand_score(y, labels)),
        "nmi": float(normalized_mutual_info_score(y, labels)),
    }


if __name__ == "__main__":
    path, k, seed, pretrain, maxiter, threads = sys.argv[1:7]
    print(json.dumps(main(path, int(k), int(seed), int(pretrain), int(maxiter), int(threads))))
