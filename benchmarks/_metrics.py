"""Embedding quality metrics shared by the benchmarks (scikit-learn / scipy only)."""

from __future__ import annotations

import numpy as np
from scipy import stats
from scipy.stats import spearmanr
from sklearn.metrics import adjusted_rand_score, completeness_score, homogeneity_score
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors


def knn_preservation(X: np.ndarray, Y: np.ndarray, k: int = 10) -> float:
    """Mean share of each cell's k nearest neighbours in X that are also among its k nearest in Y."""
    nx = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X, return_distance=False)[:, 1:]
    ny = NearestNeighbors(n_neighbors=k + 1).fit(Y).kneighbors(Y, return_distance=False)[:, 1:]
    return float(np.mean([len(np.intersect1d(a, b, assume_unique=True)) / k for a, b in zip(nx, ny)]))


def knn_accuracy(Y: np.ndarray, labels: np.ndarray, k: int = 10, folds: int = 5) -> float:
    """Cross-validated accuracy of a k-NN classifier of the labels in the embedding."""
    return float(cross_val_score(KNeighborsClassifier(n_neighbors=k), Y, labels, cv=folds).mean())


def centroid_spearman(X: np.ndarray, Y: np.ndarray, labels: np.ndarray) -> float:
    """Spearman correlation between pairwise distances of label centroids in X and in Y (global structure)."""
    groups = np.unique(labels)
    cx = np.stack([np.asarray(X[labels == g].mean(0)).ravel() for g in groups])  # X dense or sparse
    cy = np.stack([Y[labels == g].mean(0) for g in groups])
    iu = np.triu_indices(len(groups), 1)
    dx = np.linalg.norm(cx[:, None] - cx[None], axis=-1)[iu]
    dy = np.linalg.norm(cy[:, None] - cy[None], axis=-1)[iu]
    return float(spearmanr(dx, dy).statistic)


def embedding_metrics(X: np.ndarray, Y: np.ndarray, labels: np.ndarray, k: int = 10) -> dict[str, float]:
    """kNN preservation, kNN accuracy and centroid-distance Spearman of embedding Y of data X."""
    return {
        "knn_pres": knn_preservation(X, Y, k),
        "knn_acc": knn_accuracy(Y, labels, k),
        "centroid_rho": centroid_spearman(X, Y, labels),
    }


# ------------------------------------------------------------------------------------------------ batch mixing
def _perplexity_weights(dist: np.ndarray, perplexity: float, n_steps: int = 60) -> np.ndarray:
    """Row-stochastic Gaussian weights on each row's neighbour distances, calibrated to ``perplexity`` (as LISI)."""
    d2 = dist.astype(np.float64) ** 2
    d2 = d2 - d2[:, :1]
    target = np.log(perplexity)
    beta, lo, hi = np.ones(len(d2)), np.zeros(len(d2)), np.full(len(d2), np.inf)
    for _ in range(n_steps):
        w = np.exp(-d2 * beta[:, None])
        p = w / w.sum(1, keepdims=True)
        entropy = -(p * np.log(np.maximum(p, 1e-300))).sum(1)
        too_flat = entropy > target  # sharpen: larger beta
        lo = np.where(too_flat, beta, lo)
        hi = np.where(too_flat, hi, beta)
        beta = np.where(np.isinf(hi), beta * 2, (lo + hi) / 2)
    return p


def ilisi(emb: np.ndarray, batch: np.ndarray, perplexity: float = 30, k: int = 90) -> float:
    """Integration LISI (Korsunsky et al. 2019), scaled as scib: (median inverse Simpson index − 1) / (B − 1).

    The inverse Simpson index of the batches among each cell's ``k`` nearest neighbours weighted by a Gaussian
    of perplexity ``perplexity``; 1 = batches as mixed as their proportions allow, 0 = no other batch nearby.
    """
    cats, codes = np.unique(np.asarray(batch), return_inverse=True)
    k = min(k, len(emb) - 1)
    dist, idx = NearestNeighbors(n_neighbors=k + 1).fit(emb).kneighbors(emb)
    p = _perplexity_weights(dist[:, 1:], min(perplexity, k / 3))
    shares = np.stack([(p * (codes[idx[:, 1:]] == b)).sum(1) for b in range(len(cats))], 1)
    return float((np.median(1.0 / (shares**2).sum(1)) - 1) / max(len(cats) - 1, 1))


