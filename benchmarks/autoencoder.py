"""Benchmark of se.tl.autoencoder's latent space against PCA-50 of log-normalised counts (and scVI's latent).

For every real data set (``obs["celltype"]`` as truth; ``obs["batch"]`` given to the models where a set has
several batches), each method runs in a fresh subprocess, so that its wall time and peak memory (max RSS of that
process, read right after the embedding) are its own. Quality of each latent space: 10-NN classification accuracy
of the cell types (5-fold cross-validation), and ARI / NMI of Leiden clusters on its 15-NN graph at resolution 0.8
and at the resolution that gives the true number of types (found by bisection). On top of each latent space, openTSNE
and ``tl.neuralee`` (defaults) make 2-D maps, scored by 10-NN accuracy and by the Spearman correlation of cell-type
centroid distances with those in the log-normalised expression (one reference for all); ``--no-embed`` skips them.

scVI (``pip install scvi-tools``, in the ``bench`` extra) trains, on each set and seed, for as many epochs as
``tl.autoencoder`` ran there (its early stopping decides), unless ``--max-epochs`` sets one count for all or
``--scvi-epochs default`` gives scVI its own rule; the table prints each method's time per epoch.

    python benchmarks/autoencoder.py                                  # every set in --data-dir, defaults
    python benchmarks/autoencoder.py --max-epochs 2 --datasets pbmc_10x_2100   # a quick check that it runs
    python benchmarks/autoencoder.py --scale 1000000 --max-epochs 3  # simulated 1M cells × 2,000 genes (sparse):
                                                                      # time per epoch and peak RSS
    python benchmarks/autoencoder.py --scale 1000000 --max-epochs 3 --backed sim_1m.h5ad
                                      # the same cells written to an .h5ad first, trained from it backed (X on disk)
    python benchmarks/autoencoder.py --save-latents latents && python benchmarks/autoencoder.py --rescore latents
                                      # how each latent space's Leiden clusters at 0.8 split or mix the types
    python benchmarks/autoencoder.py --rescore latents --rescore-true-k
                                      # Leiden and KMeans at the true K on the same spaces: what each splits or merges
    python benchmarks/autoencoder.py --seeds 0 1 --variant noise0.5:noise=0.5 --variant hvg:n_top_genes=1000
                                      # the defaults and candidate settings side by side (one table, every seed)

``--variant NAME:KEY=VALUE[,KEY=VALUE...]`` adds an autoencoder run with those keyword arguments of
``se.tl.autoencoder`` (values read as JSON, else as strings); the defaults always run too (``autoencoder``).
``--in-process`` runs everything in this one process (imports and JIT compilation paid once: for studies of
quality; its time and RSS columns are then not each method's own).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy import sparse

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _runner import write_json  # noqa: E402

DATA = HERE.parent.parent / "shared" / "data"
METHODS = ["autoencoder", "pca", "scvi"]


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _latent_adata(latent: np.ndarray):
    """An AnnData that holds only ``latent``, as ``obsm["X_latent"]``, for scanpy and scembed to work on."""
    import anndata as ad

    tmp = ad.AnnData(np.zeros((latent.shape[0], 1), dtype=np.float32))
    tmp.obsm["X_latent"] = latent
    return tmp


def _leiden_on(latent: np.ndarray, seed: int):
    """Leiden clusters of the 15-NN graph of ``latent``: a function of the resolution (one graph for all)."""
    import scanpy as sc

    tmp = _latent_adata(latent)
    sc.pp.neighbors(tmp, n_neighbors=15, use_rep="X_latent", random_state=seed)

    def leiden(resolution: float) -> np.ndarray:
        sc.tl.leiden(tmp, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=-1, directed=False)
        return tmp.obs["leiden"].to_numpy()

    return leiden


def _leiden_at_k(leiden, k_true: int) -> tuple[float, int, np.ndarray]:
    """The resolution (bisection), K and labels of ``leiden`` (:func:`_leiden_on`) closest to ``k_true`` clusters."""
    lo, hi, best = 0.01, 5.0, None
    for _ in range(25):
        mid = (lo + hi) / 2
        labels = leiden(mid)
        k = len(set(labels))
        if best is None or abs(k - k_true) < abs(best[1] - k_true):
            best = (mid, k, labels)
        if k == k_true:
            break
        lo, hi = (mid, hi) if k < k_true else (lo, mid)
    return best


def _leiden_scores(latent: np.ndarray, truth: np.ndarray, seed: int) -> dict:
    """ARI/NMI of Leiden at resolution 0.8 and at the resolution giving the true K (:func:`_leiden_at_k`)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    leiden = _leiden_on(latent, seed)

    def scores(labels: np.ndarray) -> tuple[float, float]:
        return float(adjusted_rand_score(truth, labels)), float(normalized_mutual_info_score(truth, labels))

    out = {}
    labels_08 = leiden(0.8)
    out["ari_08"], out["nmi_08"] = scores(labels_08)
    out["k_08"] = len(set(labels_08))
    out["resolution_k"], out["k_found"], labels_k = _leiden_at_k(leiden, len(set(truth)))
    out["ari_k"], out["nmi_k"] = scores(labels_k)
    return out


