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


def _filled_bank(stored, s_codes, s_rows, n_batches):
    """A bank of the plain (not mutual-neighbour) statistic holding ``stored`` with batch codes ``s_codes``."""
    bank = mmd.LatentBank(100, stored.shape[1], torch.device("cpu"), mutual=False)
    onehot = torch.nn.functional.one_hot(torch.as_tensor(s_codes), n_batches).double()
    bank.push(torch.as_tensor(stored), onehot, torch.as_tensor(s_rows))
    return bank


def _loop_statistic(current, codes, c_rows, stored, s_codes, s_rows, bandwidth, n_batches):
    """Σ over batch pairs of n_b n_c MMD²_bc / Σ n_b n_c, by loops over cell pairs (a cell's pairs with its own
    stored row left out)."""

    def mean(b, c):
        return np.mean([
            _kernel(current[i], stored[j], bandwidth)
            for i in np.flatnonzero(codes == b)
            for j in np.flatnonzero(s_codes == c)
            if c_rows[i] != s_rows[j]
        ])  # fmt: skip

    num = den = 0.0
    for b, c in itertools.combinations(range(n_batches), 2):
        w = (codes == b).sum() * (codes == c).sum()
        num += w * (mean(b, b) + mean(c, c) - mean(b, c) - mean(c, b))
        den += w
    return num / den


def test_bank_statistic_matches_loops():
    """Current cells against the stored ones, the pairs of a cell with its own stored code left out."""
    rng = np.random.default_rng(0)
    stored, current = rng.normal(size=(25, 3)), rng.normal(size=(12, 3))
    s_codes, c_codes = rng.integers(0, 2, 25), rng.integers(0, 2, 12)
    s_codes[:2], c_codes[:2] = [0, 1], [0, 1]
    s_rows, c_rows = np.arange(25), np.arange(20, 32)  # rows 20..24 are on both sides
    bank = _filled_bank(stored, s_codes, s_rows, 2)
    value, null = bank.statistic(
        torch.as_tensor(current),
        torch.nn.functional.one_hot(torch.as_tensor(c_codes), 2).double(),
        torch.as_tensor(c_rows),
    )
    assert null.numel() == 0
    d2 = ((current[:, None] - stored[None]) ** 2).sum(-1)
    bandwidth = np.median(d2[c_rows[:, None] != s_rows[None, :]])
    # two batches: one pair, both orders
    expected = _loop_statistic(current, c_codes, c_rows, stored, s_codes, s_rows, bandwidth, 2)
    assert float(value) == pytest.approx(expected, rel=1e-10)


def test_bank_null_is_the_statistic_of_shuffled_labels():
    """Each null draw is the statistic with the current cells' batch labels shuffled (three batches: three pairs),
    recomputed by loops over cell pairs for the same shuffles."""
    rng = np.random.default_rng(2)
    stored, current = rng.normal(size=(40, 3)), rng.normal(size=(18, 3))
    s_codes, c_codes = rng.integers(0, 3, 40), rng.integers(0, 3, 18)
    s_codes[:3], c_codes[:3] = [0, 1, 2], [0, 1, 2]
    s_rows, c_rows = np.arange(40), np.arange(35, 53)  # rows 35..39 on both sides
    bank = _filled_bank(stored, s_codes, s_rows, 3)
    _, null = bank.statistic(
        torch.as_tensor(current),
        torch.nn.functional.one_hot(torch.as_tensor(c_codes), 3).double(),
        torch.as_tensor(c_rows),
        4,
        torch.Generator().manual_seed(7),
    )
    d2 = ((current[:, None] - stored[None]) ** 2).sum(-1)
    bandwidth = np.median(d2[c_rows[:, None] != s_rows[None, :]])
    generator = torch.Generator().manual_seed(7)
    orders = [torch.randperm(18, generator=generator).numpy() for _ in range(4)]
    expected = [
        _loop_statistic(current, c_codes[order], c_rows, stored, s_codes, s_rows, bandwidth, 3) for order in orders
    ]
    np.testing.assert_allclose(null.numpy(), expected, rtol=1e-10)