def kbet(emb: np.ndarray, batch: np.ndarray, labels: np.ndarray, k: int = 25, alpha: float = 0.05) -> float:
    """kBET acceptance rate (Büttner et al. 2019) per cell type, averaged over the types.

    Within each type (its cells and their ``k`` nearest neighbours among the type's cells, as scib's per-label
    kBET), a cell is accepted when the χ² test of its neighbours' batch counts against the type's batch
    proportions does not reject at ``alpha``. 1 = mixed, 0 = separated.
    """
    codes = np.unique(np.asarray(batch), return_inverse=True)[1]
    n_batches = codes.max() + 1
    labels = np.asarray(labels)
    rates = []
    for t in np.unique(labels):
        m = labels == t
        share = np.bincount(codes[m], minlength=n_batches) / m.sum()
        present = share > 0
        if m.sum() <= k or present.sum() < 2:
            continue
        idx = NearestNeighbors(n_neighbors=k).fit(emb[m]).kneighbors(emb[m], return_distance=False)
        observed = np.stack([(codes[m][idx] == b).sum(1) for b in range(n_batches)], 1)[:, present]
        expected = share[present] * k
        chi2 = ((observed - expected) ** 2 / expected).sum(1)
        rates.append(float((stats.chi2.sf(chi2, present.sum() - 1) >= alpha).mean()))
    return float(np.mean(rates)) if rates else float("nan")


def other_batch_share(emb: np.ndarray, batch: np.ndarray, k: int = 30) -> float:
    """Mean share of other-batch cells among each cell's ``k`` nearest neighbours."""
    codes = np.unique(np.asarray(batch), return_inverse=True)[1]
    idx = NearestNeighbors(n_neighbors=k + 1).fit(emb).kneighbors(emb, return_distance=False)[:, 1:]
    return float((codes[idx] != codes[:, None]).mean())


def cluster_batch_entropy(clusters: np.ndarray, batch: np.ndarray) -> float:
    """Cell-weighted mean over clusters of the batch entropy within the cluster / log(B) (1 = mixed)."""
    codes = np.unique(np.asarray(batch), return_inverse=True)[1]
    n_batches = codes.max() + 1
    clusters = np.asarray(clusters)
    total = 0.0
    for c in np.unique(clusters):
        m = clusters == c
        p = np.bincount(codes[m], minlength=n_batches) / m.sum()
        p = p[p > 0]
        total += m.sum() * float(-(p * np.log(p)).sum() / np.log(n_batches))
    return total / len(clusters)


#: a cluster is "pure" when at least this share of its cells carry one annotated type
PURE_SHARE = 0.9


def cluster_purity(truth: np.ndarray, labels: np.ndarray) -> dict:
    """Homogeneity, completeness and the pure clusters (≥ :data:`PURE_SHARE` one type) of a clustering.

    ``split``: for every annotated type, the number of pure clusters in which it is the majority; a type with two
    or more was cut into groups that each hold (almost) only that type. ``shared``: the groups of two or more
    annotated types whose cells lie mostly in one and the same cluster (types merged by the clustering).
    """
    clusters = sorted(set(labels.tolist()))
    pure_majorities = []
    for cluster in clusters:
        types, counts = np.unique(truth[labels == cluster], return_counts=True)
        if counts.max() >= PURE_SHARE * counts.sum():
            pure_majorities.append((str(types[counts.argmax()]), int(counts.sum())))
    split = {str(t): sum(m == t for m, _ in pure_majorities) for t in sorted(set(truth))}
    home: dict[str, list[str]] = {}  # cluster → the types that have most of their cells in it
    for cell_type in sorted(set(truth)):
        found, counts = np.unique(labels[truth == cell_type], return_counts=True)
        home.setdefault(str(found[counts.argmax()]), []).append(str(cell_type))
    return {
        "k": len(clusters),
        "ari": float(adjusted_rand_score(truth, labels)),
        "homogeneity": float(homogeneity_score(truth, labels)),
        "completeness": float(completeness_score(truth, labels)),
        "pure_clusters": len(pure_majorities),
        "pure_share": sum(n for _, n in pure_majorities) / len(truth),
        "split": {t: n for t, n in split.items() if n >= 2},
        "shared": sorted(types for types in home.values() if len(types) >= 2),
    }