def worker(spec: dict) -> dict:
    """One method on one data set: the latent space, its time and peak RSS, then its scores."""
    import anndata as ad
    import torch

    torch.set_num_threads(spec["threads"])
    adata = ad.read_h5ad(spec["path"])
    if spec.get("dense") and hasattr(adata.X, "toarray"):  # every method gets the same dense matrix
        adata.X = adata.X.toarray()
    ae_kwargs = spec.get("ae_kwargs") or {}
    truth = adata.obs["celltype"].astype(str).to_numpy()
    batch_key = "batch" if "batch" in adata.obs and adata.obs["batch"].nunique() > 1 else None
    seed, method, max_epochs = spec["seed"], spec["method"], spec["max_epochs"]
    out: dict = {"n_obs": adata.n_obs, "n_vars": adata.n_vars}
    reference = _log_normalised(adata.X) if spec.get("embed") else None  # before any method changes adata.X
    t0 = time.perf_counter()
    if method == "autoencoder":
        import scembed as se

        se.tl.autoencoder(
            adata, batch_key=batch_key, max_epochs=max_epochs, device=spec["device"], random_state=seed,
            show_progress=False, **ae_kwargs,
        )  # fmt: skip
        latent = adata.obsm["X_autoencoder"]
        out["epochs"] = adata.uns["autoencoder"]["n_epochs"]
    elif method == "pca":
        import scanpy as sc

        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        sc.pp.pca(adata, n_comps=min(50, adata.n_vars - 1, adata.n_obs - 1), random_state=seed)
        latent = adata.obsm["X_pca"]
    elif method == "scvi":
        try:
            import scvi
        except ImportError:
            return {"skipped": "scvi-tools is not installed"}
        scvi.settings.seed = seed
        scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
        model = scvi.model.SCVI(adata)
        model.train(max_epochs=max_epochs, enable_progress_bar=False)
        latent = model.get_latent_representation()
        out["epochs"] = len(model.history["elbo_train"])
    else:
        raise ValueError(f"unknown method {method!r}")
    out["time"] = time.perf_counter() - t0
    out["rss_gb"] = _peak_rss_gb()
    from _metrics import knn_accuracy

    latent = np.ascontiguousarray(latent, dtype=np.float32)
    out["knn_acc"] = knn_accuracy(latent, truth, k=10, folds=5)
    out.update(_leiden_scores(latent, truth, seed))
    out["k_true"] = len(set(truth))
    if spec.get("embed"):
        out.update(_embedding_scores(latent, truth, reference, seed, spec["threads"]))
    if spec.get("save_latents"):
        np.save(Path(spec["save_latents"]) / f"{Path(spec['path']).stem}_{spec['label']}_seed{seed}.npy", latent)
    return out


def _log_normalised(X) -> sparse.csr_matrix:
    """log1p of counts per 10,000 (scanpy's normalize_total + log1p) of a copy of ``X``, sparse."""
    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(sparse.csr_matrix(X, dtype=np.float64))
    sc.pp.normalize_total(tmp, target_sum=1e4)
    sc.pp.log1p(tmp)
    return tmp.X


