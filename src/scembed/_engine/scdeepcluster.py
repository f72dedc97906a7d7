"""scDeepCluster: ZINB denoising autoencoder + deep embedded clustering (Tian et al. 2019), on count arrays.

The autoencoder stage is the count autoencoder of :mod:`scembed._engine.autoencoder` (network, training loop),
on the data of :mod:`scembed._engine.counts` and the ZINB loss of :mod:`scembed._engine.zinb`; this module holds
the clustering stage: :class:`ZINBAutoencoder` adds the cluster centres to the network; :func:`initial_clusters`
gives KMeans or Leiden centroids on the latent space; :func:`cluster` runs the joint ZINB + γ·KL(P‖Q) stage with
the Student-t soft assignment (:func:`soft_assign`) and its sharpened target (:func:`target_distribution`).
The names of the split-off parts stay importable from here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import sparse
from torch import nn

from .autoencoder import (
    Autoencoder,
    _one_of,
    _penalty_generator,
    _twice,
    _with_noise,
    embed,
    encode_all,
    pretrain,
    train_autoencoder,
)
from .counts import (
    INFER_BATCH,
    CountData,
    MiniBatch,
    _canonical_csr,
    _rows,
    epoch_batches,
    library_sizes,
    select_genes_by_zero_rate,
    training_blocks,
)
from .distributed import averaged_gradients, dec_assignments, rank_generator, shard
from .mmd import BatchPenalty
from .training import train
from .zinb import (
    DISP_MAX,
    DISP_MIN,
    MEAN_MAX,
    MEAN_MIN,
    _near_clamp,
    _ZINBLogits,
    zinb_heads,
    zinb_nll,
    zinb_nll_logits,
)

__all__ = [
    "DISP_MAX",
    "DISP_MIN",
    "INFER_BATCH",
    "MEAN_MAX",
    "MEAN_MIN",
    "CountData",
    "MiniBatch",
    "ZINBAutoencoder",
    "_ZINBLogits",
    "_canonical_csr",
    "_near_clamp",
    "_rows",
    "_with_noise",
    "assignments",
    "cluster",
    "embed",
    "encode_all",
    "fuzzy_connectivities",
    "infer",
    "initial_clusters",
    "kl_divergence",
    "leiden_labels",
    "library_sizes",
    "pretrain",
    "select_genes_by_zero_rate",
    "soft_assign",
    "target_distribution",
    "train_autoencoder",
    "zinb_heads",
    "zinb_nll",
    "zinb_nll_logits",
]


class ZINBAutoencoder(Autoencoder):
    """scDeepCluster's network: the ZINB count autoencoder with cluster centres.

    With ``n_batches`` > 0 the batch one-hot enters the decoder and, with ``batch_encoder`` (the original's
    batch model), the encoder. ``centroids`` holds the cluster centres of the clustering stage (empty before it).
    """

    def __init__(
        self,
        n_genes: int,
        z_dim: int = 32,
        hidden: Sequence[int] = (256, 64),
        n_batches: int = 0,
        *,
        batch_encoder: bool = False,
    ):
        super().__init__(n_genes, z_dim, hidden, n_batches, likelihood="zinb", batch_encoder=batch_encoder)
        self.centroids = nn.Parameter(torch.zeros(0, z_dim))

    def set_centroids(self, centroids: torch.Tensor) -> None:
        self.centroids = nn.Parameter(centroids.to(self.heads.weight_0))


# ----------------------------------------------------------------------------------------------------------------
# Clustering layer
# ----------------------------------------------------------------------------------------------------------------
def soft_assign(z: torch.Tensor, centroids: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Student-t soft assignment q_ij ∝ (1 + ‖z_i − μ_j‖² / α)^(−(α+1)/2)."""
    d2 = torch.cdist(z, centroids).square()
    q = (1.0 + d2 / alpha).pow(-(alpha + 1.0) / 2.0)
    return q / q.sum(1, keepdim=True)


