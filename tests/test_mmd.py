"""The batch-alignment penalty: MMD estimates against float64 loops, the permutation threshold, its gradient."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from scembed._engine import mmd


def _kernel(a: np.ndarray, b: np.ndarray, bandwidth: float) -> float:
    d2 = float(((a - b) ** 2).sum())
    return float(np.mean([np.exp(-d2 / (s * bandwidth)) for s in mmd.SCALES]))


def _reference(z: np.ndarray, codes: np.ndarray, bandwidth: float, unbiased: bool) -> float:
    """Σ_{b≠c} n_b n_c MMD²_bc / Σ n_b n_c, every kernel mean an explicit loop over cell pairs."""

    def mean(b, c):
        pairs = [(i, j) for i in np.flatnonzero(codes == b) for j in np.flatnonzero(codes == c)]
        if unbiased and b == c:
            pairs = [(i, j) for i, j in pairs if i != j]
        return np.mean([_kernel(z[i], z[j], bandwidth) for i, j in pairs])

    labels = np.unique(codes)
    num = den = 0.0
    for b, c in itertools.permutations(labels, 2):
        w = (codes == b).sum() * (codes == c).sum()
        num += w * (mean(b, b) + mean(c, c) - 2 * mean(b, c))
        den += w
    return num / den


@pytest.mark.parametrize("n_batches", [2, 3])
@pytest.mark.parametrize("unbiased", [False, True])
def test_batch_discrepancy_matches_loops(n_batches, unbiased):
    rng = np.random.default_rng(n_batches)
    z = rng.normal(size=(30, 4))
    codes = rng.integers(0, n_batches, 30)
    codes[:n_batches] = np.arange(n_batches)
    onehot = torch.nn.functional.one_hot(torch.as_tensor(codes), n_batches)
    got = mmd.batch_discrepancy(torch.as_tensor(z), onehot, bandwidth=1.7, unbiased=unbiased)
    assert float(got) == pytest.approx(_reference(z, codes, 1.7, unbiased), rel=1e-10)


def test_batch_discrepancy_is_zero_for_one_batch_and_for_identical_samples():
    z = torch.randn(20, 3, dtype=torch.float64)
    one = torch.zeros(20, 2)
    one[:, 0] = 1
    assert float(mmd.batch_discrepancy(z, one)) == 0.0
    twice = torch.cat([z, z])
    onehot = torch.nn.functional.one_hot(torch.arange(40) // 20, 2)
    assert abs(float(mmd.batch_discrepancy(twice, onehot))) < 1e-12  # V-statistic: same empirical distribution
    shifted = torch.cat([z, z + 3.0])
    assert float(mmd.batch_discrepancy(shifted, onehot)) > 0.1


def test_bank_statistic_matches_loops():
    """Current cells against the stored ones, the pairs of a cell with its own stored code left out."""
    rng = np.random.default_rng(0)
    stored, current = rng.normal(size=(25, 3)), rng.normal(size=(12, 3))
    s_codes, c_codes = rng.integers(0, 2, 25), rng.integers(0, 2, 12)
    s_codes[:2], c_codes[:2] = [0, 1], [0, 1]
    s_rows, c_rows = np.arange(25), np.arange(20, 32)  # rows 20..24 are on both sides
    bank = mmd.LatentBank(100, 3, torch.device("cpu"))
    oh = torch.nn.functional.one_hot
    bank.push(torch.as_tensor(stored), oh(torch.as_tensor(s_codes), 2).double(), torch.as_tensor(s_rows))
    value, null = bank.statistic(
        torch.as_tensor(current), oh(torch.as_tensor(c_codes), 2).double(), torch.as_tensor(c_rows)
    )
    assert null.numel() == 0
    d2 = ((current[:, None] - stored[None]) ** 2).sum(-1)
    keep = c_rows[:, None] != s_rows[None, :]
    bandwidth = np.median(d2[keep])

    def mean(b, c):
        return np.mean([
            _kernel(current[i], stored[j], bandwidth)
            for i in np.flatnonzero(c_codes == b)
            for j in np.flatnonzero(s_codes == c)
            if c_rows[i] != s_rows[j]
        ])  # fmt: skip

    expected = mean(0, 0) + mean(1, 1) - mean(0, 1) - mean(1, 0)  # two batches: one pair, both orders
    assert float(value) == pytest.approx(expected, rel=1e-10)


def _steps(separated: bool, n_steps: int = 6, seed: int = 0):
    """A BatchPenalty fed mini-batches of two batches, apart (shifted by 4) or drawn from one distribution."""
    gen = torch.Generator().manual_seed(seed)
    penalty = mmd.BatchPenalty(1.0, 2, 2, torch.device("cpu"), torch.Generator().manual_seed(seed + 1))
    out = []
    for step in range(n_steps):
        codes = torch.arange(64) % 2
        z = torch.randn(64, 2, generator=gen) + (4.0 * codes[:, None] if separated else 0.0)
        z.requires_grad_(True)
        rows = torch.arange(64) + 64 * step
        value = penalty(z, torch.nn.functional.one_hot(codes, 2).float(), rows, torch.tensor(2.0))
        out.append((z, codes, value))
    return penalty, out


def test_penalty_acts_on_separated_batches_and_pulls_them_together():
    penalty, steps = _steps(separated=True)
    assert penalty.active and penalty.mean() > 0.1
    z, codes, value = steps[-1]
    assert float(value.detach()) > 0
    value.backward()
    # on average a gradient step (−grad) moves batch 0 towards batch 1 (+4 on both axes) and batch 1 back
    assert bool((z.grad[codes == 0].mean(0) < 0).all()) and bool((z.grad[codes == 1].mean(0) > 0).all())
    onehot = torch.nn.functional.one_hot(codes, 2).float()
    rows = torch.arange(64) + 10_000
    before, _ = penalty.bank.statistic(z.detach(), onehot, rows)
    after, _ = penalty.bank.statistic(z.detach() - 5.0 * z.grad, onehot, rows)
    assert float(after) < float(before)


def test_penalty_is_zero_when_batches_are_as_mixed_as_shuffled_labels():
    """The permutation threshold: batches from one distribution get no gradient at all in most steps."""
    zeros = 0
    for seed in range(5):
        _, steps = _steps(separated=False, seed=seed)
        zeros += sum(float(v.detach()) == 0.0 for _, _, v in steps[1:])
    assert zeros >= 0.9 * 5 * 5


def test_penalty_inactive_without_weight_or_second_batch():
    assert not mmd.BatchPenalty(0.0, 2, 4, torch.device("cpu")).active
    assert not mmd.BatchPenalty(1.0, 1, 4, torch.device("cpu")).active
    assert mmd.BatchPenalty(0.5, 3, 4, torch.device("cpu")).active