def _embedding_scores(latent: np.ndarray, truth: np.ndarray, reference, seed: int, threads: int) -> dict:
    """openTSNE and tl.neuralee (defaults) on the latent space: 10-NN accuracy and centroid ρ of each 2-D map.

    The centroid ρ compares the cell-type centroid distances of the map with those in the log-normalised
    expression (``reference``, the same for every latent space), so that the maps of all methods are scored
    against one layout.
    """
    import openTSNE
    from _metrics import centroid_spearman, knn_accuracy

    import scembed as se

    out = {}
    t0 = time.perf_counter()
    tsne = np.asarray(openTSNE.TSNE(n_jobs=threads, random_state=seed).fit(latent))
    out["tsne_time"] = time.perf_counter() - t0
    tmp = _latent_adata(latent)
    t0 = time.perf_counter()
    se.tl.neuralee(tmp, use_rep="X_latent", random_state=seed, show_progress=False)
    out["neuralee_time"] = time.perf_counter() - t0
    for name, Y in (("tsne", tsne), ("neuralee", tmp.obsm["X_neuralee"])):
        out[f"{name}_acc"] = knn_accuracy(Y, truth, k=10, folds=5)
        out[f"{name}_rho"] = centroid_spearman(reference, Y, truth)
    return out


def scale_worker(spec: dict) -> dict:
    """tl.autoencoder on N simulated cells × 2,000 genes (sparse counts): time per epoch and peak RSS.

    With ``write``, only simulate the cells and write them to that .h5ad; with ``backed``, read that file with
    ``backed="r"`` instead of simulating (X stays on disk), so that the peak RSS is the training's alone.
    """
    import anndata
    import torch

    import scembed as se

    torch.set_num_threads(spec["threads"])
    if spec.get("backed"):
        adata = anndata.read_h5ad(spec["backed"], backed="r")
    else:
        adata = se.datasets.simulate(spec["n_cells"], 2000, n_celltypes=10, random_state=spec["seed"])
    if spec.get("write"):
        adata.write_h5ad(spec["write"])
        return {"written": spec["write"]}
    rss_data = _peak_rss_gb()
    t0 = time.perf_counter()
    se.tl.autoencoder(
        adata, max_epochs=spec["max_epochs"], device=spec["device"], random_state=spec["seed"], show_progress=False
    )
    elapsed = time.perf_counter() - t0
    n_epochs = adata.uns["autoencoder"]["n_epochs"]
    return {"time": elapsed, "epochs": n_epochs, "rss_gb": _peak_rss_gb(), "rss_data_gb": rss_data}


def effective_dimension(latent: np.ndarray) -> float:
    """Participation ratio of the latent space's covariance eigenvalues λ: (Σλ)² / Σλ².

    1 when all the variance lies along one direction, the number of dimensions when it is spread evenly over them.
    """
    centred = latent - latent.mean(0)
    eig = np.linalg.svd(centred.astype(np.float64), compute_uv=False) ** 2
    return float(eig.sum() ** 2 / (eig**2).sum())


def _saved_latents(folder: Path, data_dir: Path):
    """Every latent space saved by ``--save-latents`` in ``folder``: (data set, method, seed, cell types, latent)."""
    import anndata as ad

    by_length = sorted(data_dir.glob("*.h5ad"), key=lambda p: -len(p.stem))  # the longest matching name wins
    truths: dict[str, np.ndarray] = {}  # each data set's cell types, read once for all its methods and seeds
    for path in sorted(folder.glob("*.npy")):
        stem, _, seed = path.stem.rpartition("_seed")
        name = next((p.stem for p in by_length if stem.startswith(p.stem + "_")), None)
        if name is None:
            continue
        if name not in truths:
            truths[name] = ad.read_h5ad(data_dir / f"{name}.h5ad", backed="r").obs["celltype"].astype(str).to_numpy()
        yield name, stem[len(name) + 1 :], seed, truths[name], np.load(path)