def target_distribution(q: torch.Tensor, column_sums: torch.Tensor | None = None) -> torch.Tensor:
    """DEC target p_ij ∝ q_ij² / f_j with f_j = Σ_i q_ij; ``column_sums`` gives f when q is a mini-batch."""
    f = q.sum(0) if column_sums is None else column_sums
    p = q.square() / f
    return p / p.sum(1, keepdim=True)


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p_i ‖ q_i) (with the original's 1e-6 guard in the denominator)."""
    return torch.sum(p * torch.log(p / (q + 1e-6)), dim=1).mean()


@torch.no_grad()
def assignments(z: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft assignments Q and targets P of all cells, computed in chunks (P needs Q's column sums first)."""
    chunks = [soft_assign(z[s : s + INFER_BATCH], centroids) for s in range(0, z.shape[0], INFER_BATCH)]
    q = torch.cat(chunks)
    f = q.sum(0)
    p = torch.cat([target_distribution(q[s : s + INFER_BATCH], f) for s in range(0, q.shape[0], INFER_BATCH)])
    return q, p


def initial_clusters(
    z: np.ndarray,
    n_clusters: int,
    *,
    knn: int | None = None,
    resolution: float = 0.2,
    n_init: int = 20,
    random_state: int = 0,
    device: torch.device | str = "cpu",
    n_neighbors: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Initial labels and centroids: KMeans with ``n_clusters`` > 0, else Leiden on the latent kNN graph.

    The graph has scanpy's (UMAP's) fuzzy connectivities on the ``knn`` nearest neighbours (``knn`` counting
    the cell itself, as ``scanpy.pp.neighbors``; default 20; ``n_neighbors`` is the vocabulary's name for it),
    so that ``resolution`` means what it means in ``scanpy.tl.leiden``; the centroids are the clusters' means.
    """
    knn = 20 if knn is None and n_neighbors is None else _one_of(knn, n_neighbors, "knn", "n_neighbors")
    z = np.ascontiguousarray(z, dtype=np.float32)
    if n_clusters > 0:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters, n_init=n_init, random_state=random_state).fit(z)
        return km.labels_.astype(np.int64), km.cluster_centers_.astype(np.float32)
    labels = leiden_labels(z, knn=knn, resolution=resolution, random_state=random_state, device=device)
    k = labels.max() + 1
    counts = np.bincount(labels, minlength=k)
    centroids = np.zeros((k, z.shape[1]), dtype=np.float64)
    np.add.at(centroids, labels, z)
    return labels, (centroids / counts[:, None]).astype(np.float32)


def fuzzy_connectivities(indices: np.ndarray, distances: np.ndarray, n_neighbors: int) -> sparse.csr_matrix:
    """UMAP's fuzzy simplicial set of a kNN graph, computed by scanpy (``sc.pp.neighbors``'s connectivities).

    ``indices``/``distances`` hold every cell's nearest other cells; ``n_neighbors`` counts the cell itself,
    as in scanpy. See :func:`scembed._utils._neighbors.umap_connectivities`.
    """
    from .._utils._neighbors import umap_connectivities

    return umap_connectivities(indices, distances, n_neighbors)


def leiden_labels(
    z: np.ndarray, *, knn: int, resolution: float, random_state: int = 0, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Leiden (RB configuration model, weighted) on the fuzzy kNN graph of ``z``; labels by decreasing size."""
    import igraph as ig
    import leidenalg

    from .knn import nearest_neighbors

    k = min(knn - 1, z.shape[0] - 1)
    idx, dist, _ = nearest_neighbors(z, max(k, 1), device=device, random_state=random_state)
    G = sparse.triu(fuzzy_connectivities(idx, dist, k + 1), k=1).tocoo()
    graph = ig.Graph(n=z.shape[0], edges=np.column_stack([G.row, G.col]).tolist(), directed=False)
    graph.es["weight"] = G.data.tolist()
    part = leidenalg.find_partition(
        graph,
        leidenalg.RBConfigurationVertexPartition,
        weights="weight",
        resolution_parameter=resolution,
        n_iterations=-1,
        seed=int(random_state),
    )
    return np.asarray(part.membership, dtype=np.int64)


def cluster(
    net: ZINBAutoencoder,
    data: CountData,
    init_labels: np.ndarray,
    *,
    maxiter: int | None = None,
    batch_size: int,
    sigma: float | None = None,
    gamma: float,
    update_interval: int,
    tol: float,
    lr: float = 1.0,
    device: torch.device,
    generator: torch.Generator,
    noise_generator: torch.Generator,
    show_progress: bool | None = None,
    max_epochs: int | None = None,
    noise: float | None = None,
    batch_penalty: float = 0.0,
) -> tuple[dict[str, list[float]], bool]:
    """Joint stage: ZINB(noisy input) + γ·KL(P‖Q(clean input)), Adadelta(lr, ρ=0.95) on network and centroids.

    P is recomputed on all cells (in chunks) every ``update_interval`` epochs; training stops when the share
    of labels that changed since the previous update falls below ``tol``, or after ``maxiter`` epochs.
    ``max_epochs``/``noise`` are the vocabulary's names of ``maxiter``/``sigma`` (either may be given). Returns
    the history (total, zinb, kl, delta_label per update) and whether it converged.

    The mini-batches are read from ``data.X`` in row blocks, as in pretraining (:func:`~.counts.epoch_batches`:
    :data:`~.counts.READ_BLOCKS` blocks of :data:`~.counts.BLOCK_ROWS` rows in memory at a time, their rows
    shuffled), and P and the labels are recomputed from contiguous slices (:func:`encode_all`), so ``X`` may be
    on disk: only the N × K targets and the N labels are held for all cells. With every cell in one read (one
    process, at most ``READ_BLOCKS · BLOCK_ROWS`` cells) the batches are those of one permutation of all cells.
    """
    maxiter = _one_of(maxiter, max_epochs, "maxiter", "max_epochs")
    sigma = _one_of(sigma, noise, "sigma", "noise")
    opt = torch.optim.Adadelta(net.parameters(), lr=lr, rho=0.95)
    noise_generator = rank_generator(noise_generator)
    row_generator = rank_generator(generator)  # one process: the generator itself
    n = data.n_obs
    blocks = training_blocks(np.arange(n), batch_size)
    penalty = BatchPenalty(batch_penalty, data.n_batches, net.n_latent, device, _penalty_generator(noise_generator))
    net.eval()
    # targets from this rank's cells and all-reduced cluster sums, gathered (one process: assignments on all cells)
    _, p = dec_assignments(encode_all(net, data, device, rows=shard(n)), net.centroids.detach())
    state = {"p": p, "labels": torch.as_tensor(init_labels, device=device), "converged": False}
    deltas: list[float] = []

    def step(epoch: int) -> dict[str, float]:
        net.train()
        sums = torch.zeros(3, device=device)
        n_seen = 0
        for cells, (xin, raw, sf, onehot, nonzero) in epoch_batches(
            data, blocks, batch_size, generator, row_generator, device
        ):
            rows = torch.from_numpy(cells).to(device)  # the cells' rows of X: their targets in P
            noisy = _with_noise(xin, sigma, noise_generator)
            # one encoder pass over the noisy and the clean input together
            z = net.encode(torch.cat([noisy, xin]), _twice(onehot))
            z_noisy, z_clean = z.chunk(2)
            recon = zinb_nll_logits(net.decode(z_noisy, onehot), raw, sf, nonzero)
            kl = kl_divergence(state["p"][rows], soft_assign(z_clean, net.centroids))
            loss = recon + gamma * kl
            if penalty.active:
                loss = loss + penalty(z_clean, onehot, rows, recon)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums += torch.stack([loss.detach(), recon.detach(), kl.detach()]) * len(cells)
            n_seen += len(cells)
        if (epoch + 1) % update_interval == 0:
            net.eval()
            q, state["p"] = dec_assignments(encode_all(net, data, device, rows=shard(n)), net.centroids.detach())
            labels = q.argmax(1)
            delta = float((labels != state["labels"]).float().mean())
            state["labels"] = labels
            deltas.append(delta)
            state["converged"] = delta < tol
        total, recon, kl = (sums / max(n_seen, 1)).tolist()
        out = {"loss": total, "zinb": recon, "kl": kl}
        if penalty.active:
            out["batch_mmd"] = penalty.mean()
        return out

    def stop(epoch: int, losses) -> bool:
        return state["converged"]

    # under torchrun (distributed.py): gradients averaged over ranks before each step, the wide layers' while the
    # backward pass goes on (one backward per step)
    with averaged_gradients(opt, overlap=True):
        history, _ = train(step, maxiter, desc="scDeepCluster clustering", show_progress=show_progress, stop=stop)
    net.zero_grad(set_to_none=True)  # the last step's gradients are training state only
    history["delta_label"] = deltas
    return history, bool(state["converged"])


@torch.no_grad()
def infer(
    net: ZINBAutoencoder, data: CountData, device: torch.device, *, across_ranks: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Latent coordinates and soft assignments of every cell (float32 numpy).

    With ``across_ranks`` (a collective: every rank calls it), under ``torchrun`` each rank encodes (and reads) only
    its own share of the cells and the codes are gathered (:func:`embed`); one process: the same numbers.
    """
    net.eval()
    if across_ranks:
        z = torch.from_numpy(embed(net, data, device)).to(device)
    else:
        z = encode_all(net, data, device)
    q = assignments(z, net.centroids)[0] if net.centroids.shape[0] else torch.empty(z.shape[0], 0)
    return z.cpu().numpy(), q.cpu().numpy()
