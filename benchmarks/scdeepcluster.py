"""Benchmark of se.tl.scdeepcluster against the original scDeepCluster_pytorch, Leiden and KMeans on 50 PCs.

Every (method, data set, seed) runs in a fresh subprocess (``_runner.run_child``), so that its peak memory (max
RSS) and its wall time are its own. Quality: ARI and NMI against ``obs["celltype"]``.

    python benchmarks/scdeepcluster.py --quick          # reduced budget (max_epochs=(50, 200)), 1 seed
    python benchmarks/scdeepcluster.py                  # full defaults (300 / 2000), 3 seeds
    python benchmarks/scdeepcluster.py --scale 1000000  # GPU: time 1M simulated cells (few epochs)
    python benchmarks/scdeepcluster.py --merge benchmarks/results/scdeepcluster_defaults_scembed_seed*.json
                                                        # one table from runs saved with --json (seeds pooled)
    python benchmarks/scdeepcluster.py --resolutions 0.1 0.2 0.3 0.5 0.8 --pretrain-epochs 300
                                                        # K and ARI of Leiden on the pretrained latent space
    python benchmarks/scdeepcluster.py --k-rules --pretrain-epochs 300 --seeds 0 1 2
                                                        # label-free rules for K on the same latent spaces
    python benchmarks/scdeepcluster.py --k-seed-consensus --seeds 0 1 2
                                                        # K from three pretraining seeds together
    python benchmarks/scdeepcluster.py --label-structure --datasets worm_neuron_4k cite_pbmc_3762
                                                        # separability of the annotated types, purity of clusters
    python benchmarks/scdeepcluster.py --step-profile --threads 2    # ms per part of a pretraining step
    python benchmarks/scdeepcluster.py --minibatch-routes --threads 2 --datasets cellbench_3cl_2batches pbmc_10x_4k
                                                        # ms per sparse mini-batch, per non-zero vs densified
    python benchmarks/scdeepcluster.py --seeds 0 1 2 3 4 5 --methods scembed_k --datasets cite_pbmc_3762 \\
        --scembed-options '{"max_epochs": null, "validation_fraction": 0.1, "patience": 20}' \\
        --variant 'floor_noise1:{"scale": "floor", "noise": 1.0}'
                                                        # settings side by side in one run, paired by seed
    python benchmarks/scdeepcluster.py --quick --methods scembed_k scembed_k_float64 --datasets pbmc_10x_2100
                                                        # the same with everything in float64 (as the original)
    python benchmarks/scdeepcluster.py --quick --original-dir ORIGINAL_DIR \
        --methods scembed_k original_k scembed_auto original_auto   # side by side with the original (README)
    python benchmarks/scdeepcluster.py --batch --pretrain-epochs 50 --maxiter 100
                                                        # batch mixing vs uncorrected PCA and Harmony (README)
    python benchmarks/scdeepcluster.py --batch --datasets kang_ifnb_2batches --n-top-genes 2000
                                                        # the same on 14k cells, scembed on 2,000 genes

ORIGINAL_DIR is a folder with the original's code (benchmarks/README.md says how to assemble it) and, in
ORIGINAL_DIR/venv, an interpreter with its dependencies (``--original-python`` or ``$SCDC_ORIGINAL_PYTHON`` to use
another); ``$SCDC_ORIGINAL`` also sets the folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import DATA, run_child, script_command, write_json

DATASETS = ["pbmc_10x_2100", "pbmc_10x_4k", "worm_neuron_2100", "worm_neuron_4k", "cite_pbmc_3762"]
METHODS = ["scembed_k", "scembed_auto", "leiden_pca", "kmeans_pca"]
#: not in the default table: scembed with K given, run entirely in float64 (as the original), to see what precision does
EXTRA_METHODS = ["scembed_k_float64"]
#: the original scDeepCluster_pytorch, run from a folder with its code (``--original-dir``, benchmarks/README.md says
#: how to assemble it) and an interpreter that has its dependencies (``louvain`` for original_auto)
ORIGINAL_METHODS = ["original_k", "original_auto"]
#: reference figures of the original scDeepCluster_pytorch on pbmc_10x_2100 at the reduced budget (50 / 200),
#: measured outside this benchmark (one run each; the time on the same CPU class)
#: what a budget (``--quick``, ``--pretrain-epochs``, ``--maxiter``) means here: the original's fixed schedule,
#: every cell and every pretraining epoch (the package's default stops pretraining on held-out cells)
FIXED_SCHEDULE = {"validation_fraction": 0.0, "patience": None}
REFERENCE_ORIGINAL = {
    ("pbmc_10x_2100", "auto"): {"ari": 0.633, "nmi": 0.734, "time": 180.0},
    ("pbmc_10x_2100", "k"): {"ari": 0.787, "nmi": 0.786},
}


def worker(
    method: str, dataset: str, seed: int, pretrain: int, maxiter: int, threads: int, options: dict | None = None
) -> dict:
    import anndata as ad
    import torch
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    torch.set_num_threads(threads)
    adata = ad.read_h5ad(DATA / f"{dataset}.h5ad")
    truth = adata.obs["celltype"].astype(str).to_numpy()
    k_true = len(set(truth))
    out: dict = {}
    t0 = time.perf_counter()
    if method.startswith("scembed"):
        import scembed as se
        from scembed._engine import scdeepcluster as engine

        se.settings.progress = False
        initial_clusters = engine.initial_clusters

        def recording_initial_clusters(*a, **kw):  # to report the ARI of the centroids' labels (as the original)
            labels, centroids = initial_clusters(*a, **kw)
            out["init_ari"] = float(adjusted_rand_score(truth, labels))
            return labels, centroids

        engine.initial_clusters = recording_initial_clusters
        if method.endswith("_float64"):  # experiment only: network, noise and counts in float64
            torch.set_default_dtype(torch.float64)
            as_float32 = engine.CountData.batch

            def as_float64(self, rows, device):
                mb = as_float32(self, rows, device)
                return mb._replace(
                    xin=mb.xin.double(), counts=mb.counts.double(), size_factors=mb.size_factors.double()
                )

            engine.CountData.batch = as_float64
        k = k_true if method.startswith("scembed_k") else 0
        # a budget is the original's fixed schedule (every cell, every epoch); --scembed-options change the call,
        # e.g. '{"max_epochs": null, "validation_fraction": 0.1, "patience": 20}' for the package's defaults
        settings = {**FIXED_SCHEDULE, "max_epochs": (pretrain, maxiter), **(options or {})}
        se.tl.scdeepcluster(adata, k, random_state=seed, device="cpu", **settings)
        labels = adata.obs["scdeepcluster"].astype(str).to_numpy()
        u = adata.uns["scdeepcluster"]
        out.update(k=u["n_clusters"], epochs=u["n_epochs_cluster"], converged=bool(u["converged"]))
        out["epochs_pretrain"] = int(u["n_epochs_pretrain"])
        out["time_pretrain"] = float(u["time"]["pretrain"])  # the stage alone (the original glue's includes reading)
    else:
        import scanpy as sc

        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        sc.pp.pca(adata, n_comps=50, random_state=seed)
        if method == "leiden_pca":
            sc.pp.neighbors(adata, n_neighbors=15, random_state=seed)
            sc.tl.leiden(adata, resolution=1.0, random_state=seed, flavor="igraph", n_iterations=-1, directed=False)
            labels = adata.obs["leiden"].astype(str).to_numpy()
        else:
            from sklearn.cluster import KMeans

            labels = KMeans(k_true, n_init=20, random_state=seed).fit_predict(adata.obsm["X_pca"]).astype(str)
        out.update(k=len(set(labels)))
    out["time"] = time.perf_counter() - t0
    out["ari"] = float(adjusted_rand_score(truth, labels))
    out["nmi"] = float(normalized_mutual_info_score(truth, labels))
    out["k_true"] = k_true
    return out


def resolution_sweep(
    dataset: str, seed: int, pretrain: int, resolutions: list[float], threads: int, rules: bool = False
) -> dict:
    """Pretrain once, then K and ARI of Leiden at every resolution on that latent space (what n_clusters=0 sees)."""
    import anndata as ad
    import torch
    from sklearn.metrics import adjusted_rand_score

    import scembed as se
    from scembed._engine.scdeepcluster import leiden_labels

    torch.set_num_threads(threads)
    se.settings.progress = False
    adata = ad.read_h5ad(DATA / f"{dataset}.h5ad")
    truth = adata.obs["celltype"].astype(str).to_numpy()
    k_true = len(set(truth))
    # K given and no clustering epochs: the latent space written is the pretrained one
    se.tl.scdeepcluster(adata, k_true, max_epochs=(pretrain, 0), random_state=seed, device="cpu", **FIXED_SCHEDULE)
    z = adata.obsm["X_scdeepcluster"]
    params = adata.uns["scdeepcluster"]["params"]
    knn = params.get("n_neighbors", params.get("knn"))  # renamed n_neighbors
    out = {"k_true": k_true}
    for r in resolutions:
        labels = leiden_labels(z, knn=knn, resolution=r, random_state=seed)
        out[str(r)] = (len(set(labels.tolist())), float(adjusted_rand_score(truth, labels)))
    if rules:
        out.update(k_rules(z, truth, knn, seed))
    return out


def type_separability(adata, seed: int = 0) -> list[dict]:
    """Per annotated type: its size and how well a 10-NN classifier (5-fold) recognises it on 50 PCs of the RNA.

    Also on ``obsm["ADT"]`` (the protein counts as shipped) where the file has them. A type that the nearest
    neighbours do not recognise, or one of about as few cells as a cell has neighbours in the graph, is hard for
    any rule on that graph to make a cluster of its own, whatever K the rule chooses. ``adata`` (raw counts) is
    not changed.
    """
    import scanpy as sc
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    truth = adata.obs["celltype"].astype(str).to_numpy()
    logged = adata.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    sc.pp.pca(logged, n_comps=50, random_state=seed)
    spaces = {"rna": logged.obsm["X_pca"]}
    if "ADT" in adata.obsm:
        spaces["adt"] = np.asarray(adata.obsm["ADT"], dtype=np.float64)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    predicted = {
        name: cross_val_predict(KNeighborsClassifier(10), space, truth, cv=folds) for name, space in spaces.items()
    }
    rows = []
    for cell_type in sorted(set(truth), key=lambda t: -(truth == t).sum()):
        mask = truth == cell_type
        row = {"type": cell_type, "n": int(mask.sum())}
        for name, pred in predicted.items():
            row[f"recall_{name}"] = float((pred[mask] == cell_type).mean())
            others, counts = np.unique(pred[mask & (pred != cell_type)], return_counts=True)
            row[f"confused_{name}"] = str(others[counts.argmax()]) if len(others) else ""
        rows.append(row)
    return rows


def label_structure(datasets: list[str], seeds: list[int], threads: int, json_path) -> None:
    """How far the annotated number of types is a number a label-free rule can find: three tables.

    1. Every type's size and 10-NN recall on the RNA (and the protein, where present): :func:`type_separability`.
    2. ``tl.scdeepcluster`` at its defaults with K estimated and with K given, per seed: K, ARI and the purity of the
       clusters (:func:`cluster_purity`).
    3. The same, means over the seeds, one row per set.
    """
    import anndata as ad
    import torch
    from _metrics import PURE_SHARE, cluster_purity

    import scembed as se

    torch.set_num_threads(threads)
    se.settings.progress = False
    out = []
    print("Annotated types: cells, 10-NN recall on 50 PCs of the RNA (5-fold), the type most taken for it; and on the")
    print("protein (obsm['ADT']) where the file has it")
    print("| data set | type | cells | recall, RNA | taken for | recall, protein | taken for |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    data = {dataset: ad.read_h5ad(DATA / f"{dataset}.h5ad") for dataset in datasets}
    for dataset, adata in data.items():
        types = type_separability(adata)
        out.append({"dataset": dataset, "types": types})
        for row in types:
            protein = f"{row['recall_adt']:.2f} | {row['confused_adt']}" if "recall_adt" in row else "– | –"
            print(f"| {dataset} | {row['type']} | {row['n']} | {row['recall_rna']:.2f} | {row['confused_rna']} | "
                  f"{protein} |")  # fmt: skip
    print(f"\ntl.scdeepcluster at its defaults, K estimated ('est.') and given; pure cluster: ≥ {PURE_SHARE:.0%} of "
          "its cells one type; 'split': types that are the majority of two or more pure clusters (how many); 'shared': "
          "types with most of their cells in one cluster (K estimated)")  # fmt: skip
    print("| data set (true K) | seed | K est. | ARI est. / given | homogeneity est. / given | completeness est. / "
          "given | pure clusters est. / given | split (est.) | shared (est.) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for entry in out:
        adata = data[entry["dataset"]]
        truth = adata.obs["celltype"].astype(str).to_numpy()
        entry["k_true"] = k_true = len(set(truth))
        entry["runs"] = []
        for seed in seeds:
            runs = {}
            for mode, n_clusters in (("auto", 0), ("given", k_true)):
                a = adata.copy()
                se.tl.scdeepcluster(a, n_clusters, random_state=seed, device="cpu")
                runs[mode] = cluster_purity(truth, a.obs["scdeepcluster"].astype(str).to_numpy())
            entry["runs"].append({"seed": seed, **runs})
            auto, given = runs["auto"], runs["given"]
            split = ", ".join(f"{t} ({n})" for t, n in auto["split"].items()) or "–"
            shared = ", ".join("+".join(types) for types in auto["shared"]) or "–"
            print(
                f"| {entry['dataset']} ({k_true}) | {seed} | {auto['k']} | {auto['ari']:.3f} / {given['ari']:.3f} | "
                f"{auto['homogeneity']:.3f} / {given['homogeneity']:.3f} | "
                f"{auto['completeness']:.3f} / {given['completeness']:.3f} | "
                f"{auto['pure_clusters']} / {given['pure_clusters']} | {split} | {shared} |",
                flush=True,
            )
        # after every set, so that a stopped run keeps the sets it finished
        write_json(json_path, out, script="scdeepcluster --label-structure", threads=threads)
    print("\nMeans over the seeds")
    print("| data set (true K) | K est. per seed | ARI est. | ARI given | homogeneity est. / given "
          "| completeness est. / given |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for entry in out:

        def mean(mode: str, key: str, runs: list = entry["runs"]) -> float:
            return float(np.mean([run[mode][key] for run in runs]))

        ks = " / ".join(str(run["auto"]["k"]) for run in entry["runs"])
        print(
            f"| {entry['dataset']} ({entry['k_true']}) | {ks} | {mean('auto', 'ari'):.3f} | {mean('given', 'ari'):.3f} "
            f"| {mean('auto', 'homogeneity'):.3f} / {mean('given', 'homogeneity'):.3f} "
            f"| {mean('auto', 'completeness'):.3f} / {mean('given', 'completeness'):.3f} |"
        )


#: resolutions compared by ``--k-seed-consensus``
SEED_GRID = (0.1, 0.2, 0.3, 0.5, 0.8, 1.0)


def k_seed_consensus(datasets: list[str], seeds: list[int], pretrain: int, threads: int, json_path) -> None:
    """Label-free K from several pretraining seeds: the median of Leiden 0.2's K, and the resolution (of
    ``SEED_GRID``) whose partitions agree best between the latent spaces of different seeds (mean pairwise ARI).

    The pretraining seed is the largest source of variation of the latent space, so a resolution at which the
    clusters do not depend on it is a label-free choice; the cost is one pretraining per seed.
    """
    import anndata as ad
    import torch
    from sklearn.metrics import adjusted_rand_score

    import scembed as se
    from scembed._engine.scdeepcluster import leiden_labels

    torch.set_num_threads(threads)
    se.settings.progress = False
    rows = []
    print(f"pretraining {pretrain} epochs, seeds {seeds}; K (ARI of the seed-{seeds[0]} labels)")
    print("| data set (true K) | K at 0.2 per seed | median K at 0.2 | most seed-stable resolution (mean ARI between "
          "seeds) | its K per seed | its median K | ARI |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dataset in datasets:
        adata = ad.read_h5ad(DATA / f"{dataset}.h5ad")
        truth = adata.obs["celltype"].astype(str).to_numpy()
        k_true = len(set(truth))
        latents, knn = [], None
        for seed in seeds:
            a = adata.copy()
            se.tl.scdeepcluster(a, k_true, max_epochs=(pretrain, 0), random_state=seed, device="cpu", **FIXED_SCHEDULE)
            latents.append(a.obsm["X_scdeepcluster"])
            params = a.uns["scdeepcluster"]["params"]
            knn = params.get("n_neighbors", params.get("knn"))
        parts = {
            r: [leiden_labels(z, knn=knn, resolution=r, random_state=s) for z, s in zip(latents, seeds, strict=True)]
            for r in SEED_GRID
        }
        agreement = {
            r: float(np.mean([adjusted_rand_score(p[i], p[j]) for i in range(len(p)) for j in range(i + 1, len(p))]))
            for r, p in parts.items()
        }
        best = max(SEED_GRID, key=lambda r: (agreement[r], -r))

        def ks(r: float, parts: dict = parts) -> list[int]:
            return [len(set(p.tolist())) for p in parts[r]]

        row = {
            "dataset": dataset,
            "k_true": k_true,
            "k_0.2": ks(0.2),
            "ari_0.2": [float(adjusted_rand_score(truth, p)) for p in parts[0.2]],
            "agreement": agreement,
            "best_resolution": best,
            "k_best": ks(best),
            "ari_best": [float(adjusted_rand_score(truth, p)) for p in parts[best]],
        }
        rows.append(row)
        print(
            f"| {dataset} ({k_true}) | {', '.join(map(str, row['k_0.2']))} | {int(np.median(row['k_0.2']))} | "
            f"{best:g} ({agreement[best]:.2f}) | {', '.join(map(str, row['k_best']))} | "
            f"{int(np.median(row['k_best']))} | {row['ari_best'][0]:.2f} |",
            flush=True,
        )
    write_json(json_path, rows, script="scdeepcluster --k-seed-consensus", threads=threads)


#: label-free rules for K compared by ``--k-rules`` on the pretrained latent space
K_RULES = ("leiden_0.2", "leiden_0.8", "stability", "plateau", "silhouette")


def k_rules(z: np.ndarray, truth: np.ndarray, knn: int, seed: int) -> dict:
    """K chosen by label-free rules on a latent space, and the ARI of the labels each rule gives.

    - ``leiden_0.2`` / ``leiden_0.8``: Leiden at a fixed resolution (scembed's default; the original's Louvain's);
    - ``stability``: the resolution of a grid whose Leiden partitions of five random 80 % subsamples agree best (mean
      pairwise ARI on the cells they share), then Leiden on all cells at it;
    - ``plateau``: the K that Leiden gives over the widest range of a log-spaced resolution grid (0.05–2);
    - ``silhouette``: KMeans for K = 2–30, the K of the largest silhouette (a 3,000-cell sample).
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    from scembed._engine.scdeepcluster import leiden_labels

    def result(labels: np.ndarray) -> tuple[int, float]:
        return len(set(labels.tolist())), float(adjusted_rand_score(truth, labels))

    out = {}
    for r in (0.2, 0.8):
        out[f"leiden_{r:g}"] = result(leiden_labels(z, knn=knn, resolution=r, random_state=seed))
    rng = np.random.default_rng(seed)
    n = z.shape[0]
    subsets = [np.sort(rng.choice(n, int(0.8 * n), replace=False)) for _ in range(5)]
    grid = (0.1, 0.2, 0.3, 0.5, 0.8, 1.0)
    stability = {}
    for r in grid:
        parts = []
        for i, rows in enumerate(subsets):
            full = np.full(n, -1)
            full[rows] = leiden_labels(z[rows], knn=knn, resolution=r, random_state=seed + i)
            parts.append(full)
        scores = []
        for i in range(len(parts)):
            for j in range(i + 1, len(parts)):
                both = (parts[i] >= 0) & (parts[j] >= 0)
                scores.append(adjusted_rand_score(parts[i][both], parts[j][both]))
        stability[r] = float(np.mean(scores))
    best = max(grid, key=lambda r: (stability[r], -r))
    out["stability"] = result(leiden_labels(z, knn=knn, resolution=best, random_state=seed))
    labels_at: dict[int, list[np.ndarray]] = {}  # K → the partitions of the fine grid that have it
    for r in np.geomspace(0.05, 2.0, 24):
        labels = leiden_labels(z, knn=knn, resolution=float(r), random_state=seed)
        labels_at.setdefault(len(set(labels.tolist())), []).append(labels)
    k_plateau = max(labels_at, key=lambda k: (len(labels_at[k]), -k))
    out["plateau"] = result(labels_at[k_plateau][0])
    sample = rng.choice(n, min(n, 3000), replace=False)
    best_s, best_labels = -1.0, None
    for k in range(2, 31):
        labels = KMeans(k, n_init=10, random_state=seed).fit_predict(z)
        score = silhouette_score(z[sample], labels[sample])
        if score > best_s:
            best_s, best_labels = score, labels
    out["silhouette"] = result(best_labels)
    return out


#: pretraining settings ``--pretrain-curve --options`` may change (tl.scdeepcluster's names; ``scale``: the engine's)
CURVE_OPTIONS = ("noise", "n_latent", "hidden", "batch_size", "lr", "scale", "n_top_genes")


def _count_data(dataset: str, threads: int, n_top_genes: int | None = None, scale: str = "gene"):
    """A shared set read as tl.scdeepcluster reads it (one batch): its CountData, genes, labels and true K."""
    import anndata as ad
    import torch

    import scembed as se
    from scembed._engine import scdeepcluster as engine
    from scembed.tl._autoencoder import _genes

    torch.set_num_threads(threads)
    se.settings.progress = False
    adata = ad.read_h5ad(DATA / f"{dataset}.h5ad")
    truth = adata.obs["celltype"].astype(str).to_numpy()
    X, genes, lib = _genes(adata, adata.X, "X", counts=True, n_top_genes=n_top_genes)
    data = engine.CountData.fit(X, genes, library=lib, scale=scale, standardize_per_batch=True)
    return data, genes, truth, len(set(truth))


@contextmanager
def _after_every_epoch(module, hook):
    """Within the block, ``hook(epoch, losses, kwargs)`` runs after every epoch of ``module.train`` (the engine's one
    training loop, as the module imported it); ``kwargs`` are those the loop was called with."""
    train = module.train

    def wrapped(step, n_epochs, **kw):
        def step_then_hook(epoch: int):
            out = step(epoch)
            hook(epoch, out, kw)
            return out

        return train(step_then_hook, n_epochs, **kw)

    module.train = wrapped
    try:
        yield
    finally:
        module.train = train


def pretrain_curve(dataset: str, seed: int, epochs: int, every: int, threads: int, options: dict) -> dict:
    """Quality of the latent space along pretraining: KMeans (true K) and Leiden (resolution 0.2) on every cell's
    code every ``every`` epochs, with the held-out loss of 10 % of the cells that pretraining does not see.

    The network, data and loop are tl.scdeepcluster's (``ZINBAutoencoder``, ``CountData.fit``,
    ``train_autoencoder``), trained on 90 % of the cells so that the held-out loss can show over-fitting; no
    stopping, so the whole curve is recorded. ``options`` change the pretraining settings (``CURVE_OPTIONS``).
    """
    import torch
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    from scembed._engine import autoencoder as ae_engine
    from scembed._engine import scdeepcluster as engine
    from scembed._utils import seeded_torch

    unknown = set(options) - set(CURVE_OPTIONS)
    if unknown:
        raise SystemExit(f"--options: unknown {sorted(unknown)}; known: {CURVE_OPTIONS}")
    data, genes, truth, k_true = _count_data(dataset, threads, options.get("n_top_genes"), options.get("scale", "gene"))
    train_rows, validation_rows = ae_engine.split_validation(data.n_obs, 0.1, seed)
    dev = torch.device("cpu")
    curve: list[dict] = []

    def score(epoch: int, out, kw) -> None:
        if (epoch + 1) % every and epoch:
            return
        net = kw["module"]
        z = engine.embed(net.eval(), data, dev)
        net.train()
        km = KMeans(k_true, n_init=20, random_state=seed).fit_predict(z)
        leiden = engine.leiden_labels(z, knn=20, resolution=0.2, random_state=seed)
        curve.append(
            {
                "epoch": epoch + 1,
                "loss": float(out["loss"]),
                "validation_loss": float(out["validation_loss"]),
                "ari_kmeans": float(adjusted_rand_score(truth, km)),
                "k_leiden": int(leiden.max() + 1),
                "ari_leiden": float(adjusted_rand_score(truth, leiden)),
            }
        )

    with _after_every_epoch(ae_engine, score), seeded_torch(seed, dev) as noise_gen:
        net = engine.ZINBAutoencoder(
            len(genes), options.get("n_latent", 32), tuple(options.get("hidden", (256, 64))), 0
        )
        history, _ = ae_engine.train_autoencoder(
            net,
            data,
            max_epochs=epochs,
            batch_size=options.get("batch_size", 256),
            noise=options.get("noise", 2.5),
            lr=options.get("lr", 1e-3),
            device=dev,
            generator=torch.Generator().manual_seed(seed),
            noise_generator=noise_gen,
            train_rows=train_rows,
            validation_rows=validation_rows,
            validation_seed=seed,
            show_progress=False,
        )
    best = int(np.argmin(history["validation_loss"])) + 1
    return {
        "dataset": dataset,
        "seed": seed,
        "k_true": k_true,
        "options": options,
        "best_epoch": best,
        "validation_loss": history["validation_loss"],
        "curve": curve,
    }


def curve_table(
    datasets: list[str], seeds: list[int], epochs: int, every: int, threads: int, options: dict, json_path: Path | None
) -> None:
    """``--pretrain-curve``: one row per (data set, seed) and checkpoint column; then the means over seeds."""
    rows = []
    marks = sorted({m for m in (every, 50, 100, 150, 200, 300, epochs) if m <= epochs and m % every == 0})
    print(f"pretraining up to {epochs} epochs on 90 % of the cells, options {json.dumps(options)}; seeds {seeds}")
    print("KMeans (true K) ARI of the latent space at epoch …; 'best held-out': the epoch of the lowest held-out loss")
    print("| data set | seed | " + " | ".join(str(m) for m in marks) + " | best held-out (epoch) | max (epoch) |")
    print("| --- | --- |" + " --- |" * (len(marks) + 2))
    for dataset in datasets:
        for seed in seeds:
            r = pretrain_curve(dataset, seed, epochs, every, threads, options)
            rows.append(r)
            write_json(json_path, rows, script="scdeepcluster --pretrain-curve", epochs=epochs, options=options)
            at = {c["epoch"]: c for c in r["curve"]}
            nearest = min(at, key=lambda e: abs(e - r["best_epoch"]))
            top = max(r["curve"], key=lambda c: c["ari_kmeans"])
            cells = [f"{at[m]['ari_kmeans']:.3f}" if m in at else "–" for m in marks]
            print(
                f"| {dataset} | {seed} | {' | '.join(cells)} | {at[nearest]['ari_kmeans']:.3f} ({r['best_epoch']}) "
                f"| {top['ari_kmeans']:.3f} ({top['epoch']}) |",
                flush=True,
            )


def cluster_curve(
    dataset: str, seed: int, checkpoints: list[int], lrs: list[float], maxiter: int, threads: int
) -> list[dict]:
    """The clustering stage started from the pretrained network at several pretraining lengths and learning rates.

    As tl.scdeepcluster with K given (all cells, its data, network, KMeans start and ``engine.cluster``), with the
    ARI of the labels after every clustering epoch recorded: the start (KMeans on the latent space), the end (where
    the ``tol`` rule stops), and the best epoch, which only the true labels can pick (the model selection of the
    DANCE re-implementation, whose published figures take the epoch of the highest ARI). One pretraining per
    (data set, seed), its weights kept at every checkpoint; every clustering run gets the same fresh generators.
    """
    import copy

    import torch
    from sklearn.metrics import adjusted_rand_score

    from scembed._engine import autoencoder as ae_engine
    from scembed._engine import scdeepcluster as engine
    from scembed._utils import seeded_torch

    data, genes, truth, k_true = _count_data(dataset, threads)
    dev = torch.device("cpu")
    saved: dict[int, dict] = {}

    def save(epoch: int, out, kw) -> None:
        if epoch + 1 in checkpoints:
            saved[epoch + 1] = copy.deepcopy(kw["module"].state_dict())

    with _after_every_epoch(ae_engine, save), seeded_torch(seed, dev) as noise_gen:
        net = engine.ZINBAutoencoder(len(genes), 32, (256, 64), 0)
        engine.pretrain(
            net,
            data,
            epochs=max(checkpoints),
            batch_size=256,
            sigma=2.5,
            device=dev,
            generator=torch.Generator().manual_seed(seed),
            noise_generator=noise_gen,
        )
    rows = []
    for epochs in checkpoints:
        for lr in lrs:
            net = engine.ZINBAutoencoder(len(genes), 32, (256, 64), 0)
            net.load_state_dict(saved[epochs])
            z0 = engine.embed(net.eval(), data, dev)
            labels, centroids = engine.initial_clusters(z0, k_true, random_state=seed)
            net.set_centroids(torch.from_numpy(centroids))
            aris = [float(adjusted_rand_score(truth, labels))]

            def score(epoch: int, out, kw, net=net, aris=aris) -> None:
                _, q = engine.infer(net, data, dev)  # the clustering loop gets no module: the closure's net
                aris.append(float(adjusted_rand_score(truth, q.argmax(1))))

            with _after_every_epoch(engine, score), seeded_torch(seed + 1, dev) as noise_gen:
                _, converged = engine.cluster(
                    net,
                    data,
                    labels,
                    maxiter=maxiter,
                    batch_size=256,
                    sigma=2.5,
                    gamma=1.0,
                    update_interval=1,
                    tol=1e-3,
                    lr=lr,
                    device=dev,
                    generator=torch.Generator().manual_seed(seed + 1),
                    noise_generator=noise_gen,
                )
            rows.append(
                {
                    "dataset": dataset,
                    "seed": seed,
                    "k_true": k_true,
                    "pretrain_epochs": epochs,
                    "lr": lr,
                    "ari_init": aris[0],
                    "ari_end": aris[-1],
                    "ari_best": max(aris),
                    "best_epoch": int(np.argmax(aris)),
                    "epochs": len(aris) - 1,
                    "converged": converged,
                    "aris": aris,
                }
            )
    return rows


def cluster_curve_table(
    datasets: list[str],
    seeds: list[int],
    checkpoints: list[int],
    lrs: list[float],
    maxiter: int,
    threads: int,
    json_path: Path | None,
) -> None:
    """``--cluster-curve``: ARI at the start, end and best epoch of the clustering stage, one row per run."""
    rows = []
    print(
        f"clustering stage from pretraining checkpoints {checkpoints}, Adadelta lr {lrs}, maxiter {maxiter}, "
        f"tol 1e-3; seeds {seeds}; 'best (label-picked)' uses the true labels, as DANCE's model selection does"
    )
    print(
        "| data set | seed | pretraining epochs | lr | ARI at start (KMeans) | ARI at the end | epochs | "
        "best (label-picked) | its epoch |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for dataset in datasets:
        for seed in seeds:
            for r in cluster_curve(dataset, seed, checkpoints, lrs, maxiter, threads):
                rows.append(r)
                print(
                    f"| {dataset} | {seed} | {r['pretrain_epochs']} | {r['lr']:g} | {r['ari_init']:.3f} | "
                    f"{r['ari_end']:.3f} | {r['epochs']} | {r['ari_best']:.3f} | {r['best_epoch']} |",
                    flush=True,
                )
            write_json(
                json_path,
                rows,
                script="scdeepcluster --cluster-curve",
                checkpoints=checkpoints,
                lrs=lrs,
                maxiter=maxiter,
            )
    print("\nmeans over seeds:")
    print("| data set | pretraining epochs | lr | start | end | best (label-picked) | epochs |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dataset in datasets:
        for epochs in checkpoints:
            for lr in lrs:
                sel = [r for r in rows if (r["dataset"], r["pretrain_epochs"], r["lr"]) == (dataset, epochs, lr)]
                mean = {k: np.mean([r[k] for r in sel]) for k in ("ari_init", "ari_end", "ari_best", "epochs")}
                print(
                    f"| {dataset} | {epochs} | {lr:g} | {fmt([r['ari_init'] for r in sel])} | "
                    f"{fmt([r['ari_end'] for r in sel])} | {fmt([r['ari_best'] for r in sel])} | "
                    f"{mean['epochs']:.0f} |"
                )


def run_method(
    args: list[str], threads: int, original_dir: Path | None, original_python: str | None
) -> tuple[dict, float]:
    """One (method, data set, seed) in a fresh process: its JSON result and its peak RSS in MiB."""
    method, dataset, seed, pretrain, maxiter = args[:5]
    command, path = script_command(__file__, "--worker", *args), None
    if method in ORIGINAL_METHODS:  # its own interpreter, with the original's code first on the path
        if original_dir is None:
            raise SystemExit(f"{method} needs --original-dir (a folder with the original's code; see the README)")
        python = original_python or str(original_dir / "venv" / "bin" / "python")
        k = "-1" if method == "original_k" else "0"
        glue = Path(__file__).with_name("_scdeepcluster_original.py")
        command = script_command(glue, DATA / f"{dataset}.h5ad", k, seed, pretrain, maxiter, threads, python=python)
        path = original_dir
    r = run_child(command, threads, extra_pythonpath=path)
    if not r["ok"]:
        raise RuntimeError(f"worker {args} failed:\n{r['stderr'][-3000:] or r['error']}")
    return r["result"], r["peak_rss_mib"]


def parse_variants(specs: list[str]) -> list[tuple[str, dict]]:
    """``--variant LABEL:JSON`` values as (label, keywords); the label may not hold ':' or brackets."""
    out = []
    for spec in specs:
        label, sep, text = spec.partition(":")
        if not sep or not label or any(c in label for c in "[]"):
            raise SystemExit(f"--variant {spec!r}: expected LABEL:JSON, e.g. 'noise1:{{\"noise\": 1.0}}'")
        try:
            options = json.loads(text)
        except json.JSONDecodeError as err:
            raise SystemExit(f"--variant {spec!r}: the keywords are not JSON ({err})") from None
        if not isinstance(options, dict):
            raise SystemExit(f"--variant {spec!r}: expected a JSON object of tl.scdeepcluster keywords")
        out.append((label, options))
    return out


def fmt(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def scale(n_cells: int, n_genes: int, epochs: int, device: str) -> None:
    import torch

    import scembed as se

    t0 = time.perf_counter()
    adata = se.datasets.simulate(n_cells, n_genes, n_celltypes=10, random_state=0)
    print(f"simulated {n_cells} × {n_genes} ({adata.X.nnz / 1e6:.0f}M non-zeros) in {time.perf_counter() - t0:.0f} s")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    se.tl.scdeepcluster(
        adata, 10, max_epochs=(epochs, epochs), tol=0.0, device=device, batch_size=4096, **FIXED_SCHEDULE
    )
    total = time.perf_counter() - t0
    u = adata.uns["scdeepcluster"]
    print(
        json.dumps({"n_cells": n_cells, "total_s": round(total, 1), **{k: round(v, 1) for k, v in u["time"].items()}})
    )
    print(
        f"per pretraining epoch: {u['time']['pretrain'] / max(epochs, 1):.1f} s; per clustering epoch (incl. target "
        f"update): {u['time']['cluster'] / max(u['n_epochs_cluster'], 1):.1f} s"
    )
    if device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    from sklearn.metrics import adjusted_rand_score

    print(f"ARI vs simulated types: {adjusted_rand_score(adata.obs['celltype'], adata.obs['scdeepcluster']):.3f}")


def step_compare(dataset: str, threads: int, n_steps: int = 20, batch_size: int = 256) -> None:
    """ms per pretraining step: scembed's (float32, fused ZINB) vs the original's formulation (float64, composed).

    The "original formulation" is written here from the published method: float64 network with three separate
    output heads, the ZINB loss composed from element-wise torch operations (autograd through lgamma/pow/where),
    and the extra clean encoder pass that the original's pretraining forward computes and discards.
    """
    import anndata as ad
    import torch
    from torch import nn

    from scembed._engine import scdeepcluster as eng

    torch.set_num_threads(threads)
    adata = ad.read_h5ad(DATA / f"{dataset}.h5ad")
    data = eng.CountData.fit(adata.X.tocsr(), np.flatnonzero(np.asarray((adata.X > 0).sum(0)).ravel()))
    G = len(data.genes)
    rows = np.arange(batch_size)
    xin, raw, sf, _, nonzero = data.batch(rows, torch.device("cpu"))

    def composed_zinb(x, mean, disp, pi, s):
        eps = 1e-10
        mean = mean * s[:, None]
        t1 = torch.lgamma(disp + eps) + torch.lgamma(x + 1.0) - torch.lgamma(x + disp + eps)
        t2 = (disp + x) * torch.log(1.0 + mean / (disp + eps)) + x * (torch.log(disp + eps) - torch.log(mean + eps))
        nb_case = t1 + t2 - torch.log(1.0 - pi + eps)
        zero_case = -torch.log(pi + (1.0 - pi) * torch.pow(disp / (disp + mean + eps), disp) + eps)
        return torch.where(x <= 1e-8, zero_case, nb_case).mean()

    def relu_mlp(sizes, last_act):
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2 or last_act:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    torch.manual_seed(0)
    enc, dec = relu_mlp([G, 256, 64, 32], False).double(), relu_mlp([32, 64, 256], True).double()
    heads = [nn.Linear(256, G).double() for _ in range(3)]
    params = [p for m in (enc, dec, *heads) for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3, amsgrad=True)
    x64, raw64, sf64 = xin.double(), raw.double(), sf.double()

    def original_step():
        h = dec(enc(x64 + torch.randn_like(x64) * 2.5))
        mean = torch.clamp(torch.exp(heads[0](h)), 1e-5, 1e6)
        disp = torch.clamp(nn.functional.softplus(heads[1](h)), 1e-4, 1e4)
        pi = torch.sigmoid(heads[2](h))
        enc(x64)  # the clean pass the original's forwardAE computes in pretraining too
        loss = composed_zinb(raw64, mean, disp, pi, sf64)
        opt.zero_grad()
        loss.backward()
        opt.step()

    net = eng.ZINBAutoencoder(G)
    opt2 = torch.optim.Adam(net.parameters(), lr=1e-3, amsgrad=True)

    def scembed_step():
        noisy = torch.add(xin, torch.randn_like(xin), alpha=2.5)
        loss = eng.zinb_nll_logits(net.decode(net.encode(noisy)), raw, sf, nonzero)
        opt2.zero_grad(set_to_none=True)
        loss.backward()
        opt2.step()

    for name, fn in [("original formulation (float64, composed ZINB)", original_step), ("scembed", scembed_step)]:
        fn()
        t0 = time.perf_counter()
        for _ in range(n_steps):
            fn()
        print(f"{name}: {(time.perf_counter() - t0) / n_steps * 1000:.0f} ms per step of {batch_size} cells")


def penalty_step(threads: int, n_steps: int = 60, n_cells: int = 256, n_latent: int = 32) -> None:
    """ms per batch-penalty call (forward and backward) with and without the mutual-neighbour weights, alternated in
    one process on the same codes: two batches, a bank of 2,048 codes, the trainers' mini-batch and latent size."""
    import statistics

    import torch

    from scembed._engine import mmd

    torch.set_num_threads(threads)
    penalties = {m: mmd.BatchPenalty(1.0, 2, n_latent, torch.device("cpu"), torch.Generator().manual_seed(0),
                                     mutual=m) for m in (False, True)}  # fmt: skip
    gen, times = torch.Generator().manual_seed(1), {False: [], True: []}
    for step in range(n_steps):
        codes = torch.randint(0, 2, (n_cells,), generator=gen)
        z0 = torch.randn(n_cells, n_latent, generator=gen) + codes[:, None]
        onehot, rows = torch.nn.functional.one_hot(codes, 2).float(), torch.arange(n_cells) + n_cells * step
        for mutual, penalty in penalties.items():
            z = z0.clone().requires_grad_(True)
            t0 = time.perf_counter()
            penalty(z, onehot, rows, torch.tensor(1.0)).backward()
            times[mutual].append(time.perf_counter() - t0)
    print("| penalty | ms per call (median, after 10 warm-up steps) |\n| --- | --- |")
    for mutual, ts in times.items():
        print(f"| {'mutual neighbours' if mutual else 'plain MMD'} | {statistics.median(ts[10:]) * 1e3:.1f} |")


def step_profile(dataset: str, threads: int, n_epochs: int = 8, batch_size: int = 256) -> None:
    """ms per part of scembed's pretraining step (mini-batch, noise, forward, ZINB loss, backward, Adam).

    Works against older versions of ``scembed._engine.scdeepcluster`` too (``CountData.batch`` returned four
    values before it returned the non-zeros' indices), so that an A/B comparison is one command per version:
    ``PYTHONPATH=<old checkout>/src python benchmarks/scdeepcluster.py --step-profile``.
    """
    import anndata as ad
    import torch
    from scipy import sparse

    from scembed._engine import scdeepcluster as eng
    from scembed._engine.training import adam, minibatches

    torch.set_num_threads(threads)
    X = sparse.csr_matrix(ad.read_h5ad(DATA / f"{dataset}.h5ad").X)
    data = eng.CountData.fit(X, np.arange(X.shape[1]))
    torch.manual_seed(0)
    net = eng.ZINBAutoencoder(X.shape[1])
    opt = adam(net.parameters(), lr=1e-3, amsgrad=True)
    order, noise = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    parts = ["mini-batch", "noise", "forward", "ZINB loss", "backward", "Adam"]
    totals = np.zeros(len(parts))
    n_steps = 0

    def epoch() -> None:
        nonlocal n_steps
        for idx in minibatches(data.n_obs, batch_size, generator=order):
            t = [time.perf_counter()]
            mb = data.batch(idx.numpy(), torch.device("cpu"))
            t.append(time.perf_counter())
            xin = torch.add(mb[0], torch.randn(mb[0].shape, generator=noise), alpha=2.5)
            t.append(time.perf_counter())
            logits = net.decode(net.encode(xin))
            t.append(time.perf_counter())
            extra = (mb[4],) if len(mb) > 4 else ()
            loss = eng.zinb_nll_logits(logits, mb[1], mb[2], *extra)
            t.append(time.perf_counter())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t.append(time.perf_counter())
            opt.step()
            t.append(time.perf_counter())
            totals[:] += np.diff(t)
            n_steps += 1

    epoch()  # warm-up
    totals[:], n_steps = 0.0, 0
    t0 = time.perf_counter()
    for _ in range(n_epochs):
        epoch()
    per_epoch = (time.perf_counter() - t0) / n_epochs
    print(f"{dataset}, {threads} thread(s), batch {batch_size}: {per_epoch:.3f} s per pretraining epoch")
    counts = X.data[X.data > 0]
    try:
        from scembed._engine.zinb import SMALL_COUNT_MAX as small_max
    except ImportError:  # older versions: the loss's lgamma/digamma for every count; 16 for comparison
        small_max = 16
    print(
        f"non-zero counts: {counts.size / (X.shape[0] * X.shape[1]):.1%} of the entries; "
        f"{(counts <= small_max).mean():.1%} of them at most {small_max} (the loss's finite sums, on a CPU)"
    )
    print("| " + " | ".join(parts) + " | step |")
    print("|" + " --- |" * (len(parts) + 1))
    ms = totals / n_steps * 1e3
    print("| " + " | ".join(f"{v:.2f}" for v in ms) + f" | {ms.sum():.2f} |  (ms per step)")


def minibatch_routes(datasets: list[str], threads: int, n_reps: int = 20, batch_size: int = 256) -> None:
    """ms per mini-batch read from sparse counts, per non-zero (gathers and scatters) and densified first, on every
    gene of each data set and on its 2,000 most variable genes; the same cells both ways, alternated in one process.

    The two ways give the same bits (tests); ``counts.DENSE_SHARE`` picks the densified way above its share of
    non-zeros. The last columns fit ``ms = a · non-zeros + b · entries`` per way over all the rows printed.
    """
    import anndata as ad
    import scanpy as sc
    import torch
    from scipy import sparse

    from scembed._engine import counts

    torch.set_num_threads(threads)
    default_share = counts.DENSE_SHARE
    rows_out = []
    print("| data set | genes | non-zero share | per non-zero (ms) | densified (ms) |")
    print("| --- | --- | --- | --- | --- |")
    for dataset in datasets:
        adata = ad.read_h5ad(DATA / f"{dataset}.h5ad")
        X = sparse.csr_matrix(adata.X)
        log = sparse.csr_matrix(sc.pp.normalize_total(adata, inplace=False)["X"])
        log.data = np.log1p(log.data)
        mean = np.asarray(log.mean(0)).ravel()
        variable = np.argsort(-(np.asarray(log.power(2).mean(0)).ravel() - mean**2))
        for genes in (np.arange(X.shape[1]), np.sort(variable[:2000])):
            sub = X[:, genes]
            data = counts.CountData.fit(sub, np.arange(len(genes)))
            chunk = data.take(np.arange(min(sub.shape[0], counts.INFER_BATCH)), counts.BLOCK_ROWS)
            idx = np.random.default_rng(0).permutation(chunk.n_obs)[:batch_size]
            ms = {}
            for share in (1.0, 0.0) * 2:  # 1: never densified; 0: always
                counts.DENSE_SHARE = share
                for _ in range(3):
                    chunk.batch(idx, torch.device("cpu"))
                t0 = time.perf_counter()
                for _ in range(n_reps):
                    chunk.batch(idx, torch.device("cpu"))
                ms.setdefault(share, []).append((time.perf_counter() - t0) / n_reps * 1e3)
            nnz = chunk.X[idx].count_nonzero()
            entries = len(idx) * len(genes)
            sparse_ms, dense_ms = min(ms[1.0]), min(ms[0.0])
            print(f"| {dataset} | {len(genes)} | {nnz / entries:.3f} | {sparse_ms:.2f} | {dense_ms:.2f} |")
            rows_out.append((nnz, entries, sparse_ms, dense_ms))
    counts.DENSE_SHARE = default_share
    A = np.array([[r[0], r[1]] for r in rows_out], dtype=float)
    for name, col in (("per non-zero", 2), ("densified", 3)):
        (a, b), *_ = np.linalg.lstsq(A, np.array([r[col] for r in rows_out]), rcond=None)
        print(f"{name}: {a * 1e6:.2f} ns per non-zero + {b * 1e6:.2f} ns per entry")


#: data sets of the batch benchmark: simulated (``sim_<batch_scale>``, 2,000 cells × 500 genes, 5 types, 2 batches,
#: simulated with the run's seed; ``sim_<batch_scale>_unshared``: the same without the first type's cells of the
#: second batch, a type present in one batch only, which a correction must leave apart; ``_3b``: three batches of
#: 1,000 cells, where ``_unshared`` also leaves the second type out of the third batch) and shared real sets with
#: ``obs["batch"]``
BATCH_DATASETS = ["sim_0.5", "sim_1.0", "sim_1.0_unshared", "cellbench_3cl_2batches", "kang_ifnb_2batches"]
#: scembed with ``batch_key`` (default penalty, or none: ``_nopenalty``) and without; tl.autoencoder (+ Leiden)
#: likewise; Leiden on uncorrected and Harmony-corrected PCs
BATCH_METHODS = ["scembed_batch", "scembed_batch_nopenalty", "scembed_nobatch", "pca", "harmony"]
EXTRA_BATCH_METHODS = ["autoencoder_batch", "autoencoder_batch_nopenalty"]


def batch_data(dataset: str, seed: int):
    import anndata as ad
    import scanpy as sc

    import scembed as se

    if dataset.startswith("sim_"):
        scale, *flags = dataset[4:].split("_")
        n_batches = 3 if "3b" in flags else 2
        adata = se.datasets.simulate(
            n_cells=1000 * n_batches,
            n_genes=500,
            n_celltypes=5,
            n_batches=n_batches,
            batch_scale=float(scale),
            random_state=seed,
        )
        if "unshared" in flags:
            # the first type only in the first batch; with three batches also the second type absent from the third
            types, batches = adata.obs["celltype"].cat.categories, adata.obs["batch"].cat.categories
            celltype, batch = adata.obs["celltype"].to_numpy(), adata.obs["batch"].to_numpy()
            drop = (celltype == types[0]) & (batch != batches[0])
            if n_batches == 3:
                drop |= (celltype == types[1]) & (batch == batches[2])
            adata = adata[~drop].copy()
        return adata
    adata = ad.read_h5ad(DATA / f"{dataset}.h5ad")
    sc.pp.filter_genes(adata, min_cells=3)
    return adata


def batch_run(
    method: str,
    dataset: str,
    seed: int,
    pretrain: int,
    maxiter: int,
    n_top_genes: int | None = None,
    options: dict | None = None,
    ae_options: dict | None = None,
) -> dict:
    """Embedding and clusters of one method: scDeepCluster with ``n_clusters=0`` (batch-aware with its default
    penalty or none, or without the batch; ``options`` are its keywords), tl.autoencoder (the same; keywords
    ``ae_options``) followed by Leiden, or Leiden (the same resolution, 0.2) on 50 PCs of the log-normalised,
    scaled data, uncorrected or corrected by Harmony."""
    import scanpy as sc

    import scembed as se

    adata = batch_data(dataset, seed)
    key = None if method.endswith("_nobatch") else "batch"
    penalty = {"batch_penalty": 0.0} if method.endswith("_nopenalty") else {}
    out: dict = {}
    if method.startswith("scembed"):
        settings = {**FIXED_SCHEDULE, "max_epochs": (pretrain, maxiter), **penalty, **(options or {})}
        se.tl.scdeepcluster(adata, 0, batch_key=key, n_top_genes=n_top_genes, random_state=seed, **settings)
        emb, clusters = adata.obsm["X_scdeepcluster"], adata.obs["scdeepcluster"].to_numpy()
        out["time"] = sum(adata.uns["scdeepcluster"]["time"].values())
    elif method.startswith("autoencoder"):
        from scembed._engine.scdeepcluster import leiden_labels

        t0 = time.perf_counter()
        kwargs = {**penalty, **(ae_options or {})}
        se.tl.autoencoder(adata, batch_key=key, n_top_genes=n_top_genes, random_state=seed, **kwargs)
        out["time"] = time.perf_counter() - t0
        emb = adata.obsm["X_autoencoder"]
        clusters = leiden_labels(emb, knn=20, resolution=0.2, random_state=seed)  # as scDeepCluster's K estimate
    else:
        t0 = time.perf_counter()
        b = adata.copy()
        sc.pp.normalize_total(b)
        sc.pp.log1p(b)
        if b.n_vars > 2000:
            sc.pp.highly_variable_genes(b, n_top_genes=2000, batch_key="batch")
            b = b[:, b.var["highly_variable"]].copy()
        sc.pp.scale(b)
        emb = np.asarray(sc.pp.pca(b.X, n_comps=min(50, b.n_vars - 1), random_state=seed))
        if method == "harmony":
            import harmonypy

            z = np.asarray(harmonypy.run_harmony(emb, adata.obs, "batch", random_state=seed, verbose=False).Z_corr)
            z = z if z.shape[0] == adata.n_obs else z.T  # (d, n) in older harmonypy
            if np.array_equal(z, emb):  # harmonypy 2.1 does so on the simulated sets: its rows are then PCA's
                print(f"  harmonypy returned the PCs unchanged ({dataset}, seed {seed})", flush=True)
            emb = z
        b.obsm["X_emb"] = emb
        sc.pp.neighbors(b, use_rep="X_emb", random_state=seed)
        sc.tl.leiden(b, resolution=0.2, random_state=seed, flavor="igraph", n_iterations=-1, directed=False)
        clusters = b.obs["leiden"].to_numpy()
        out["time"] = time.perf_counter() - t0
    batch = adata.obs["batch"].to_numpy()
    return {**out, "emb": emb, "clusters": clusters, "batch": batch, "types": adata.obs["celltype"]}


def batch_table(
    datasets: list[str],
    methods: list[str],
    seeds: list[int],
    pretrain: int,
    maxiter: int,
    n_top_genes: int | None = None,
    json_path: Path | None = None,
    options: dict | None = None,
    variants: list[tuple[str, dict]] | None = None,
) -> None:
    """Batch mixing and conservation of the types: iLISI, kBET, other-batch share among 30-NN, ARI, K, batch
    entropy within the clusters; one row per (data set, method), the seeds' values side by side. ``variants``
    (label, keywords): the scembed and autoencoder methods again with those keywords of their function, in the
    same run (rows named ``method[label]``)."""
    import torch
    from _metrics import cluster_batch_entropy, ilisi, kbet, other_batch_share
    from sklearn.metrics import adjusted_rand_score

    import scembed as se

    torch.set_num_threads(1)
    se.settings.progress = False
    genes = "every gene with counts" if n_top_genes is None else f"n_top_genes={n_top_genes}"
    print(f"budget: max_epochs=({pretrain}, {maxiter}), {genes} (scembed); seeds {seeds}")
    if options:
        print(f"scembed: tl.scdeepcluster(..., **{json.dumps(options)})")
    lines, rows = [], []
    runs = []  # (row name, method, scDeepCluster keywords, autoencoder keywords)
    for method in methods:
        runs.append((method, method, options, None))
        if method.startswith(("scembed", "autoencoder")):
            for label, extra in variants or []:
                ae = method.startswith("autoencoder")
                runs.append(
                    (
                        f"{method}[{label}]",
                        method,
                        options if ae else {**(options or {}), **extra},
                        extra if ae else None,
                    )
                )
    for dataset in datasets:
        for name, method, run_options, ae_options in runs:
            cols: dict[str, list] = {}
            for seed in seeds:
                r = batch_run(method, dataset, seed, pretrain, maxiter, n_top_genes, run_options, ae_options)
                batch, types = np.asarray(r["batch"]).astype(str), np.asarray(r["types"]).astype(str)
                values = {
                    "ilisi": ilisi(r["emb"], batch),
                    "kbet": kbet(r["emb"], batch, types),
                    "other": other_batch_share(r["emb"], batch),
                    "ari": adjusted_rand_score(types, r["clusters"]),
                    "k": len(np.unique(r["clusters"])),
                    "entropy": cluster_batch_entropy(r["clusters"], batch),
                    "time": r["time"],
                }
                rounded = {k: round(float(v), 3) for k, v in values.items()}
                print(f"  {dataset} {name} seed {seed}: {json.dumps(rounded)}", flush=True)
                for key, v in values.items():
                    cols.setdefault(key, []).append(float(v))
                k_true = len(np.unique(types))
            rows.append({"dataset": dataset, "method": name, "k_true": k_true, "seeds": seeds, **cols})
            write_json(
                json_path,
                rows,
                script="scdeepcluster --batch",
                max_epochs=[pretrain, maxiter],
                seeds=seeds,
                scembed_options=options or {},
            )
            cells = [" / ".join(f"{v:.2f}" for v in cols[key]) for key in ("ilisi", "kbet", "other", "ari")]
            ks = "/".join(str(int(k)) for k in cols["k"])
            entropy = " / ".join(f"{v:.2f}" for v in cols["entropy"])
            lines.append(f"| {dataset} | {name} | {' | '.join(cells)} | {ks} ({k_true}) | {entropy} |")
    print("| data set | method | iLISI | kBET | other batch in 30-NN | ARI | K (true) | cluster batch entropy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced budget (50 / 200 epochs) and one seed")
    parser.add_argument("--pretrain-epochs", type=int, default=None)
    parser.add_argument("--maxiter", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--datasets", nargs="+", default=DATASETS)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=METHODS,
        choices=METHODS + EXTRA_METHODS + ORIGINAL_METHODS + BATCH_METHODS + EXTRA_BATCH_METHODS,
    )
    parser.add_argument("--n-top-genes", type=int, default=None, help="--batch: genes scembed uses (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="threads for every method (torch, BLAS, numba)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument(
        "--original-dir",
        type=Path,
        default=os.environ.get("SCDC_ORIGINAL"),
        help="folder with the original scDeepCluster_pytorch code (for original_k / original_auto)",
    )
    parser.add_argument(
        "--original-python",
        default=os.environ.get("SCDC_ORIGINAL_PYTHON"),
        help="interpreter for the original (default: ORIGINAL_DIR/venv/bin/python)",
    )
    parser.add_argument("--scale", type=int, default=0, help="time this many simulated cells instead")
    parser.add_argument("--scale-genes", type=int, default=2000)
    parser.add_argument("--scale-epochs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--step-compare", action="store_true", help="ms per training step vs the original's form")
    parser.add_argument("--step-profile", action="store_true", help="ms per part of scembed's pretraining step")
    parser.add_argument("--penalty-step", action="store_true", help="ms per batch-penalty call, mutual vs plain")
    parser.add_argument(
        "--minibatch-routes", action="store_true", help="ms per sparse mini-batch, per non-zero vs densified"
    )
    parser.add_argument(
        "--merge", type=Path, nargs="+", default=None, help="print the table of runs saved with --json (seeds pooled)"
    )
    parser.add_argument(
        "--resolutions", type=float, nargs="+", default=None, help="Leiden K/ARI on the pretrained latent space"
    )
    parser.add_argument(
        "--k-rules", action="store_true", help="label-free rules for K on the pretrained latent space (K_RULES)"
    )
    parser.add_argument(
        "--k-seed-consensus",
        action="store_true",
        help="K from several pretraining seeds (median; seed-stable resolution)",
    )
    parser.add_argument(
        "--label-structure",
        action="store_true",
        help="annotated types: size and 10-NN recall; purity of tl.scdeepcluster's clusters, K estimated and given",
    )
    parser.add_argument(
        "--batch",
        action="store_true",
        help="batch mixing: scDeepCluster with batch_key vs without, uncorrected PCA and Harmony (iLISI, kBET, ARI, K)",
    )
    parser.add_argument(
        "--pretrain-curve",
        action="store_true",
        help="KMeans/Leiden quality of the latent space and held-out loss along pretraining (--pretrain-epochs)",
    )
    parser.add_argument("--every", type=int, default=10, help="--pretrain-curve: epochs between checkpoints")
    parser.add_argument("--options", default="{}", help="--pretrain-curve: JSON of pretraining settings to change")
    parser.add_argument(
        "--cluster-curve",
        action="store_true",
        help="ARI along the clustering stage from pretraining --checkpoints, Adadelta --cluster-lrs (K given)",
    )
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[50, 300])
    parser.add_argument("--cluster-lrs", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument(
        "--scembed-options",
        default=None,
        help="JSON of tl.scdeepcluster keywords for the scembed methods, e.g. '{\"max_epochs\": null}'",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:JSON",
        help="also run the scembed methods with these keywords on top of --scembed-options, in the same run, as "
        'rows named \'method[LABEL]\' (repeatable), e.g. \'floor_noise1:{"scale": "floor", "noise": 1.0}\'; '
        "with --batch also the autoencoder methods, the keywords then tl.autoencoder's",
    )
    parser.add_argument("--worker", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, dataset, seed, pretrain, maxiter, threads = args.worker[:6]
        options = json.loads(args.worker[6]) if len(args.worker) > 6 else None
        print(json.dumps(worker(method, dataset, int(seed), int(pretrain), int(maxiter), int(threads), options)))
        return
    if args.step_compare:
        step_compare(args.datasets[0], args.threads)
        return
    if args.penalty_step:
        penalty_step(args.threads)
        return
    if args.step_profile:
        step_profile(args.datasets[0], args.threads)
        return
    if args.minibatch_routes:
        minibatch_routes(args.datasets, args.threads)
        return
    if args.scale:
        scale(args.scale, args.scale_genes, args.scale_epochs, args.device)
        return
    pretrain = args.pretrain_epochs or (50 if args.quick else 300)
    maxiter = args.maxiter or (200 if args.quick else 2000)
    if args.merge:  # e.g. seed 0 from one run and seeds 1 2 from another, same budget
        pooled: dict[tuple[str, str], dict] = {}
        for path in args.merge:
            saved = json.loads(path.read_text())
            for row in saved["rows"] if isinstance(saved, dict) else saved:  # older files: a bare list of rows
                key = (row["dataset"], row["method"])
                pooled.setdefault(key, {"dataset": key[0], "method": key[1], "runs": []})["runs"] += row["runs"]
        report(list(pooled.values()), pretrain, maxiter)
        by_method: dict[str, list[float]] = {}
        for row in pooled.values():  # each set's mean over its seeds, then the mean over the sets
            aris = [run["ari"] for run in row["runs"] if "ari" in run]
            if aris:
                by_method.setdefault(row["method"], []).append(float(np.mean(aris)))
        for method, means in by_method.items():
            print(f"{method}: mean ARI over {len(means)} sets {np.mean(means):.3f}")
        return
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    if args.batch:
        datasets = BATCH_DATASETS if args.datasets == DATASETS else args.datasets
        methods = BATCH_METHODS if args.methods == METHODS else args.methods
        options = json.loads(args.scembed_options or "{}")
        variants = parse_variants(args.variant)
        batch_table(datasets, methods, seeds, pretrain, maxiter, args.n_top_genes, args.json, options, variants)
        return
    if args.cluster_curve:
        cluster_curve_table(args.datasets, seeds, args.checkpoints, args.cluster_lrs, maxiter, args.threads, args.json)
        return
    if args.pretrain_curve:
        curve_table(args.datasets, seeds, pretrain, args.every, args.threads, json.loads(args.options), args.json)
        return
    if args.label_structure:
        label_structure(args.datasets, seeds, args.threads, args.json)
        return
    if args.k_seed_consensus:
        k_seed_consensus(args.datasets, seeds, pretrain, args.threads, args.json)
        return
    if args.resolutions or args.k_rules:
        resolutions = args.resolutions or []
        columns = [f"res {r:g}" for r in resolutions] + (list(K_RULES) if args.k_rules else [])
        keys = [str(r) for r in resolutions] + (list(K_RULES) if args.k_rules else [])
        print(f"On the latent space after {pretrain} pretraining epochs: K (ARI); seeds {seeds}")
        print("| data set (true K) | seed | " + " | ".join(columns) + " |")
        print("| --- | --- |" + " --- |" * len(columns))
        rows = []
        for dataset in args.datasets:
            for seed in seeds:
                res = resolution_sweep(dataset, seed, pretrain, resolutions, args.threads, rules=args.k_rules)
                rows.append({"dataset": dataset, "seed": seed, **res})
                cells = " | ".join("{} ({:.2f})".format(*res[key]) for key in keys)
                print(f"| {dataset} ({res['k_true']}) | {seed} | {cells} |", flush=True)
        if args.k_rules:
            print("\n| rule | Σ |K − true K| | runs within ±2 | mean ARI |\n| --- | --- | --- | --- |")
            for rule in K_RULES:
                err = [abs(r[rule][0] - r["k_true"]) for r in rows]
                ari = np.mean([r[rule][1] for r in rows])
                print(f"| {rule} | {sum(err)} | {sum(e <= 2 for e in err)} / {len(err)} | {ari:.3f} |")
        write_json(args.json, rows, script="scdeepcluster --k-rules", threads=args.threads)
        return
    print(f"budget: max_epochs=({pretrain}, {maxiter}); seeds {seeds}; {args.threads} thread(s)")
    if args.scembed_options:
        print(f"scembed: tl.scdeepcluster(..., **{args.scembed_options})")
    base_options = json.loads(args.scembed_options or "{}")
    variants = [("", base_options)]
    variants += [(label, {**base_options, **opts}) for label, opts in parse_variants(args.variant)]
    rows = []
    for dataset in args.datasets:
        for method in args.methods:
            for label, options in variants if method.startswith("scembed") else variants[:1]:
                name = f"{method}[{label}]" if label else method
                extra = [json.dumps(options)] if options and method.startswith("scembed") else []
                runs = []
                for seed in seeds:
                    res, rss = run_method(
                        [method, dataset, str(seed), str(pretrain), str(maxiter), str(args.threads), *extra],
                        args.threads,
                        None if args.original_dir is None else Path(args.original_dir),
                        args.original_python,
                    )
                    res["peak_mib"] = rss
                    runs.append(res)
                    print(f"  {dataset} {name} seed {seed}: {res}", flush=True)
                row = {"dataset": dataset, "method": name, "runs": runs}
                if label:
                    row["options"] = options
                rows.append(row)
            # written as it goes: a long run that is stopped keeps what it finished
            write_json(
                args.json,
                rows,
                script="scdeepcluster",
                max_epochs=[pretrain, maxiter],
                threads=args.threads,
                scembed_options=base_options,
            )
    report(rows, pretrain, maxiter)


def report(rows: list[dict], pretrain: int, maxiter: int) -> None:
    """Print the table (mean ± sd over the seeds of every row) and the comparisons with the original."""

    def mean(runs: list[dict], key: str) -> float:
        return float(np.mean([x[key] for x in runs]))

    print()
    print("| data set | method | ARI | NMI | K (true) | ARI at init | epochs | time (s) | peak RSS (MiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        r = row["runs"]
        ks = "/".join(str(x["k"]) for x in r)
        inits = [x["init_ari"] for x in r if x.get("init_ari") is not None]
        epochs = "/".join(str(x["epochs"]) for x in r) if "epochs" in r[0] else ""
        print(
            f"| {row['dataset']} | {row['method']} | {fmt([x['ari'] for x in r])} | {fmt([x['nmi'] for x in r])} | "
            f"{ks} ({r[0]['k_true']}) | {fmt(inits) if inits else ''} | {epochs} | {fmt([x['time'] for x in r], 1)} | "
            f"{max(x['peak_mib'] for x in r):.0f} |"
        )
    by = {(row["dataset"], row["method"]): row["runs"] for row in rows}
    pairs = [
        (d, mode) for (d, m) in by for mode in ("k", "auto") if m == f"scembed_{mode}" and (d, f"original_{mode}") in by
    ]
    if pairs:
        print("\nscembed vs the original in this run (means over the seeds): ARI and NMI difference, time ratio")
        print("| data set | K | ΔARI | ΔNMI | time scembed / original | peak RSS scembed / original |")
        print("| --- | --- | --- | --- | --- | --- |")
        for dataset, mode in pairs:
            mine, orig = by[(dataset, f"scembed_{mode}")], by[(dataset, f"original_{mode}")]
            label = "given" if mode == "k" else "automatic"
            print(
                f"| {dataset} | {label} | {mean(mine, 'ari') - mean(orig, 'ari'):+.3f} | "
                f"{mean(mine, 'nmi') - mean(orig, 'nmi'):+.3f} | {mean(mine, 'time') / mean(orig, 'time'):.2f} | "
                f"{mean(mine, 'peak_mib') / mean(orig, 'peak_mib'):.2f} |"
            )
    variant_keys = [(d, m) for (d, m) in by if "[" in m and (d, m.split("[")[0]) in by]
    if variant_keys:
        print("\nvariants against the same method without them in this run, paired by seed: ARI difference")
        print("| data set | method | ΔARI (mean) | ΔARI per seed | K per seed, without → with |")
        print("| --- | --- | --- | --- | --- |")
        for dataset, method in variant_keys:
            with_, without = by[(dataset, method)], by[(dataset, method.split("[")[0])]
            diffs = [a["ari"] - b["ari"] for a, b in zip(with_, without, strict=True)]
            ks = f"{'/'.join(str(x['k']) for x in without)} → {'/'.join(str(x['k']) for x in with_)}"
            print(f"| {dataset} | {method} | {np.mean(diffs):+.3f} | {', '.join(f'{d:+.3f}' for d in diffs)} | {ks} |")
    if pretrain == 50 and maxiter == 200:
        for (dataset, mode), ref in REFERENCE_ORIGINAL.items():
            mine = by.get((dataset, f"scembed_{mode}"))
            if mine:
                t = mean(mine, "time")
                extra = f", time {t:.0f} s vs ~{ref['time']:.0f} s (×{t / ref['time']:.2f})" if "time" in ref else ""
                print(
                    f"original (reference figures), {dataset}, {mode}: ARI {ref['ari']:.3f} / NMI {ref['nmi']:.3f}; "
                    f"scembed ARI {mean(mine, 'ari'):.3f} / NMI {mean(mine, 'nmi'):.3f}" + extra
                )


if __name__ == "__main__":
    main()