def rescore(folder: Path, data_dir: Path, pca_dims: list[int], controls: bool = False) -> None:
    """Leiden at resolution 0.8 on every latent space saved by ``--save-latents``: K, ARI, homogeneity, completeness.

    Homogeneity is high when every cluster holds one cell type, completeness when every cell type is one cluster:
    a space that Leiden cuts too finely at this resolution loses completeness, one that mixes types homogeneity.
    "eff. dims" is the space's :func:`effective_dimension`. Each PCA-50 space is also scored on its first d
    components for every d in ``pca_dims`` (rows ``pca[:d]``), to show how Leiden at a fixed resolution cuts a space
    of few effective dimensions.

    ``controls``: spaces with variance that has no structure added, to test whether that alone makes Leiden cut a
    graph coarser at a fixed resolution. Each PCA-50 space's first 10 components with the other 40 replaced by the
    same 40 columns each shuffled across cells (``pca[:10]+shuffled[10:]``: the same variances, no structure) or by
    isotropic Gaussian noise of the same total variance (``pca[:10]+noise40``); every other space with isotropic
    Gaussian noise added whose total variance is 10, 30 or 100 % of the space's (``+noise0.3`` ...). Seeded by the
    run's seed.
    """
    from _metrics import cluster_purity

    print("| data | method | seed | eff. dims | K true | K at 0.8 | ARI (0.8) | homogeneity | completeness |")
    print("|" + " --- |" * 9)
    for name, method, seed, truth, latent in _saved_latents(folder, data_dir):
        spaces = [(method, latent)]
        if method == "pca":
            spaces += [(f"pca[:{d}]", latent[:, :d]) for d in pca_dims if d < latent.shape[1]]
        if controls:
            spaces += _control_spaces(method, latent, int(seed))
        for label, space in spaces:
            purity = cluster_purity(truth, _leiden_on(space, int(seed))(0.8))
            print(
                f"| {name} | {label} | {seed} | {effective_dimension(space):.1f} | {len(set(truth))} "
                f"| {purity['k']} | {purity['ari']:.3f} | {purity['homogeneity']:.3f} | {purity['completeness']:.3f} |"
            )


def rescore_true_k(folder: Path, data_dir: Path) -> None:
    """Every latent space saved by ``--save-latents`` clustered into the true number of types two ways.

    Leiden at the resolution that gives the true K (the bisection of the main table, the same seed) and KMeans with
    the true K (20 starts): each clustering's ARI, and which annotated types it cuts into several pure clusters
    ("split") or puts mostly into one cluster together ("shared"), by :func:`_metrics.cluster_purity`; then both
    ARIs' means over the seeds of each data set and method.
    """
    from _metrics import cluster_purity
    from sklearn.cluster import KMeans

    def describe(purity: dict) -> str:
        split = ", ".join(f"{t} into {n}" for t, n in purity["split"].items())
        shared = ", ".join("+".join(types) for types in purity["shared"])
        return " ".join(filter(None, [split and f"split: {split}", shared and f"shared: {shared}"])) or "–"

    print("| data | method | seed | ARI, Leiden at true K | its clusters | ARI, KMeans at true K | its clusters |")
    print("|" + " --- |" * 7)
    aris: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for name, method, seed, truth, latent in _saved_latents(folder, data_dir):
        k_true = len(set(truth))
        by_leiden = cluster_purity(truth, _leiden_at_k(_leiden_on(latent, int(seed)), k_true)[2])
        by_kmeans = cluster_purity(truth, KMeans(k_true, n_init=20, random_state=int(seed)).fit_predict(latent))
        aris.setdefault((name, method), []).append((by_leiden["ari"], by_kmeans["ari"]))
        print(
            f"| {name} | {method} | {seed} | {by_leiden['ari']:.3f} ({by_leiden['k']}) | "
            f"{describe(by_leiden)} | {by_kmeans['ari']:.3f} | {describe(by_kmeans)} |",
            flush=True,
        )
    print("\n| data | method | seeds | ARI, Leiden at true K (mean) | ARI, KMeans at true K (mean) |")
    print("|" + " --- |" * 5)
    for (name, method), values in aris.items():
        leiden_mean, kmeans_mean = np.mean(values, axis=0)
        print(f"| {name} | {method} | {len(values)} | {leiden_mean:.3f} | {kmeans_mean:.3f} |")


