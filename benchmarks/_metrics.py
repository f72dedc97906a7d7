"""Embedding quality metrics shared by the benchmarks (scikit-learn / scipy only)."""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr
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
    cx = np.stack([X[labels == g].mean(0) for g in groups])
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
