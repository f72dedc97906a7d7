"""The Elastic Embedding objective and its gradient, with the repulsion evaluated in tiles (O(N) memory).

E(Y) = Σ_nm W⁺_nm ‖y_n − y_m‖² + λ Σ_nm W⁻_nm exp(−‖y_n − y_m‖²),  ∇E = 4 (L⁺ − λ L⁻(Y)) Y,

with W⁺ the sparse symmetric affinities and W⁻ either uniform (1 / (N(N−1)) off the diagonal) or the squared
input distances normalised to sum 1 (``"distance"``, as in the original NeuralEE). Shared by ``tl.ee`` and
``tl.neuralee``.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch
from scipy import sparse

Repulsion = Literal["uniform", "distance"]
REPULSIONS = ("uniform", "distance")
#: bytes of one square tile of the repulsion (a few MB on the CPU: every pass over it then stays in cache)
_TILE_BYTES = {"cpu": 4 * 2**20, "cuda": 512 * 2**20}
#: the squared input distances of ``repulsion="distance"`` are kept between calls up to this size
_CACHE_BYTES = 256 * 2**20
#: squared embedding distances are capped here before exp(−d²). Past d² ≈ 87 float32 exp returns subnormals, and
#: the CPU's exp (and the products that follow) take a slow path 20-50x slower than usual, which in a spread-out
#: embedding is most pairs. e^−60 ≈ 9e-27 is zero to float32 sums of kernel values ≤ 1, and stays normal after
#: the product with a distance weight W⁻ down to ~1e-12.
_FAR_D2 = 60.0


def exp_neg_(d2: torch.Tensor) -> torch.Tensor:
    """exp(−d²) in place, with d² capped at ``_FAR_D2`` so that no subnormal number is ever produced."""
    return d2.clamp_max_(_FAR_D2).neg_().exp_()


def torch_csr(M: sparse.spmatrix | sparse.sparray, device: torch.device | str) -> torch.Tensor:
    """A float64 torch CSR tensor of the SciPy matrix ``M`` on ``device`` (for sparse products on a GPU)."""
    M = sparse.csr_matrix(M)
    return torch.sparse_csr_tensor(
        torch.as_tensor(M.indptr, dtype=torch.int64),
        torch.as_tensor(M.indices, dtype=torch.int64),
        torch.as_tensor(M.data, dtype=torch.float64),
        size=M.shape,
    ).to(device)


class EEObjective:
    """E(Y) and ∇E(Y) for fixed affinities; ``Y`` is an ``(N, d)`` tensor on ``device``.

    Values are returned as float64 scalar tensors (summed in float64, so that a line search can resolve small
    decreases), gradients in ``dtype``. Nothing here is differentiable by autograd: use the returned gradient.

    Parameters
    ----------
    P
        Symmetric sparse affinities W⁺ (``(N, N)``).
    lam
        Weight λ of the repulsion.
    repulsion
        ``"uniform"`` or ``"distance"``.
    X
        Input representation ``(N, D)``; needed for ``repulsion="distance"``.
    device, dtype
        Where and in which precision Y lives.
    """

    def __init__(
        self,
        P: sparse.spmatrix | sparse.sparray,
        *,
        lam: float = 1.0,
        repulsion: Repulsion = "uniform",
        X: np.ndarray | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if repulsion not in REPULSIONS:
            raise ValueError(f"`repulsion` must be one of {REPULSIONS}, got {repulsion!r}.")
        self.device = torch.device(device)
        self.dtype = dtype
        self.lam = float(lam)
        self.repulsion = repulsion
        self.n = P.shape[0]
        # the attraction needs only the Laplacian L⁺ of (W + Wᵀ)/2 (diagonal dropped): kept as its degrees and a
        # float64 CSR matrix, so that the value 2·tr(Yᵀ L⁺ Y) can come from the same product as the gradient
        sym = sparse.csr_matrix(P, dtype=np.float64)
        sym = sparse.csr_matrix((sym + sym.T) / 2)
        sym.setdiag(0)
        sym.eliminate_zeros()
        self._deg = torch.as_tensor(np.asarray(sym.sum(1)).ravel(), dtype=torch.float64, device=self.device)[:, None]
        if self.device.type == "cpu":  # scipy's CSR product is ~10x faster than torch's sparse one on the CPU
            self._sym = sym
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                self._sym = torch_csr(sym, self.device)
        if repulsion == "distance":
            if X is None or X.shape[0] != self.n:
                raise ValueError("`repulsion='distance'` needs the input representation X with one row per cell.")
            Xd = torch.as_tensor(np.asarray(X), dtype=torch.float64, device=self.device)
            sq = (Xd * Xd).sum(1)
            total = 2 * self.n * sq.sum() - 2 * (Xd.sum(0) ** 2).sum()  # Σ_nm ‖x_n − x_m‖²
            self.X = Xd.to(dtype)
            self.x_sq = sq.to(dtype)
            self.w_scale = float(1.0 / total) if total > 0 else 0.0
            # the input distances do not change: keep the tiles on and above the diagonal when they are small
            # (N ≤ ~11,000 at 256 MB), else recompute them in every tile (O(N) memory)
            small = 2 * self.n * (self.n + 1) <= _CACHE_BYTES
            self._cache: dict[tuple[int, int], torch.Tensor] | None = {} if small else None
        else:
            self.X = None
            self._cache = None
            self.w_scale = 1.0 / (self.n * (self.n - 1)) if self.n > 1 else 0.0
        #: size of the float32-rounded terms of the last evaluation (see :meth:`__call__`)
        self.rounding_scale = 0.0

    @torch.no_grad()
    def attractive(self, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ W⁺‖y_n − y_m‖² = 2 tr(Yᵀ L⁺ Y) and its gradient 4 L⁺ Y (L⁺ of the symmetrised W⁺).

        One sparse product gives both, in float64: the trace form subtracts Σ deg‖y‖² and Σ W⁺ y_n·y_m, which
        float32 could not resolve when the embedding is large next to its local distances; centring Y first (E does
        not change under a shift) keeps the cancellation to the spread of Y. Several times faster than an edge sum.
        """
        Y64 = Y.detach().to(torch.float64)
        Y64 = Y64 - Y64.mean(0)
        if isinstance(self._sym, sparse.spmatrix):
            PY = torch.from_numpy(self._sym @ Y64.cpu().numpy())
        else:
            PY = self._sym @ Y64
        LY = self._deg * Y64 - PY
        e = 2.0 * (Y64 * LY).sum()
        return e, LY.mul_(4.0).to(Y.dtype)

    def _block_size(self) -> int:
        """Side of the square tiles of the repulsion: a few MB on the CPU, so that each pass stays in cache."""
        budget = _TILE_BYTES.get(self.device.type, _TILE_BYTES["cpu"])
        return max(1, min(self.n, int((budget // 4) ** 0.5)))

    def _squared_distances(
        self, Y: torch.Tensor, y_sq: torch.Tensor, a: slice, b: slice, buffers: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """‖y_a − y_b‖² for one tile, written into the first of two flat work ``buffers``.

        The buffers are reused from tile to tile: allocating a fresh multi-MB tensor per pass costs page faults,
        about half the time of the passes themselves.
        """
        ya, yb = Y[a], Y[b]
        shape = (ya.shape[0], yb.shape[0])
        d2 = buffers[0][: shape[0] * shape[1]].view(shape)
        if Y.shape[1] > 3:
            torch.addmm(y_sq[None, b], ya, yb.T, alpha=-2.0, out=d2)
            return d2.add_(y_sq[a, None]).clamp_min_(0)
        # few dimensions: differences are cheap and avoid the ‖a‖² + ‖b‖² − 2ab cancellation (mul_ and addcmul_:
        # each pass over the tile costs more than its arithmetic, and square_ is ~2x slower than mul_ here)
        torch.sub(ya[:, :1], yb[:, 0], out=d2)
        d2.mul_(d2)
        diff = buffers[1][: shape[0] * shape[1]].view(shape)
        for j in range(1, Y.shape[1]):
            torch.sub(ya[:, j : j + 1], yb[:, j], out=diff)
            d2.addcmul_(diff, diff)
        return d2

    def _input_weights(self, a: slice, b: slice) -> torch.Tensor:
        """Squared input distances of one tile, kept between calls when all of them fit in the cache."""
        key = (a.start, a.stop, b.start, b.stop)
        wx = self._cache.get(key) if self._cache is not None else None
        if wx is None:
            wx = torch.addmm(self.x_sq[None, b], self.X[a], self.X[b].T, alpha=-2.0).add_(self.x_sq[a, None])
            wx.clamp_min_(0)
            if self._cache is not None:
                self._cache[key] = wx
        return wx

    @torch.no_grad()
    def repulsive(self, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ W⁻ exp(−‖y_n − y_m‖²) and its gradient −4 L⁻(Y) Y, one square tile of pairs at a time.

        W⁻ and the kernel are symmetric, so only the tiles on and above the diagonal are computed: each off-diagonal
        tile K adds to the rows of both its blocks (K and Kᵀ), halving the work. While every pair is closer than 1,
        the value is summed as Σ W⁻ + Σ W⁻ (exp(−d²) − 1) (Σ W⁻ = 1) with ``expm1``: exact in float32 even for a
        tiny embedding, where exp(−d²) rounds to 1 and the repulsion would otherwise look flat to a line search.
        Beyond that, ``exp`` (twice as fast on the CPU) loses nothing that float32 sums would keep.
        """
        y_sq = (Y * Y).sum(1)
        centred = Y - Y.mean(0)
        tiny = bool(4 * (centred * centred).sum(1).max() < 1) if self.n else False  # all d² < 1
        total = torch.zeros((), dtype=torch.float64, device=Y.device)
        # G = L⁻(Y) Y accumulated block by block: G_a = (Σ_b K_ab) y_a − K_ab y_b. Row sums and K y come from one
        # product with [1, Y]ᵀ, as (d+1)×n times n×n: ~6x faster on the CPU than K @ Y with Y only d columns wide
        ones_y = torch.cat([torch.ones_like(Y[:, :1]), Y], 1).T.contiguous()
        acc = torch.zeros_like(Y)
        size = self._block_size()
        buffers = (Y.new_empty(size * size), Y.new_empty(size * size))
        starts = range(0, self.n, size)
        for i in starts:
            a = slice(i, min(i + size, self.n))
            for j in starts:
                if j < i:
                    continue
                b = slice(j, min(j + size, self.n))
                diagonal = i == j
                wx = self._input_weights(a, b) if self.X is not None else None
                kernel = self._squared_distances(Y, y_sq, a, b, buffers)
                if tiny:
                    kernel.neg_().expm1_()  # exp(−d²) − 1; the diagonal is 0 here
                    if wx is not None:
                        kernel.mul_(wx)
                    # float32 row sums: a float64 reduction of the tile is ~15x slower on the CPU
                    total += kernel.sum(1).sum(dtype=torch.float64) * (1 if diagonal else 2)
                    kernel.add_(wx if wx is not None else 1.0)  # w (exp(−d²) − 1) + w = w exp(−d²)
                    if diagonal:
                        kernel.fill_diagonal_(0)  # no self-repulsion
                else:
                    exp_neg_(kernel)
                    if wx is not None:
                        kernel.mul_(wx)
                    if diagonal:
                        kernel.fill_diagonal_(0)
                    total += kernel.sum(1).sum(dtype=torch.float64) * (1 if diagonal else 2)
                rows = ones_y[:, b] @ kernel.T  # [Σ_b K_ab, (K y_b)ᵀ]
                acc[a] += rows[0, :, None] * Y[a] - rows[1:].T
                if not diagonal:
                    cols = ones_y[:, a] @ kernel  # [Σ_a K_ab, (Kᵀ y_a)ᵀ]
                    acc[b] += cols[0, :, None] * Y[b] - cols[1:].T
        value = total * self.w_scale
        self._repulsive_rounding = float(value.abs())  # the part of the value that float32 tiles rounded
        if tiny and self.w_scale > 0:
            value = value + 1.0  # Σ W⁻ exp(−d²) = Σ W⁻ (exp(−d²) − 1) + Σ W⁻, and Σ W⁻ = 1
        return value, acc.mul_(-4.0 * self.w_scale)

    def __call__(self, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E(Y) and ∇E(Y).

        Also sets :attr:`rounding_scale`, the magnitude of the terms of E that were summed from float32 values: E is
        resolved to about eps · rounding_scale. For a tiny embedding that is far below eps · E, because the constant
        Σ W⁻ = 1 of the repulsion is added exactly in float64; a line search that resolved E only to eps · |E| would
        see a flat objective at a small random start.
        """
        ea, ga = self.attractive(Y)
        er, gr = self.repulsive(Y)
        self.rounding_scale = float(ea) + self.lam * self._repulsive_rounding
        return ea + self.lam * er, ga + self.lam * gr

    def value(self, Y: torch.Tensor) -> float:
        """E(Y) alone."""
        return float(self(Y)[0])
