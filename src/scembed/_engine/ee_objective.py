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
#: bytes of one N-wide tile of the repulsion kept at once
_TILE_BYTES = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}
#: the squared input distances of ``repulsion="distance"`` are kept between calls up to this size
_CACHE_BYTES = 256 * 2**20


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
        P = sparse.coo_matrix(P)
        self.n = P.shape[0]
        self.rows = torch.as_tensor(P.row, dtype=torch.int64, device=self.device)
        self.cols = torch.as_tensor(P.col, dtype=torch.int64, device=self.device)
        self.weights = torch.as_tensor(P.data, dtype=dtype, device=self.device)
        # each pair once (W_nm + W_mn on the upper triangle) for the value, a sparse product for the gradient
        upper = sparse.triu(P + P.T, k=1).tocoo()
        self._ru = torch.as_tensor(upper.row, dtype=torch.int64, device=self.device)
        self._cu = torch.as_tensor(upper.col, dtype=torch.int64, device=self.device)
        self._wu = torch.as_tensor(upper.data, dtype=dtype, device=self.device)
        sym = sparse.csr_matrix((upper + upper.T) / 2)  # (W + Wᵀ)/2 without the diagonal
        self._deg = torch.as_tensor(np.asarray(sym.sum(1)).ravel(), dtype=dtype, device=self.device)[:, None]
        if self.device.type == "cpu":  # scipy's CSR product is ~10x faster than torch's sparse one on the CPU
            self._sym = sym.astype(np.float32 if dtype == torch.float32 else np.float64)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                self._sym = torch.sparse_csr_tensor(
                    torch.as_tensor(sym.indptr, dtype=torch.int64),
                    torch.as_tensor(sym.indices, dtype=torch.int64),
                    torch.as_tensor(sym.data, dtype=dtype),
                    size=sym.shape,
                ).to(self.device)
        if repulsion == "distance":
            if X is None or X.shape[0] != self.n:
                raise ValueError("`repulsion='distance'` needs the input representation X with one row per cell.")
            Xd = torch.as_tensor(np.asarray(X), dtype=torch.float64, device=self.device)
            sq = (Xd * Xd).sum(1)
            total = 2 * self.n * sq.sum() - 2 * (Xd.sum(0) ** 2).sum()  # Σ_nm ‖x_n − x_m‖²
            self.X = Xd.to(dtype)
            self.x_sq = sq.to(dtype)
            self.w_scale = float(1.0 / total) if total > 0 else 0.0
            # the input distances do not change: keep them when they are small (N ≤ ~8,000 at 256 MB), else
            # recompute them in every tile (O(N) memory)
            small = 4 * self.n * self.n <= _CACHE_BYTES
            self._cache: dict[tuple[int, int], torch.Tensor] | None = {} if small else None
        else:
            self.X = None
            self._cache = None
            self.w_scale = 1.0 / (self.n * (self.n - 1)) if self.n > 1 else 0.0

    @torch.no_grad()
    def attractive(self, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ W⁺‖y_n − y_m‖² and its gradient 4 L⁺ Y (L⁺ of the symmetrised W⁺)."""
        diff = Y[self._ru] - Y[self._cu]
        e = (self._wu * (diff * diff).sum(1)).sum(dtype=torch.float64)
        if isinstance(self._sym, sparse.spmatrix):
            PY = torch.from_numpy(np.asarray(self._sym @ Y.detach().numpy(), dtype=self._sym.dtype)).to(Y.dtype)
        else:
            PY = self._sym @ Y
        grad = (self._deg * Y - PY).mul_(4.0)
        return e, grad

    def _tile_rows(self) -> int:
        budget = _TILE_BYTES.get(self.device.type, _TILE_BYTES["cpu"])
        return max(1, min(self.n, budget // (4 * 4 * max(self.n, 1))))

    @torch.no_grad()
    def repulsive(self, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ W⁻ exp(−‖y_n − y_m‖²) and its gradient −4 L⁻(Y) Y, one tile of rows at a time.

        The value is summed as Σ W⁻ + Σ W⁻ (exp(−d²) − 1) (Σ W⁻ = 1), with ``expm1``: exact in float32 even for a
        tiny embedding, where exp(−d²) rounds to 1 and the repulsion would otherwise look flat to a line search.
        """
        y_sq = (Y * Y).sum(1)
        total = torch.zeros((), dtype=torch.float64, device=Y.device)
        grad = torch.empty_like(Y)
        step = self._tile_rows()
        direct = Y.shape[1] <= 3  # few dimensions: differences are cheap and avoid ‖a‖² + ‖b‖² − 2ab cancellation
        for start in range(0, self.n, step):
            stop = min(start + step, self.n)
            block = Y[start:stop]
            if direct:
                d2 = (block[:, :1] - Y[:, 0]).square_()
                for j in range(1, Y.shape[1]):
                    d2.add_((block[:, j : j + 1] - Y[:, j]).square_())
            else:
                d2 = torch.addmm(y_sq[None, :], block, Y.T, alpha=-2.0).add_(y_sq[start:stop, None]).clamp_min_(0)
            wk = d2.neg_().expm1_()  # exp(−d²) − 1, in place: the passes over the tile, not arithmetic, bound speed
            if self.X is not None:
                wx = self._cache.get((start, stop)) if self._cache is not None else None
                if wx is None:
                    xb = self.X[start:stop]
                    wx = torch.addmm(self.x_sq[None, :], xb, self.X.T, alpha=-2.0).add_(self.x_sq[start:stop, None])
                    wx.clamp_min_(0)
                    if self._cache is not None:
                        self._cache[(start, stop)] = wx
                wk.mul_(wx)
                total += wk.sum(1).sum(
                    dtype=torch.float64
                )  # float32 row sums: a float64 reduction of the tile is ~15x slower on CPU
                wk.add_(wx)  # w (exp(−d²) − 1) + w = w exp(−d²)
            else:
                total += wk.sum(1).sum(
                    dtype=torch.float64
                )  # float32 row sums: a float64 reduction of the tile is ~15x slower on CPU
                wk.add_(1.0)
            rows = torch.arange(stop - start, device=Y.device)
            wk[rows, rows + start] = 0  # no self-repulsion
            row_sum = wk.sum(1)
            grad[start:stop] = torch.addmm(row_sum[:, None] * block, wk, Y, alpha=-1.0).mul_(-4.0)
        # Σ W⁻ exp(−d²) = Σ W⁻ (exp(−d²) − 1) + Σ W⁻, and Σ W⁻ = 1 (the diagonal adds expm1(0) = 0 to the sum)
        value = total * self.w_scale + (1.0 if self.w_scale > 0 else 0.0)
        return value, grad * self.w_scale

    def __call__(self, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E(Y) and ∇E(Y)."""
        ea, ga = self.attractive(Y)
        er, gr = self.repulsive(Y)
        return ea + self.lam * er, ga + self.lam * gr

    def value(self, Y: torch.Tensor) -> float:
        """E(Y) alone."""
        return float(self(Y)[0])
