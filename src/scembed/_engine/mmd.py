"""Batch alignment of a latent space: the maximum mean discrepancy (MMD) between the batches' codes.

The penalty that keeps batch information out of a count autoencoder's latent space (as in trVAE, Lotfollahi et
al., Bioinformatics 2020): the squared MMD (Gretton et al., JMLR 2012) between the latent codes of every two
batches, under a Gaussian kernel averaged over bandwidths around the median heuristic, and weighted by the number
of cell pairs the two batches form.

Per-batch standardisation of the encoder input (``counts.CountData``) already removes a batch's shift and scale of
each gene; what it leaves (a protocol that changes the relations between genes) is what this penalty aligns. To
leave alone what is already aligned, :class:`BatchPenalty` penalises only the part of the discrepancy that a
permutation test would call significant: the statistic minus the mean plus two standard deviations of the same
statistic with the batch labels shuffled. Batches that are as mixed as random labels get no gradient, so the
penalty does not push sampling noise (each mini-batch's chance share of every cell type) into the latent space.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: bandwidths of the multi-scale kernel, as multiples of the median squared distance: from a quarter (local
#: structure) to four times (a global shift), so that one kernel sees both kinds of batch effect
SCALES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
#: codes of the most recent cells kept as the reference sample (a few mini-batches' worth)
BANK_SIZE = 2048
#: shuffles of the batch labels per step for the null distribution, and the null's standard deviations allowed
#: above its mean (a one-sided test at about the 2.5 % level) before the penalty acts
PERMUTATIONS = 8
NULL_SDS = 2.0
#: smallest kernel exponent: e^-50 ≈ 2e-22 is still a normal float32 (subnormals start below e^-87)
EXPONENT_FLOOR = -50.0


def squared_distances(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``x`` and of ``y`` (default ``x``), never negative.

    From ‖x‖² + ‖y‖² − 2 x·y (one matrix product); unlike ``torch.cdist`` it has a finite gradient at distance 0.
    """
    y = x if y is None else y
    d2 = x.square().sum(1, keepdim=True) + y.square().sum(1) - 2.0 * (x @ y.T)
    return d2.clamp_min(0.0)


def gaussian_kernel(
    d2: torch.Tensor, bandwidth: torch.Tensor | float, scales: Sequence[float] = SCALES
) -> torch.Tensor:
    """Mean over ``scales`` of exp(−d² / (s · ``bandwidth``)): values in (0, 1], 1 at distance 0.

    Exponents are floored at :data:`EXPONENT_FLOOR`: below it exp() gives subnormal floats, which are many times
    slower to compute with on CPUs, for values (< 1e-21) that change no discrepancy.
    """
    k = torch.zeros_like(d2)
    for s in scales:
        k = k + torch.exp((d2 / (-s * bandwidth)).clamp_min(EXPONENT_FLOOR))
    return k / len(scales)