def test_mutual_neighbour_weights_match_loops():
    """A current cell of batch b weighs 1 towards batch c where one of its ⌈share·m_c⌉ nearest stored cells of c has
    it among its own ⌈share·n_b⌉ nearest current cells of b; the pairs of a cell with its own code never count."""
    rng = np.random.default_rng(1)
    current, stored = rng.normal(size=(30, 2)), rng.normal(size=(60, 2))
    c_codes, s_codes = rng.integers(0, 3, 30), rng.integers(0, 3, 60)
    c_rows, s_rows = np.arange(30), np.arange(20, 80)  # rows 20..29 on both sides
    oh = torch.nn.functional.one_hot
    d2 = ((current[:, None] - stored[None]) ** 2).sum(-1)
    keep = c_rows[:, None] != s_rows[None, :]
    share = 0.1
    weights = mmd.mutual_neighbour_weights(
        torch.as_tensor(np.where(keep, d2, np.inf)),
        oh(torch.as_tensor(c_codes), 3).double(),
        oh(torch.as_tensor(s_codes), 3).double(),
        share=share,
    ).numpy()
    expected = np.zeros((30, 3))
    for i in range(30):
        b = c_codes[i]
        expected[i, b] = 1.0
        same = np.flatnonzero(c_codes == b)
        for c in {0, 1, 2} - {b}:
            other = np.flatnonzero(s_codes == c)
            dist = lambda ci, sj: d2[ci, sj] if keep[ci, sj] else np.inf  # noqa: E731
            near = sorted(other, key=lambda j: dist(i, j))[: int(np.ceil(share * len(other)))]
            for j in near:
                back = sorted(same, key=lambda q: dist(q, j))[: int(np.ceil(share * len(same)))]
                if i in back and np.isfinite(dist(i, j)):
                    expected[i, c] = 1.0
    np.testing.assert_array_equal(weights, expected)


def _populations(n: int, unshared: bool, shift: float, seed: int):
    """Five populations in 2-D, two batches; ``unshared``: the last population only in batch 0."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0], [6.0, 6.0], [12.0, 12.0]])
    types, batch = torch.randint(0, 5, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)
    if unshared:
        keep = ~((types == 4) & (batch == 1))
        types, batch = types[keep], batch[keep]
    z = centres[types] + 0.7 * torch.randn(len(types), 2, generator=g) + shift * batch[:, None].float()
    return z, batch, types


def _bank_run(mutual: bool, unshared: bool, shift: float, n_steps: int = 16):
    """Statistic minus the permutation threshold, averaged over the last half of ``n_steps`` mini-batches."""
    bank = mmd.LatentBank(2048, 2, torch.device("cpu"), mutual=mutual)
    excess = []
    for step in range(n_steps):
        z, batch, types = _populations(256, unshared, shift, seed=step)
        onehot = torch.nn.functional.one_hot(batch, 2).float()
        rows = torch.arange(len(z)) + 1000 * step
        value, null = bank.statistic(z, onehot, rows, 8, torch.Generator().manual_seed(step))
        weights = bank._last_weights[torch.arange(len(z)), 1 - batch]  # towards the other batch
        bank.push(z, onehot, rows)
        if step >= n_steps // 2:
            excess.append(float(value) - float(null.mean() + mmd.NULL_SDS * null.std()))
    return float(np.mean(excess)), weights, batch, types


def test_mutual_neighbours_leave_a_population_of_one_batch_out_of_the_discrepancy():
    """Four populations shared and aligned, a fifth in batch 0 only: the plain MMD² calls the batches different
    (and would pull the fifth onto the others), the mutual-neighbour statistic does not; the fifth population's
    cells weigh 0, the shared ones 1. Shifted batches stay different under both."""
    plain, *_ = _bank_run(mutual=False, unshared=True, shift=0.0)
    mutual, weights, batch, types = _bank_run(mutual=True, unshared=True, shift=0.0)
    assert plain > 0.01 and mutual < 0.0
    alone = (types == 4) & (batch == 0)
    assert float(weights[alone].max()) == 0.0 and float(weights[~alone].mean()) > 0.9
    for mutual_flag in (False, True):
        apart, *_ = _bank_run(mutual=mutual_flag, unshared=False, shift=3.0)
        assert apart > 0.0


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


@pytest.mark.parametrize("n", [1, 2, 5, 1000, 4097])
def test_median_bandwidth_is_torch_median_of_the_masked_entries(n):
    gen = torch.Generator().manual_seed(n)
    d2 = torch.rand(n, generator=gen) * torch.randint(0, 3, (n,), generator=gen).float()
    d2.requires_grad_(True)
    mask = torch.rand(n, generator=gen) > 0.3
    values = d2.detach()[mask]
    expected = 1.0 if values.numel() == 0 or values.median() == 0 else float(values.median())
    assert float(mmd.median_bandwidth(d2, mask)) == expected
    assert float(mmd.median_bandwidth(d2)) == (float(d2.detach().median()) or 1.0)
