"""scDeepCluster: ZINB denoising autoencoder + deep embedded clustering (Tian et al. 2019), on count arrays.

Stages: :class:`CountData` turns raw counts into size factors and z-scored log input one mini-batch at a time;
:class:`ZINBAutoencoder` is the network; :func:`pretrain` fits it to the ZINB likelihood of the raw counts;
:func:`initial_clusters` gives KMeans or Leiden centroids on the latent space; :func:`cluster` runs the joint
ZINB + γ·KL(P‖Q) stage. The ZINB loss is a fused autograd function (:func:`zinb_nll_logits`): it works from the
three output heads' logits, evaluates the gamma functions on the non-zero counts only and computes its gradient
in the same pass, which makes it an order of magnitude faster on a CPU than the composed expression.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from torch import nn

from .distributed import dec_assignments, rank_generator, rank_minibatches, shard, sync_gradients
from .nn import mlp
from .training import adam, train

#: clamps of the original's output activations: mean = clamp(exp, 1e-5, 1e6), dispersion = clamp(softplus, 1e-4, 1e4)
MEAN_MIN, MEAN_MAX = 1e-5, 1e6
DISP_MIN, DISP_MAX = 1e-4, 1e4
_LOG_MEAN_MIN, _LOG_MEAN_MAX = math.log(MEAN_MIN), math.log(MEAN_MAX)
#: rows handled at once outside training (statistics, encoding, target distribution)
INFER_BATCH = 8192


# ----------------------------------------------------------------------------------------------------------------
# ZINB negative log-likelihood
# ----------------------------------------------------------------------------------------------------------------
def zinb_nll(
    x: torch.Tensor, mean: torch.Tensor, disp: torch.Tensor, pi: torch.Tensor, size_factors: torch.Tensor | None = None
) -> torch.Tensor:
    """Element-wise ZINB negative log-likelihood, written plainly (reference for tests and evaluation).

    ``mean`` is the normalised mean, multiplied by ``size_factors`` (one per row); ``disp`` is the inverse
    dispersion θ (variance = m + m²/θ); ``pi`` the zero-inflation probability.
    """
    m = mean if size_factors is None else mean * size_factors[:, None]
    log_theta_m = torch.log(disp + m)
    log_nb = (
        torch.lgamma(x + disp)
        - torch.lgamma(disp)
        - torch.lgamma(x + 1)
        + disp * (torch.log(disp) - log_theta_m)
        + x * (torch.log(m) - log_theta_m)
    )
    log_nb0 = disp * (torch.log(disp) - log_theta_m)
    zero = torch.logaddexp(torch.log(pi), torch.log1p(-pi) + log_nb0)
    return -torch.where(x > 0, torch.log1p(-pi) + log_nb, zero)


def zinb_heads(logits: torch.Tensor, n_genes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three output heads (normalised mean, dispersion, dropout probability) from the decoder's logits."""
    a, b, c = logits.view(logits.shape[0], 3, n_genes).unbind(1)
    return torch.exp(a).clamp(MEAN_MIN, MEAN_MAX), F.softplus(b).clamp(DISP_MIN, DISP_MAX), torch.sigmoid(c)