@torch.no_grad()
def median_bandwidth(d2: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The median heuristic: the median of ``d2`` over ``mask`` (default every entry); 1 when that is 0 or empty.

    Computed without gradient: the kernel is chosen from the data, and the penalty is that kernel's discrepancy.
    """
    values = d2 if mask is None else d2[mask]
    if values.numel() == 0:
        return torch.ones((), dtype=d2.dtype, device=d2.device)
    h = values.median()
    return torch.where(h > 0, h, torch.ones_like(h))


def batch_discrepancy(
    z: torch.Tensor,
    onehot: torch.Tensor,
    *,
    bandwidth: torch.Tensor | float | None = None,
    scales: Sequence[float] = SCALES,
    unbiased: bool = False,
) -> torch.Tensor:
    """Squared MMD between the codes ``z`` of every two batches, weighted by n_b · n_c, in one sample.

    ``onehot`` (rows × batches) holds every row's batch. With M_bc the mean kernel value between batches b and
    c, MMD²_bc = M_bb + M_cc − 2 M_bc, and the result is Σ_{b≠c} n_b n_c MMD²_bc / Σ_{b≠c} n_b n_c: the MMD² of
    the two batches when there are two, their cell-pair-weighted mean otherwise. ``unbiased``: the within-batch
    means leave out the pairs of a cell with itself (the U-statistic); otherwise the V-statistic, the squared
    distance between the batches' kernel mean embeddings (never negative, zero for identical samples).
    ``bandwidth``: default the median heuristic over the distinct pairs. Zero when fewer than two batches hold
    cells. The reference for :class:`LatentBank` and for tests.
    """
    d2 = squared_distances(z)
    n_rows = len(z)
    if bandwidth is None:
        bandwidth = median_bandwidth(d2, torch.ones_like(d2, dtype=torch.bool).triu(1))
    k = gaussian_kernel(d2, bandwidth, scales)
    onehot = onehot.to(z.dtype)
    n = onehot.sum(0)
    present = n >= (2 if unbiased else 1)
    if int(present.sum()) < 2 or n_rows < 2:
        return (z * 0.0).sum()
    onehot, n = onehot[:, present], n[present]
    sums = onehot.T @ k @ onehot
    within = sums.diagonal()
    within = (within - onehot.T @ k.diagonal()) / (n * (n - 1)) if unbiased else within / (n * n)
    pairs = within[:, None] + within[None, :] - 2.0 * sums / torch.outer(n, n)
    weights = torch.outer(n, n)
    weights = weights - torch.diag(weights.diagonal())
    return (weights * pairs).sum() / weights.sum()


class LatentBank:
    """The codes of the most recent cells, the reference sample for a low-variance batch discrepancy.

    The current mini-batch (with gradient) is compared with the ``size`` codes seen before it (without gradient,
    a few steps old): M_bc is the mean kernel value between the current cells of batch b and the stored cells of
    batch c, and the statistic Σ n_b n_c (M_bb + M_cc − M_bc − M_cb) / Σ n_b n_c, over pairs of batches present on
    both sides, estimates the batches' MMD² without the bias of a cell's pair with itself (the pairs of a cell
    with its own stored code are left out). The kernel mean embeddings come from the larger stored sample, so the
    gradient moves the current cells towards the other batches' distribution with little sampling noise.
    """

    def __init__(self, size: int, n_latent: int, device: torch.device, scales: Sequence[float] = SCALES):
        self.size, self.scales = int(size), tuple(scales)
        self.z = torch.empty(0, n_latent, device=device)
        self.onehot: torch.Tensor | None = None
        self.rows = torch.empty(0, dtype=torch.long, device=device)

    def statistic(
        self, z: torch.Tensor, onehot: torch.Tensor, rows: torch.Tensor, permutations: int = 0, generator=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-sample MMD² of the current cells against the bank, and the same for shuffled batch labels.

        Returns the statistic (with gradient through ``z``; 0 while the bank holds fewer than two batches) and,
        without gradient, its values for ``permutations`` shuffles of the current cells' batch labels (empty
        when ``permutations`` is 0): a draw from the statistic's distribution when the batches do not differ.
        """
        zero = (z * 0.0).sum()
        none = torch.empty(0, dtype=z.dtype, device=z.device)
        if self.onehot is None or len(self.z) == 0:
            return zero, none
        d2 = squared_distances(z, self.z)
        keep = rows[:, None] != self.rows[None, :]
        bandwidth = median_bandwidth(d2, keep)
        keepf = keep.to(z.dtype)
        k = gaussian_kernel(d2, bandwidth, self.scales) * keepf
        current, stored = onehot.to(z.dtype), self.onehot.to(z.dtype)
        both = (current.sum(0) > 0) & (stored.sum(0) > 0)
        if int(both.sum()) < 2:
            return zero, none
        current, stored = current[:, both], stored[:, both]
        value = self._weighted(current, stored, k, keepf)
        if not permutations:
            return value, none
        with torch.no_grad():
            kd = k.detach()
            null = torch.stack([
                self._weighted(current[torch.randperm(len(z), generator=generator).to(z.device)], stored, kd, keepf)
                for _ in range(permutations)
            ])  # fmt: skip
        return value, null

    @staticmethod
    def _weighted(current: torch.Tensor, stored: torch.Tensor, k: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        means = (current.T @ k @ stored) / (current.T @ keep @ stored).clamp_min(1.0)
        within = means.diagonal()
        d = within[:, None] + within[None, :] - means - means.T
        n = current.sum(0)
        weights = torch.outer(n, n)
        weights = weights - torch.diag(weights.diagonal())
        total = weights.sum()
        return (weights * d).sum() / total if float(total) > 0 else (d * 0.0).sum()

    @torch.no_grad()
    def push(self, z: torch.Tensor, onehot: torch.Tensor, rows: torch.Tensor) -> None:
        """Add the codes of the current mini-batch, keeping the ``size`` most recent."""
        self.z = torch.cat([self.z, z.detach()])[-self.size :]
        self.onehot = (onehot if self.onehot is None else torch.cat([self.onehot, onehot]))[-self.size :]
        self.rows = torch.cat([self.rows, rows])[-self.size :]


class BatchPenalty:
    """``weight`` × reconstruction loss × the significant part of the batches' discrepancy in the latent space.

    Each step: the cross-sample MMD² of the current cells' clean codes against :class:`LatentBank` (S), and S for
    :data:`PERMUTATIONS` shuffles of their batch labels (mean μ₀, standard deviation σ₀); the penalty is
    ``weight`` · L · max(0, S − μ₀ − :data:`NULL_SDS` σ₀), with L the step's reconstruction loss (no gradient).
    Scaling by L makes ``weight`` a ratio that means the same on every data set: the kernel's MMD² has no unit,
    whereas the likelihood's size depends on the depth and the genes. Inactive (``active`` False) with a zero
    weight or fewer than two batches. ``mean()`` gives the statistic's mean over the cells since the last call.
    """

    def __init__(
        self,
        weight: float,
        n_batches: int,
        n_latent: int,
        device: torch.device,
        generator: torch.Generator | None = None,
        bank_size: int = BANK_SIZE,
    ):
        self.weight = float(weight)
        self.active = self.weight > 0 and n_batches > 1
        self.bank = LatentBank(bank_size, n_latent, device) if self.active else None
        self.generator = generator
        self._sum, self._n = 0.0, 0

    def __call__(self, z: torch.Tensor, onehot: torch.Tensor, rows: torch.Tensor, reconstruction: torch.Tensor):
        """The penalty for the current cells (codes ``z``, batches ``onehot``, row numbers ``rows``)."""
        value, null = self.bank.statistic(z, onehot, rows, PERMUTATIONS, self.generator)
        self.bank.push(z, onehot, rows)
        self._sum = self._sum + value.detach() * len(z)  # a tensor: no device sync per step
        self._n += len(z)
        if len(null) < 2:
            return value * 0.0
        threshold = null.mean() + NULL_SDS * null.std()
        return self.weight * reconstruction.detach() * torch.relu(value - threshold)

    def mean(self) -> float:
        """Mean statistic per cell since the previous call."""
        out = float(self._sum) / max(self._n, 1)
        self._sum, self._n = 0.0, 0
        return out