def _control_spaces(method: str, latent: np.ndarray, seed: int) -> list[tuple[str, np.ndarray]]:
    """The ``controls`` of :func:`rescore`: ``latent`` with structureless variance added or put in."""
    rng = np.random.default_rng(seed)
    if method == "pca":
        head, tail = latent[:, :10], latent[:, 10:]
        shuffled = np.stack([rng.permutation(column) for column in tail.T], axis=1)
        noise = rng.normal(size=tail.shape) * np.sqrt(tail.var(0).sum() / tail.shape[1])
        return [
            ("pca[:10]+shuffled[10:]", np.hstack([head, shuffled]).astype(np.float32)),
            (f"pca[:10]+noise{tail.shape[1]}", np.hstack([head, noise]).astype(np.float32)),
        ]
    total = latent.var(0).sum()
    out = []
    for share in (0.1, 0.3, 1.0):
        noise = rng.normal(size=latent.shape) * np.sqrt(share * total / latent.shape[1])
        out.append((f"{method}+noise{share:g}", (latent + noise).astype(np.float32)))
    return out


def _parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:KEY=VALUE,KEY=VALUE`` → (name, keyword arguments); values as JSON where they parse, else strings.

    Commas inside brackets belong to the value (``hidden=[512,128]``).
    """
    name, _, body = text.partition(":")
    kwargs = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", body)):
        key, _, value = item.partition("=")
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value
    return name, kwargs


def _run(spec: dict, in_process: bool = False) -> dict:
    if in_process:
        try:
            return worker(spec)
        except Exception as err:  # reported on stderr; the study goes on
            return {"error": f"{type(err).__name__}: {err}"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["(no output)"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(value, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def print_means(files: list[Path]) -> None:
    """Mean (± sd) over seeds of 10-NN accuracy, ARI at the true K and ARI at resolution 0.8, per set and method."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for path in files:
        data = json.loads(path.read_text())
        for r in data["rows"] if isinstance(data, dict) else data:
            groups.setdefault((r["dataset"], r["method"]), []).append(r)
    print("| data | method | seeds | 10-NN acc. | ARI (true K) | ARI 0.8 | K at 0.8 | s / epoch |")
    print("|" + " --- |" * 8)
    for (name, method), runs in sorted(groups.items()):
        cells = []
        for key in ("knn_acc", "ari_k", "ari_08"):
            v = np.array([r[key] for r in runs], dtype=float)
            cells.append(f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v[0]:.3f}")
        ks = "/".join(str(r.get("k_08", "–")) for r in runs)
        seeds = ",".join(str(r["seed"]) for r in runs)
        per_epoch = [r["time"] / r["epochs"] for r in runs if r.get("epochs")]
        speed = f"{np.mean(per_epoch):.2f}" if per_epoch else "–"
        print(f"| {name} | {method} | {seeds} | {' | '.join(cells)} | {ks} | {speed} |")
    print("\nMean over the data sets of each method's means (10-NN acc. / ARI true K / ARI 0.8):")
    for method in sorted({m for _, m in groups}):
        per_set = [runs for (_, m), runs in groups.items() if m == method]
        means = [
            np.mean([np.mean([r[key] for r in runs]) for runs in per_set]) for key in ("knn_acc", "ari_k", "ari_08")
        ]
        print(f"  {method}: " + " / ".join(f"{v:.3f}" for v in means) + f" ({len(per_set)} sets)")