class _ZINBLogits(torch.autograd.Function):
    """Mean ZINB NLL of counts ``x`` given the stacked head logits ``[a | b | c]`` (rows × 3G) and size factors.

    The gradient is formed analytically while the loss is evaluated (with ρ the posterior probability of the
    negative-binomial component, 1 for non-zero counts; the terms in x vanish where x = 0):
    ∂ℓ/∂a = (ρ m − x) θ/(θ + m), ∂ℓ/∂θ = ρ (log(1 + m/θ) − m/(θ + m)) + x/(θ + m) + ψ(θ) − ψ(x + θ),
    ∂ℓ/∂c = π − 1 + ρ.

    Written so that float32 keeps its precision where θ ≫ m (near-Poisson genes, θ up to 1e4): log(1 + m/θ) comes
    from log1p rather than a difference of two logarithms, and the terms of the non-zero counts are evaluated in
    float64. Differences of nearly equal float32 logarithms there would leave ∂ℓ/∂θ as rounding noise
    (≫ 100 % relative error at θ > 1e3) and log NB(0) = −θ log(1 + m/θ) off by ~1e-2.

    Written for a CPU's memory bandwidth: every operation over the full rows × G block is one pass, so there
    are as few of them as the maths allows (about 26), mostly in place; the terms of the non-zero counts
    (typically 5–15 % of a count matrix) are gathered once; ``nonzero`` (flat indices of the non-zero counts,
    known from a sparse matrix for free) spares the search for them; and on a CPU the clamps' masks are only
    built when a logit is near a clamp, which two reductions tell.
    """

    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, x: torch.Tensor, size_factors: torch.Tensor, nonzero: torch.Tensor | None
    ) -> torch.Tensor:
        logits, x = logits.contiguous(), x.contiguous()
        n_rows, n_genes = x.shape
        a, b, c = logits.view(n_rows, 3, n_genes).unbind(1)
        # elsewhere than on a CPU the extra passes cost little and a host-side test would synchronise
        on_cpu = x.device.type == "cpu"
        clamp_a = not on_cpu or _near_clamp(a, _LOG_MEAN_MIN, _LOG_MEAN_MAX)
        clamp_b = not on_cpu or _near_clamp(b, _SOFTPLUS_INV_DISP_MIN, DISP_MAX)
        m = torch.exp(a)
        if clamp_a:
            m.clamp_(MEAN_MIN, MEAN_MAX)
        m.mul_(size_factors[:, None])
        sp_b = F.softplus(b)
        theta = sp_b.clamp(DISP_MIN, DISP_MAX) if clamp_b else sp_b
        sp_c = F.softplus(c)  # −log(1 − π); log π = c − softplus(c)
        r = m / theta
        log1p_r = torch.log1p(r)  # log(θ + m) − log θ
        log_zero_nb = torch.addcmul(sp_c, theta, log1p_r).neg_()  # log((1 − π) NB(0)) = −softplus(c) − θ log1p_r
        log_pi = c - sp_c
        log_d = torch.logaddexp(log_pi, log_zero_nb)  # log(π + (1 − π) NB(0)): ℓ = −log_d where x = 0
        # where x > 0, ℓ = −log(1 − π) − log NB(x); evaluated on the non-zero entries only
        flat = x.view(-1).nonzero().squeeze(1) if nonzero is None else nonzero
        x_nz = torch.take(x, flat)

        def at_nz(t: torch.Tensor) -> torch.Tensor:
            return torch.take(t, flat)

        wide = torch.float64 if x.device.type != "mps" else x.dtype  # MPS has no float64: keep float32 there
        x64, th64, m64 = x_nz.to(wide), at_nz(theta).to(wide), at_nz(m).to(wide)
        log1p_r64 = torch.log1p(m64 / th64)
        # −log NB(x) − log(1 − π) = softplus(c) + θ log(1 + m/θ) − x log(m/(θ + m)) − log Γ(x + θ) + log Γ(θ)
        # + log Γ(x + 1); log Γ(x + θ) − log Γ(θ) nearly cancel when θ ≫ x, hence float64
        loss_nz = (
            x64 * (log1p_r64 - torch.log(m64 / th64))
            - torch.lgamma(x64 + th64)
            + torch.lgamma(th64)
            + torch.lgamma(x64 + 1)
        )
        total = (loss_nz.sum() - at_nz(log_zero_nb).sum(dtype=wide)).to(x.dtype) - log_d.sum() + at_nz(log_d).sum()
        if ctx.needs_input_grad[0]:
            grad = torch.empty(n_rows, 3, n_genes, dtype=logits.dtype, device=logits.device)
            ga, gb, gc = grad.unbind(1)
            flat_a = flat + (flat // n_genes) * (2 * n_genes)  # the same entries in grad's (rows, 3, G) layout
            rho = log_zero_nb.sub_(log_d).exp_()  # posterior of the NB component at x = 0
            rho.view(-1).index_fill_(0, flat, 1.0)
            inv_1p_r = torch.add(r, 1.0).reciprocal_()  # θ / (θ + m)
            m_w = r.mul_(inv_1p_r)  # m / (θ + m), formed directly: 1 − θ/(θ + m) would lose its precision
            # ∂ℓ/∂a = ρ m θ/(θ + m) (− x θ/(θ + m) where x > 0), zero where exp(a) is clamped
            torch.mul(m, inv_1p_r, out=ga).mul_(rho)
            grad.view(-1).index_add_(0, flat_a, -x_nz * at_nz(inv_1p_r))
            if clamp_a:
                ga.masked_fill_((a < _LOG_MEAN_MIN) | (a > _LOG_MEAN_MAX), 0.0)
            # ∂ℓ/∂θ = ρ (log(1 + m/θ) − m/(θ + m)) (+ x/(θ + m) + ψ(θ) − ψ(x + θ) where x > 0), times softplus' =
            # sigmoid; where x > 0 (ρ = 1) its terms nearly cancel for θ ≫ x, so that part is summed in float64
            gtheta = log1p_r.sub_(m_w).mul_(rho)
            g_nz = log1p_r64 + (x64 - m64) / (th64 + m64) + torch.digamma(th64) - torch.digamma(x64 + th64)
            gtheta.view(-1).index_copy_(0, flat, g_nz.to(x.dtype))
            torch.sigmoid(b, out=gb).mul_(gtheta)
            if clamp_b:
                gb.masked_fill_((sp_b < DISP_MIN) | (sp_b > DISP_MAX), 0.0)
            # ∂ℓ/∂c = π − 1 + ρ
            torch.add(log_pi.exp_(), rho, out=gc).sub_(1.0)
            ctx.save_for_backward(grad.view(n_rows, 3 * n_genes))
        ctx.numel = x.numel()
        return total / ctx.numel

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * (grad_output / ctx.numel), None, None, None


#: softplus(b) < DISP_MIN exactly where b < log(expm1(DISP_MIN))
_SOFTPLUS_INV_DISP_MIN = math.log(math.expm1(DISP_MIN))


def _near_clamp(t: torch.Tensor, low: float, high: float, margin: float = 1e-2) -> bool:
    """Whether any entry of ``t`` lies within ``margin`` of [low, high]'s ends or outside it (one reduction)."""
    if t.numel() == 0:
        return False
    lo, hi = torch.aminmax(t)
    return bool(lo < low + margin) or bool(hi > high - margin)


def zinb_nll_logits(
    logits: torch.Tensor, x: torch.Tensor, size_factors: torch.Tensor, nonzero: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean ZINB negative log-likelihood over rows × genes, from the decoder's stacked logits (fused, fast).

    ``nonzero``, if given, holds the flat indices (into ``x.view(-1)``) of exactly the non-zero counts, as
    :meth:`CountData.batch` returns them; otherwise they are searched for.
    """
    return _ZINBLogits.apply(logits, x, size_factors, nonzero)


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


# ----------------------------------------------------------------------------------------------------------------
# Data: counts → size factors and z-scored log input, one mini-batch at a time
# ----------------------------------------------------------------------------------------------------------------
def _rows(X, rows) -> np.ndarray:
    block = X[rows]
    if sparse.issparse(block):
        block = block.toarray()
    return np.asarray(block, dtype=np.float32)


def _canonical_csr(X):
    """Sparse counts as CSR without duplicate entries (copied only when needed); dense arrays as they are.

    Duplicates must be added up before any per-entry transform (log1p of two halves is not log1p of the sum).
    """
    if not sparse.issparse(X):
        return X
    if X.format != "csr":
        X = sparse.csr_matrix(X)
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    return X


def library_sizes(X) -> np.ndarray:
    """Total counts per cell (float64), without densifying."""
    return np.asarray(X.sum(1), dtype=np.float64).ravel()


def select_genes_by_zero_rate(X, n: int, *, atleast: int = 10, decay: float = 1.5, yoffset: float = 0.02) -> np.ndarray:
    """Indices of the ``n`` genes (approximately) whose zero rate is highest for their mean expression.

    Kobak & Berens (2019), as scDeepCluster's ``geneSelection``: a gene is kept when its zero rate exceeds
    exp(−decay (mean log2 non-zero expression − x₀)) + yoffset; x₀ is found by bisection so that about ``n``
    genes pass. Genes detected in fewer than ``atleast`` cells are never kept.
    """
    n_cells, n_genes = X.shape
    detected = np.zeros(n_genes)
    log_sum = np.zeros(n_genes)
    for start in range(0, n_cells, INFER_BATCH):
        block = X[start : start + INFER_BATCH]
        if sparse.issparse(block):
            block = sparse.csr_matrix(block, dtype=np.float64)
            block.eliminate_zeros()
            detected += np.bincount(block.indices, minlength=n_genes)
            log_sum += np.bincount(block.indices, weights=np.log2(block.data), minlength=n_genes)
        else:
            block = np.asarray(block, dtype=np.float64)
            pos = block > 0
            detected += pos.sum(0)
            log_sum += np.where(pos, np.log2(np.where(pos, block, 1.0)), 0.0).sum(0)
    zero_rate = 1.0 - detected / n_cells
    mean_expr = np.full(n_genes, np.nan)
    ok = detected >= max(atleast, 1)
    mean_expr[ok] = log_sum[ok] / detected[ok]
    low, up, xoffset = 0.0, 10.0, 5.0
    best = None
    for _ in range(100):
        selected = np.zeros(n_genes, dtype=bool)
        selected[ok] = zero_rate[ok] > np.exp(-decay * (mean_expr[ok] - xoffset)) + yoffset
        if best is None or abs(selected.sum() - n) < abs(best.sum() - n):
            best = selected
        if selected.sum() == n:
            break
        if selected.sum() < n:
            up, xoffset = xoffset, (xoffset + low) / 2
        else:
            low, xoffset = xoffset, (xoffset + up) / 2
    return np.flatnonzero(best)


class MiniBatch(NamedTuple):
    """What the network and the loss need of some cells (see :meth:`CountData.batch`)."""

    xin: torch.Tensor  #: encoder input: z-scored log1p of the normalised counts, rows × genes
    counts: torch.Tensor  #: raw counts, dense rows × genes
    size_factors: torch.Tensor  #: per row
    onehot: torch.Tensor | None  #: batch one-hot (batch-aware model), else None
    nonzero: torch.Tensor | None  #: flat indices of the non-zero counts when known (sparse input), else None


@dataclass
class CountData:
    """Raw counts of the genes used, with what the network needs per mini-batch.

    ``X`` stays as given (CSR or dense); rows are densified one batch at a time. The input of the encoder is
    the z-score (with the training cells' gene means and standard deviations) of log1p of the counts
    normalised to ``target_sum``; the likelihood is evaluated on the raw counts with size factors
    library size / ``target_sum``.
    """

    X: np.ndarray | sparse.csr_matrix
    genes: np.ndarray  # column indices of X that the model uses
    size_factors: np.ndarray  # float32, per cell
    target_sum: float
    gene_mean: np.ndarray
    gene_std: np.ndarray
    batch_codes: np.ndarray | None = None  # int, per cell
    n_batches: int = 0

    @property
    def n_obs(self) -> int:
        return self.X.shape[0]

    def batch(self, rows, device: torch.device) -> MiniBatch:
        """Encoder input, raw counts, size factors, batch one-hot (and, from sparse counts, non-zeros) of ``rows``.

        From a sparse matrix only the non-zero counts are transformed (log1p of zero is zero, so a zero's
        input is −mean / std) and sent to the device, and their flat indices come for free from the CSR
        structure; dense counts are densified rows as they are.
        """
        sf = torch.from_numpy(self.size_factors[rows]).to(device)
        mean = torch.as_tensor(self.gene_mean, device=device)
        std = torch.as_tensor(self.gene_std, device=device)
        nonzero = None
        if sparse.issparse(self.X):
            # canonical: the scatter below would not add up duplicate entries
            block = _canonical_csr(self.X[rows])
            if len(self.genes) != block.shape[1]:
                block = _canonical_csr(block[:, self.genes])
            n_rows, n_genes = block.shape
            values = np.asarray(block.data, dtype=np.float32)
            row_of = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(block.indptr))
            col_of = np.asarray(block.indices, dtype=np.int64)
            stored_zero = values == 0
            if stored_zero.any():  # explicit zeros are zeros: the loss needs exactly the non-zero counts
                keep = ~stored_zero
                values, row_of, col_of = values[keep], row_of[keep], col_of[keep]
            values_t = torch.from_numpy(values).to(device)
            row_t = torch.from_numpy(row_of).to(device)
            col_t = torch.from_numpy(col_of).to(device)
            nonzero = row_t * n_genes + col_t
            raw = torch.zeros(n_rows, n_genes, device=device)
            raw.view(-1).index_copy_(0, nonzero, values_t)
            xin = mean.div(std).neg_().expand(n_rows, n_genes).clone()
            log_values = torch.log1p(values_t * sf.reciprocal().index_select(0, row_t))
            z_values = (log_values - mean.index_select(0, col_t)) / std.index_select(0, col_t)
            xin.view(-1).index_copy_(0, nonzero, z_values)
        else:
            block = _rows(self.X, rows)
            raw = torch.from_numpy(block if len(self.genes) == block.shape[1] else block[:, self.genes])
            raw = raw.to(device, non_blocking=True)
            xin = torch.log1p(raw * (1.0 / sf)[:, None]).sub_(mean).div_(std)
        onehot = None
        if self.n_batches:
            codes = torch.from_numpy(np.asarray(self.batch_codes[rows], dtype=np.int64)).to(device)
            onehot = F.one_hot(codes, self.n_batches).to(torch.float32)
        return MiniBatch(xin, raw, sf, onehot, nonzero)

    @classmethod
    def fit(
        cls,
        X,
        genes: np.ndarray,
        batch_codes: np.ndarray | None = None,
        n_batches: int = 0,
    ) -> CountData:
        """Size factors (library / median library) and gene statistics of the normalised log counts."""
        X = _canonical_csr(X)
        sub = X if len(genes) == X.shape[1] else X[:, genes]
        lib = library_sizes(sub)
        target = float(np.median(lib))
        s1 = np.zeros(len(genes))
        s2 = np.zeros(len(genes))
        for start in range(0, X.shape[0], INFER_BATCH):
            block = sub[start : start + INFER_BATCH]
            scale = target / lib[start : start + INFER_BATCH]
            if sparse.issparse(block):
                block = sparse.csr_matrix(block.multiply(scale[:, None]), dtype=np.float64)
                block.data = np.log1p(block.data)
                s1 += np.asarray(block.sum(0)).ravel()
                s2 += np.asarray(block.multiply(block).sum(0)).ravel()
            else:
                block = np.log1p(np.asarray(block, dtype=np.float64) * scale[:, None])
                s1 += block.sum(0)
                s2 += (block * block).sum(0)
        n = X.shape[0]
        mean = s1 / n
        var = np.maximum(s2 - n * mean**2, 0.0) / max(n - 1, 1)  # ddof = 1, as scanpy's scale
        std = np.sqrt(var)
        std[std == 0] = 1.0
        return cls(
            X=X,
            genes=np.asarray(genes, dtype=np.int64),
            size_factors=(lib / target).astype(np.float32),
            target_sum=target,
            gene_mean=mean.astype(np.float32),
            gene_std=std.astype(np.float32),
            batch_codes=batch_codes,
            n_batches=n_batches,
        )

    def like(self, X, batch_codes: np.ndarray | None = None) -> CountData:
        """New cells normalised with this data's target sum and gene statistics (for prediction)."""
        X = _canonical_csr(X)
        sub = X if len(self.genes) == X.shape[1] else X[:, self.genes]
        lib = library_sizes(sub)
        return CountData(
            X=X,
            genes=self.genes,
            size_factors=(lib / self.target_sum).astype(np.float32),
            target_sum=self.target_sum,
            gene_mean=self.gene_mean,
            gene_std=self.gene_std,
            batch_codes=batch_codes,
            n_batches=self.n_batches,
        )


# ----------------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------------
class ZINBAutoencoder(nn.Module):
    """Encoder G(+B) → hidden → z (linear bottleneck); decoder z(+B) → reversed hidden → 3 heads × G genes.

    The three heads (mean, dispersion, dropout) are one Linear layer of width 3G. ``centroids`` holds the
    cluster centres of the clustering stage (empty before it). With batches, the one-hot batch is appended to
    the encoder's and the decoder's inputs.
    """

    def __init__(self, n_genes: int, z_dim: int = 32, hidden: Sequence[int] = (256, 64), n_batches: int = 0):
        super().__init__()
        self.n_genes, self.z_dim, self.n_batches, self.hidden = n_genes, z_dim, n_batches, tuple(hidden)
        self.encoder = mlp([n_genes + n_batches, *hidden, z_dim], batchnorm=False)
        dec = [z_dim + n_batches, *reversed(hidden)]
        self.decoder = mlp(dec, batchnorm=False, final_activation=True)
        self.heads = nn.Linear(dec[-1], 3 * n_genes)
        self.centroids = nn.Parameter(torch.zeros(0, z_dim))

    def set_centroids(self, centroids: torch.Tensor) -> None:
        self.centroids = nn.Parameter(centroids.to(self.heads.weight))

    def encode(self, x: torch.Tensor, onehot: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(x if onehot is None else torch.cat([x, onehot], 1))

    def decode(self, z: torch.Tensor, onehot: torch.Tensor | None = None) -> torch.Tensor:
        """Stacked head logits ``[a | b | c]``, rows × 3G (see :func:`zinb_heads`)."""
        return self.heads(self.decoder(z if onehot is None else torch.cat([z, onehot], 1)))


def _with_noise(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """The denoising input ``x`` + σ·N(0, 1), in one pass over ``x``; ``x`` itself when σ = 0."""
    if not sigma:
        return x
    return torch.add(x, torch.randn(x.shape, generator=generator, device=x.device), alpha=sigma)


@torch.no_grad()
def encode_all(net: ZINBAutoencoder, data: CountData, device: torch.device, rows: slice | None = None) -> torch.Tensor:
    """Latent coordinates of every cell (or of the cells in ``rows``; no noise), in batches; float32 on ``device``."""
    out = []
    first, last = (0, data.n_obs) if rows is None else (rows.start, rows.stop)
    for start in range(first, last, INFER_BATCH):
        mb = data.batch(slice(start, min(start + INFER_BATCH, last)), device)
        out.append(net.encode(mb.xin, mb.onehot))
    return torch.cat(out) if out else torch.empty(0, net.z_dim, device=device)


@torch.no_grad()
def assignments(z: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft assignments Q and targets P of all cells, computed in chunks (P needs Q's column sums first)."""
    chunks = [soft_assign(z[s : s + INFER_BATCH], centroids) for s in range(0, z.shape[0], INFER_BATCH)]
    q = torch.cat(chunks)
    f = q.sum(0)
    p = torch.cat([target_distribution(q[s : s + INFER_BATCH], f) for s in range(0, q.shape[0], INFER_BATCH)])
    return q, p


# ----------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------
def pretrain(
    net: ZINBAutoencoder,
    data: CountData,
    *,
    epochs: int,
    batch_size: int,
    sigma: float,
    lr: float = 1e-3,
    device: torch.device,
    generator: torch.Generator,
    noise_generator: torch.Generator,
    show_progress: bool | None = None,
) -> dict[str, list[float]]:
    """Denoising ZINB autoencoder: Gaussian noise σ on the encoder input, Adam(amsgrad) on the ZINB NLL."""
    opt = adam(net.parameters(), lr=lr, amsgrad=True)
    n = data.n_obs
    # under torchrun: this rank's share of the batches, its own noise (distributed.py); one process: unchanged
    noise_generator = rank_generator(noise_generator)

    def step(epoch: int) -> float:
        net.train()
        total = torch.zeros((), device=device)
        batches = rank_minibatches(n, batch_size, generator=generator)
        for idx in batches:
            rows = idx.numpy()
            xin, raw, sf, onehot, nonzero = data.batch(rows, device)
            noisy = _with_noise(xin, sigma, noise_generator)
            loss = zinb_nll_logits(net.decode(net.encode(noisy, onehot), onehot), raw, sf, nonzero)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(rows)
        return float(total) / sum(len(b) for b in batches)

    history, _ = train(step, epochs, desc="scDeepCluster pretraining", show_progress=show_progress, monitor="zinb")
    return history


def initial_clusters(
    z: np.ndarray,
    n_clusters: int,
    *,
    knn: int = 20,
    resolution: float = 0.2,
    n_init: int = 20,
    random_state: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Initial labels and centroids: KMeans with ``n_clusters`` > 0, else Leiden on the latent kNN graph.

    The graph has scanpy's (UMAP's) fuzzy connectivities on the ``knn`` nearest neighbours (``knn`` counting
    the cell itself, as ``scanpy.pp.neighbors``), so that ``resolution`` means what it means in
    ``scanpy.tl.leiden``; the centroids are the clusters' means.
    """
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
    """UMAP's fuzzy simplicial set (as ``scanpy.pp.neighbors``): exp(−(d − ρ_i)/σ_i), fuzzy union."""
    n, k = indices.shape
    rho = distances[:, 0].astype(np.float64)
    d = distances.astype(np.float64) - rho[:, None]
    d = np.maximum(d, 0.0)
    target = np.log2(n_neighbors)  # UMAP's smooth_knn_dist; n_neighbors counts the cell itself, as scanpy
    lo, hi = np.zeros(n), np.full(n, np.inf)
    sigma = np.ones(n)
    for _ in range(64):
        psum = np.exp(-d / sigma[:, None]).sum(1)
        too_big = psum > target
        hi = np.where(too_big, sigma, hi)
        lo = np.where(too_big, lo, sigma)
        sigma = np.where(np.isinf(hi), sigma * 2, (lo + hi) / 2)
    mean_d = distances.mean()
    sigma = np.maximum(sigma, 1e-3 * np.where(rho > 0, distances.mean(1), mean_d))
    w = np.exp(-d / sigma[:, None])
    W = sparse.csr_matrix((w.ravel(), indices.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))
    prod = W.multiply(W.T)
    return sparse.csr_matrix(W + W.T - prod)


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
    maxiter: int,
    batch_size: int,
    sigma: float,
    gamma: float,
    update_interval: int,
    tol: float,
    lr: float = 1.0,
    device: torch.device,
    generator: torch.Generator,
    noise_generator: torch.Generator,
    show_progress: bool | None = None,
) -> tuple[dict[str, list[float]], bool]:
    """Joint stage: ZINB(noisy input) + γ·KL(P‖Q(clean input)), Adadelta(lr, ρ=0.95) on network and centroids.

    P is recomputed on all cells (in chunks) every ``update_interval`` epochs; training stops when the share
    of labels that changed since the previous update falls below ``tol``. Returns the history (total, zinb, kl,
    delta_label per update) and whether it converged.
    """
    opt = torch.optim.Adadelta(net.parameters(), lr=lr, rho=0.95)
    sync_gradients(opt)  # under torchrun (distributed.py): gradients averaged over ranks before each step
    noise_generator = rank_generator(noise_generator)
    n = data.n_obs
    net.eval()
    # targets from this rank's cells and all-reduced cluster sums, gathered (one process: assignments on all cells)
    _, p = dec_assignments(encode_all(net, data, device, shard(n)), net.centroids.detach())
    state = {"p": p, "labels": torch.as_tensor(init_labels, device=device), "converged": False}
    deltas: list[float] = []

    def step(epoch: int) -> dict[str, float]:
        net.train()
        sums = torch.zeros(3, device=device)
        batches = rank_minibatches(n, batch_size, generator=generator)
        for idx in batches:
            rows = idx.numpy()
            xin, raw, sf, onehot, nonzero = data.batch(rows, device)
            noisy = _with_noise(xin, sigma, noise_generator)
            # one encoder pass over the noisy and the clean input together
            z = net.encode(torch.cat([noisy, xin]), None if onehot is None else torch.cat([onehot, onehot]))
            z_noisy, z_clean = z.chunk(2)
            recon = zinb_nll_logits(net.decode(z_noisy, onehot), raw, sf, nonzero)
            kl = kl_divergence(state["p"][idx.to(device)], soft_assign(z_clean, net.centroids))
            loss = recon + gamma * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums += torch.stack([loss.detach(), recon.detach(), kl.detach()]) * len(rows)
        if (epoch + 1) % update_interval == 0:
            net.eval()
            q, state["p"] = dec_assignments(encode_all(net, data, device, shard(n)), net.centroids.detach())
            labels = q.argmax(1)
            delta = float((labels != state["labels"]).float().mean())
            state["labels"] = labels
            deltas.append(delta)
            state["converged"] = delta < tol
        total, recon, kl = (sums / sum(len(b) for b in batches)).tolist()
        return {"loss": total, "zinb": recon, "kl": kl}

    def stop(epoch: int, losses) -> bool:
        return state["converged"]

    history, _ = train(step, maxiter, desc="scDeepCluster clustering", show_progress=show_progress, stop=stop)
    history["delta_label"] = deltas
    return history, bool(state["converged"])


@torch.no_grad()
def infer(net: ZINBAutoencoder, data: CountData, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Latent coordinates and soft assignments of every cell (float32 numpy)."""
    net.eval()
    z = encode_all(net, data, device)
    q = assignments(z, net.centroids)[0] if net.centroids.shape[0] else torch.empty(z.shape[0], 0)
    return z.cpu().numpy(), q.cpu().numpy()
