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
A plain MMD also calls two batches different when one holds a population the other lacks, and pulls that
population onto the other batch's; the statistic therefore counts only cells with a mutual nearest neighbour in
the other batch and their neighbourhoods (the pairs on which MNN correction rests, Haghverdi et al. 2018).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
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
#: share of a batch's cells searched for mutual nearest neighbours (see :class:`LatentBank`): about 20 of the
#: 1,024 stored cells of a batch and 3 of the 128 current ones, far fewer than a population's cells in a
#: mini-batch, so that a pair is mutual only between cells of matching populations
MNN_SHARE = 0.02
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
    k = None
    for s in scales:
        term = torch.mul(d2, -1.0 / (s * bandwidth)).clamp_min_(EXPONENT_FLOOR).exp_()
        k = term if k is None else k + term  # out of place: autograd keeps each exp() for its gradient
    return k / len(scales)


@torch.no_grad()
def median_bandwidth(d2: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The median heuristic: the median of ``d2`` over ``mask`` (default every entry); 1 when that is 0 or empty.

    Computed without gradient: the kernel is chosen from the data, and the penalty is that kernel's discrepancy.
    """
    n_values = d2.numel() if mask is None else int(mask.sum())
    if n_values == 0:
        return torch.ones((), dtype=d2.dtype, device=d2.device)
    if d2.device.type == "cpu":
        # the same value as torch.median (the lower middle one), by a selection, faster on a CPU; the entries
        # outside the mask become +inf, which sorts them after every kept one
        values = d2.detach() if mask is None else d2.detach().masked_fill(~mask, float("inf"))
        middle = (n_values - 1) // 2
        h = torch.as_tensor(np.partition(values.reshape(-1).numpy(), middle)[middle])
    else:
        h = (d2 if mask is None else d2[mask]).median()
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
    a few steps old): for every two batches b and c present on both sides, M_bc is the mean kernel value between
    the current cells of batch b and the stored cells of batch c, and the statistic Σ n_b n_c (M_bb + M_cc − M_bc
    − M_cb) / Σ n_b n_c estimates the batches' MMD² without the bias of a cell's pair with itself (the pairs of a
    cell with its own stored code are left out). The kernel mean embeddings come from the larger stored sample, so
    the gradient moves the current cells towards the other batches' distribution with little sampling noise.

    ``mutual`` (default): in the comparison of batches b and c, only cells with a mutual nearest neighbour in the
    other batch count (Haghverdi et al., Nat. Biotechnol. 2018), so that a population present in one of the two
    batches only is left out of their discrepancy instead of being pulled onto the other batch's populations. A
    current cell of b and a stored cell of c are mutual neighbours when each is among the other's
    :data:`MNN_SHARE` nearest of that batch (at least one). A population shared by both batches, even when the
    batches are apart, has mutual pairs on the sides that face each other; a population of one batch has none,
    since the other batch's cells nearest to it have their own population's cells nearer. Each cell's weight is
    its own flag or, where larger, the share of flagged cells among its nearest stored cells of its own batch
    (:func:`spread_to_neighbours`, as mnnCorrect spreads its pairs' corrections to their neighbourhoods), so
    that the penalty moves the whole of a shared population and not only its facing edge. The kernel means are
    weighted means, so only the weights' ratios matter. The stored cells keep the weights they had as current
    cells (the first mini-batch, with nothing to compare, weighs 1). ``mutual=False`` counts every cell (the
    plain MMD²).
    """

    def __init__(
        self,
        size: int,
        n_latent: int,
        device: torch.device,
        scales: Sequence[float] = SCALES,
        mutual: bool = True,
    ):
        self.size, self.scales, self.mutual = int(size), tuple(scales), bool(mutual)
        self.z = torch.empty(0, n_latent, device=device)
        self.onehot: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self.direct: torch.Tensor | None = None
        self.rows = torch.empty(0, dtype=torch.long, device=device)
        self._last_weights: torch.Tensor | None = None
        self._last_direct: torch.Tensor | None = None

    def statistic(
        self, z: torch.Tensor, onehot: torch.Tensor, rows: torch.Tensor, permutations: int = 0, generator=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-sample MMD² of the current cells against the bank, and the same for shuffled batch labels.

        Returns the statistic (with gradient through ``z``; 0 while the bank holds fewer than two batches) and,
        without gradient, its values for ``permutations`` shuffles of the current cells' batch labels (empty
        when ``permutations`` is 0): a draw from the statistic's distribution when the batches do not differ.
        The current cells' mutual-neighbour weights (cells × batches) are kept for :meth:`push`.
        """
        zero = (z * 0.0).sum()
        none = torch.empty(0, dtype=z.dtype, device=z.device)
        current = onehot.to(z.dtype)
        self._last_weights = self._last_direct = torch.ones_like(current)
        if self.onehot is None or len(self.z) == 0:
            return zero, none
        d2 = squared_distances(z, self.z)
        keep = rows[:, None] != self.rows[None, :]
        stored = self.onehot.to(z.dtype)
        if self.mutual:
            counted = d2.detach().masked_fill(~keep, float("inf"))
            self._last_direct = mutual_neighbour_weights(counted, current, stored)
            self._last_weights = spread_to_neighbours(counted, current, stored, self._last_direct, self.direct)
        both = (current.sum(0) > 0) & (stored.sum(0) > 0)
        if int(both.sum()) < 2:
            return zero, none
        bandwidth = median_bandwidth(d2, keep)
        keepf = keep.to(z.dtype)
        k = gaussian_kernel(d2, bandwidth, self.scales) * keepf
        present = torch.nonzero(both).flatten().tolist()
        pairs = [(b, c) for b in present for c in present if b < c]
        cur_w, sto_w = self._last_weights, self.weights.to(z.dtype)
        # per pair (b, c): the kernel's and the kept pairs' sums over the stored cells of b and of c, each stored
        # cell weighted towards the other batch; a shuffle of the current cells' labels leaves them unchanged
        stored_sums = []
        for b, c in pairs:
            sw = stored[:, [b, c]] * sto_w[:, [c, b]]
            stored_sums.append((k @ sw, keepf @ sw))
        value = self._weighted(current, cur_w, stored_sums, pairs)
        if not permutations:
            return value, none
        with torch.no_grad():
            orders = torch.stack([torch.randperm(len(z), generator=generator) for _ in range(permutations)])
            orders = orders.to(z.device)
            null = self._weighted(current[orders], cur_w[orders], stored_sums, pairs)
        return value, null

    @staticmethod
    def _weighted(
        current: torch.Tensor,
        current_weights: torch.Tensor,
        stored_sums: list[tuple[torch.Tensor, torch.Tensor]],
        pairs: list[tuple[int, int]],
    ) -> torch.Tensor:
        """Σ over batch pairs of n_b n_c MMD²_bc / Σ n_b n_c, from weighted kernel means.

        In pair (b, c) a cell of b counts with its weight towards c and a cell of c with its weight towards b, on
        both sides. ``stored_sums``: per pair, the kernel and the kept-pair indicator (current × stored) times the
        stored cells' weights (stored × 2). ``current`` and ``current_weights`` may carry leading dimensions
        (shuffles of the labels), which the result keeps.
        """
        n = current.sum(-2)  # every batch of ``pairs`` holds current cells, so the pair weights are positive
        terms, pair_weights = [], []
        for (b, c), (kernel_sums, kept_sums) in zip(pairs, stored_sums):
            # each cell of b weighted towards c and each of c towards b: (... × cells × 2)
            cw = current[..., [b, c]] * current_weights[..., [c, b]]
            cw_t = cw.transpose(-1, -2)
            means = (cw_t @ kernel_sums) / (cw_t @ kept_sums).clamp_min(1.0)
            terms.append(means[..., 0, 0] + means[..., 1, 1] - means[..., 0, 1] - means[..., 1, 0])
            pair_weights.append(n[..., b] * n[..., c])
        pair_weights = torch.stack(pair_weights, -1)
        return (pair_weights * torch.stack(terms, -1)).sum(-1) / pair_weights.sum(-1)

    @torch.no_grad()
    def push(self, z: torch.Tensor, onehot: torch.Tensor, rows: torch.Tensor) -> None:
        """Add the codes of the current mini-batch, keeping the ``size`` most recent.

        The cells keep the weights of the last :meth:`statistic` call if it was on the same cells, else 1.
        """
        weights, direct = self._last_weights, self._last_direct
        if weights is None or weights.shape != onehot.shape:
            weights = direct = torch.ones(onehot.shape, dtype=z.dtype, device=z.device)
        self.z = torch.cat([self.z, z.detach()])[-self.size :]
        self.onehot = (onehot if self.onehot is None else torch.cat([self.onehot, onehot]))[-self.size :]
        self.weights = (weights if self.weights is None else torch.cat([self.weights, weights]))[-self.size :]
        self.direct = (direct if self.direct is None else torch.cat([self.direct, direct]))[-self.size :]
        self.rows = torch.cat([self.rows, rows])[-self.size :]
        self._last_weights = self._last_direct = None


def _nearest(d2: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the ``k`` smallest entries of every row of ``d2``, in no particular order.

    On a CPU by numpy's introselect, which is faster there than ``torch.topk`` for blocks of this size.
    """
    if d2.device.type == "cpu":
        return torch.from_numpy(np.argpartition(d2.numpy(), k - 1, axis=1)[:, :k])
    return d2.topk(k, dim=1, largest=False, sorted=False).indices


@torch.no_grad()
def mutual_neighbour_weights(
    d2: torch.Tensor, current: torch.Tensor, stored: torch.Tensor, share: float | None = None
) -> torch.Tensor:
    """1 where a current cell has a mutual nearest neighbour among the stored cells of a batch, else 0.

    ``d2``: squared distances current × stored, infinite for the pairs that do not count (a cell with its own
    stored code); ``current``, ``stored``: batch one-hots. For a current cell of batch b and a stored batch c ≠ b,
    the cell's ⌈``share`` · m_c⌉ nearest stored cells of c (m_c of them) and each of those stored cells'
    ⌈``share`` · n_b⌉ nearest current cells of b (n_b of them) are compared; the result is 1 where some pair is in
    both lists. Column b of a cell of batch b is 1 (a batch is compared with itself everywhere).
    """
    share = MNN_SHARE if share is None else share
    weights = current.clone()
    for b in torch.nonzero(current.sum(0) > 0).flatten().tolist():
        cur = torch.nonzero(current[:, b] > 0).flatten()
        rows = d2.index_select(0, cur)
        for c in torch.nonzero(stored.sum(0) > 0).flatten().tolist():
            if c == b:
                continue
            sto = torch.nonzero(stored[:, c] > 0).flatten()
            block = rows.index_select(1, sto)  # (current of b) × (stored of c)
            k_sto = min(len(sto), max(1, math.ceil(share * len(sto))))
            k_cur = min(len(cur), max(1, math.ceil(share * len(cur))))
            near_sto = _nearest(block, k_sto)  # each current cell's nearest stored
            near_cur = _nearest(block.T.contiguous(), k_cur)  # each stored cell's nearest
            back = torch.zeros(len(sto), len(cur), dtype=torch.bool, device=d2.device)
            back.scatter_(1, near_cur, True)
            # i and j mutual: j among i's nearest, i among j's nearest, and the pair counts (finite distance)
            pairs = back[near_sto, torch.arange(len(cur), device=d2.device)[:, None]]
            pairs &= torch.isfinite(block.gather(1, near_sto))
            weights[cur, c] = pairs.any(1).to(weights.dtype)
    return weights


@torch.no_grad()
def spread_to_neighbours(
    d2: torch.Tensor,
    current: torch.Tensor,
    stored: torch.Tensor,
    direct: torch.Tensor,
    stored_direct: torch.Tensor,
    share: float | None = None,
) -> torch.Tensor:
    """Each current cell's weight towards every batch, its mutual-neighbour flag spread over its neighbourhood.

    The weight is the cell's own flag (``direct``) or, where larger, the share of flagged cells among its
    ⌈``share`` · m_b⌉ nearest stored cells of its own batch b. ``d2`` as for :func:`mutual_neighbour_weights`.
    Mutual pairs between batches that are apart form only where they face each other; the smoothing carries the
    weight over the population that has them (one neighbourhood around each flagged cell, from the flags alone,
    so it does not feed on itself over steps), never to a population of one batch only, whose own
    neighbourhoods hold no flagged cell.
    """
    share = MNN_SHARE if share is None else share
    weights = direct.clone()
    for b in torch.nonzero(current.sum(0) > 0).flatten().tolist():
        sto = torch.nonzero(stored[:, b] > 0).flatten()
        if len(sto) == 0:
            continue
        cur = torch.nonzero(current[:, b] > 0).flatten()
        block = d2.index_select(0, cur).index_select(1, sto)
        k = min(len(sto), max(1, math.ceil(share * len(sto))))
        near = _nearest(block, k)
        dist = block.gather(1, near)
        flags = stored_direct[sto][near] * torch.isfinite(dist)[..., None]  # (cells, k, batches)
        weights[cur] = torch.maximum(weights[cur], flags.sum(1) / k)
    return weights


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
        mutual: bool = True,
    ):
        self.weight = float(weight)
        self.active = self.weight > 0 and n_batches > 1
        self.bank = LatentBank(bank_size, n_latent, device, mutual=mutual) if self.active else None
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