def gene_spread(names: list[str], data_dir: Path) -> None:
    """Each gene's standard deviation in the encoder input of ``scale="global"``, in units of their root mean square.

    The input noise of ``tl.autoencoder`` is in the same units; the table says how many genes vary more than a noise
    of 1 (the default) and of 2.5 (scDeepCluster's, set for z-scored genes).
    """
    import anndata as ad
    import torch

    from scembed._engine.counts import CountData

    print("| data | genes | median gene sd | 90th percentile | genes with sd > 1 | genes with sd > 2.5 |")
    print("|" + " --- |" * 6)
    for name in names:
        adata = ad.read_h5ad(data_dir / f"{name}.h5ad")
        X = adata.X if sparse.issparse(adata.X) else np.asarray(adata.X)
        data = CountData.fit(X, np.arange(adata.n_vars), scale="global")
        # the spread of every gene in the encoder input itself (a gene without variance stays at 0), in row blocks
        total, total_sq = np.zeros(adata.n_vars), np.zeros(adata.n_vars)
        for start in range(0, adata.n_obs, 2048):
            xin = data.batch(np.arange(start, min(start + 2048, adata.n_obs)), torch.device("cpu")).xin.double()
            total += xin.sum(0).numpy()
            total_sq += (xin**2).sum(0).numpy()
        sd = np.sqrt(np.maximum(total_sq - total**2 / adata.n_obs, 0.0) / (adata.n_obs - 1))
        print(
            f"| {name} | {adata.n_vars:,} | {np.median(sd):.2f} | {np.quantile(sd, 0.9):.2f} | {np.mean(sd > 1):.1%} "
            f"| {np.mean(sd > 2.5):.1%} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DATA, help="folder of .h5ad files (default ../shared/data)")
    parser.add_argument("--datasets", nargs="+", default=None, help="names without .h5ad (default: every file)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--max-epochs", type=int, default=None, help="training epochs (default: each tool's own)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="random seeds (each runs every method)")
    parser.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE,... autoencoder settings")
    parser.add_argument("--variants-only", action="store_true", help="skip the autoencoder at its defaults")
    parser.add_argument(
        "--no-embed", action="store_true", help="skip openTSNE and tl.neuralee on each latent space (faster)"
    )
    parser.add_argument("--save-latents", type=Path, default=None, help="folder for each latent space (.npy)")
    parser.add_argument(
        "--rescore", type=Path, default=None,
        help="folder of --save-latents output: K, ARI, homogeneity and completeness of Leiden at 0.8 (no training)",
    )  # fmt: skip
    parser.add_argument(
        "--rescore-pca-dims", type=int, nargs="+", default=[3, 5, 10, 20],
        help="with --rescore: also score each PCA-50 space on its first d components, for each d",
    )  # fmt: skip
    parser.add_argument(
        "--scvi-epochs", choices=["same", "default"], default="same",
        help="scVI's epochs without --max-epochs: those tl.autoencoder ran on the set (default) or scVI's own rule",
    )  # fmt: skip
    parser.add_argument("--in-process", action="store_true", help="run every method in this process")
    parser.add_argument(
        "--rescore-true-k", action="store_true",
        help="with --rescore: Leiden and KMeans at the true K on each space, which types they split or merge",
    )  # fmt: skip
    parser.add_argument(
        "--rescore-controls", action="store_true",
        help="with --rescore: also score each space with structureless variance added (see rescore's docstring)",
    )  # fmt: skip
    parser.add_argument("--dense", action="store_true", help="give every method the counts as a dense array")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--scale", type=int, default=None, help="simulated N-cell run (time per epoch, peak RSS)")
    parser.add_argument("--backed", type=Path, default=None, help="with --scale: write the cells here, train backed")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument(
        "--means", type=Path, nargs="+", default=None, help="print the mean over seeds of these --json files and exit"
    )
    parser.add_argument(
        "--gene-spread", action="store_true", help="print each set's gene spreads under scale='global' and exit"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(scale_worker(spec) if "n_cells" in spec else worker(spec)))
        return
    if args.rescore and args.rescore_true_k:
        rescore_true_k(args.rescore, args.data_dir)
        return
    if args.rescore:
        rescore(args.rescore, args.data_dir, args.rescore_pca_dims, args.rescore_controls)
        return
    if args.means:
        print_means(args.means)
        return
    if args.gene_spread:
        gene_spread(args.datasets or sorted(p.stem for p in args.data_dir.glob("*.h5ad")), args.data_dir)
        return
    common = {"seed": args.seeds[0], "threads": args.threads, "device": args.device}
    if args.scale:
        spec = {**common, "n_cells": args.scale, "max_epochs": args.max_epochs or 3}
        if args.backed:  # simulated and written by another process, so that its memory is not counted
            res = _run({**spec, "write": str(args.backed)})
            if "error" in res:
                sys.exit(f"writing {args.backed} failed: {res['error']}")
            spec["backed"] = str(args.backed)
        res = _run(spec)
        if "error" in res:
            sys.exit(f"scale run failed: {res['error']}")
        write_json(args.json, [{"n_cells": args.scale, "n_genes": 2000, **spec, **res}], threads=args.threads)
        print(
            f"{args.scale} cells × 2000 genes, {res['epochs']} epochs: {res['time'] / max(res['epochs'], 1):.1f} s "
            f"per epoch (setup included), peak RSS {res['rss_gb']:.2f} GB ({res['rss_data_gb']:.2f} GB after "
            + ("opening the backed file)" if args.backed else "simulating the data)")
        )
        return

    if args.save_latents is not None:
        args.save_latents.mkdir(parents=True, exist_ok=True)
    names = args.datasets or sorted(p.stem for p in args.data_dir.glob("*.h5ad"))
    runs = []  # (label, method, autoencoder kwargs)
    for method in args.methods:
        if not (method == "autoencoder" and args.variants_only):
            runs.append((method, method, {}))
        if method == "autoencoder":
            runs += [(f"autoencoder[{n}]", method, kw) for n, kw in map(_parse_variant, args.variant)]
    rows = []
    for name in names:
        path = args.data_dir / f"{name}.h5ad"
        if not path.exists():
            print(f"{name}: {path} not found, skipped", file=sys.stderr)
            continue
        for seed in args.seeds:
            ae_epochs = None  # epochs of tl.autoencoder (defaults) on this set and seed, for scVI
            for label, method, kwargs in runs:
                max_epochs = args.max_epochs
                if method == "scvi" and max_epochs is None and args.scvi_epochs == "same":
                    max_epochs = ae_epochs
                spec = {
                    **common, "seed": seed, "path": str(path), "method": method, "max_epochs": max_epochs,
                    "label": label, "embed": not args.no_embed, "dense": args.dense,
                    "save_latents": None if args.save_latents is None else str(args.save_latents),
                }  # fmt: skip
                res = _run({**spec, "ae_kwargs": kwargs}, args.in_process)
                if "skipped" in res or "error" in res:
                    print(f"{name} / {label}: {res.get('skipped') or res.get('error')}", file=sys.stderr)
                    continue
                rows.append({"dataset": name, "method": label, "seed": seed, "settings": kwargs, **res})
                if label == "autoencoder":
                    ae_epochs = res["epochs"]
                print(f"{name} / {label} / seed {seed}: done in {res['time']:.1f} s", file=sys.stderr)
                # written after every run, so that an interrupted study keeps what it has
                write_json(args.json, rows, threads=args.threads)
    print(
        "| data | method | seed | epochs | 10-NN acc. | ARI (0.8) | NMI (0.8) | K at 0.8 | K true / found "
        "| ARI (true K) | NMI (true K) | time (s) | s / epoch | peak RSS (GB) |"
    )
    print("|" + " --- |" * 14)
    for r in rows:
        per_epoch = r["time"] / r["epochs"] if r.get("epochs") else None
        print(
            f"| {r['dataset']} | {r['method']} | {r['seed']} | {r.get('epochs', '–')} | {_fmt(r['knn_acc'])} "
            f"| {_fmt(r['ari_08'])} | {_fmt(r['nmi_08'])} | {r.get('k_08', '–')} | {r['k_true']} / {r['k_found']} "
            f"| {_fmt(r['ari_k'])} | {_fmt(r['nmi_k'])} | {_fmt(r['time'], '.1f')} | {_fmt(per_epoch, '.2f')} "
            f"| {_fmt(r['rss_gb'], '.2f')} |"
        )
    if any("tsne_acc" in r for r in rows):
        print("\n2-D maps of each latent space (10-NN acc. / centroid ρ against the log-normalised expression):\n")
        print("| data | method | seed | openTSNE | tl.neuralee |")
        print("|" + " --- |" * 5)
        for r in rows:
            if "tsne_acc" in r:
                print(
                    f"| {r['dataset']} | {r['method']} | {r['seed']} | {_fmt(r['tsne_acc'])} / {_fmt(r['tsne_rho'])} "
                    f"| {_fmt(r['neuralee_acc'])} / {_fmt(r['neuralee_rho'])} |"
                )


if __name__ == "__main__":
    main()
