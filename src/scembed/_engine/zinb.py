"""Likelihoods of a count autoencoder's output: ZINB, NB (ZINB without zero inflation) and MSE.

The decoder of a count autoencoder ends in one Linear head per parameter of the likelihood, each rows × G: the
logits ``a, b, c`` for the zero-inflated negative binomial (mean = exp(a), inverse dispersion θ = softplus(b),
dropout π = sigmoid(c)), ``a, b`` for the negative binomial, and the reconstruction itself for the mean squared
error. The loss functions take the heads as a sequence, or stacked side by side in one tensor (``[a | b | c]``,
rows × 3G). :func:`reconstruction_loss` dispatches on the likelihood's name. The NB loss is the ZINB code path
with π = 0: one fused autograd function (:class:`_ZINBLogits`) serves both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

Likelihood = Literal["zinb", "nb", "mse"]
LIKELIHOODS: tuple[str, ...] = ("zinb", "nb", "mse")
#: output logits per gene of each likelihood
N_HEADS = {"zinb": 3, "nb": 2, "mse": 1}
#: where a count likelihood's dispersion comes from: a decoder head (one value per cell and gene) or one free
#: parameter per gene
DISPERSIONS: tuple[str, ...] = ("cell", "gene")

#: clamps of the original's output activations: mean = clamp(exp, 1e-5, 1e6), dispersion = clamp(softplus, 1e-4, 1e4)
MEAN_MIN, MEAN_MAX = 1e-5, 1e6
DISP_MIN, DISP_MAX = 1e-4, 1e4
_LOG_MEAN_MIN, _LOG_MEAN_MAX = math.log(MEAN_MIN), math.log(MEAN_MAX)
#: softplus(b) < DISP_MIN exactly where b < log(expm1(DISP_MIN))
_SOFTPLUS_INV_DISP_MIN = math.log(math.expm1(DISP_MIN))


# ----------------------------------------------------------------------------------------------------------------
# Plain expressions (references for tests and evaluation)
# ----------------------------------------------------------------------------------------------------------------
def nb_log_prob(x: torch.Tensor, mean: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    """Element-wise log NB(x; mean, θ = ``disp``), variance m + m²/θ (mean already scaled by the size factors)."""
    log_theta_m = torch.log(disp + mean)
    return (
        torch.lgamma(x + disp)
        - torch.lgamma(disp)
        - torch.lgamma(x + 1)
        + disp * (torch.log(disp) - log_theta_m)
        + x * (torch.log(mean) - log_theta_m)
    )


def zinb_nll(
    x: torch.Tensor, mean: torch.Tensor, disp: torch.Tensor, pi: torch.Tensor, size_factors: torch.Tensor | None = None
) -> torch.Tensor:
    """Element-wise ZINB negative log-likelihood, written plainly (reference for tests and evaluation).

    ``mean`` is the normalised mean, multiplied by ``size_factors`` (one per row); ``disp`` is the inverse
    dispersion θ (variance = m + m²/θ); ``pi`` the zero-inflation probability.
    """
    m = mean if size_factors is None else mean * size_factors[:, None]
    log_nb = nb_log_prob(x, m, disp)
    log_nb0 = disp * (torch.log(disp) - torch.log(disp + m))
    zero = torch.logaddexp(torch.log(pi), torch.log1p(-pi) + log_nb0)
    return -torch.where(x > 0, torch.log1p(-pi) + log_nb, zero)


def nb_nll(
    x: torch.Tensor, mean: torch.Tensor, disp: torch.Tensor, size_factors: torch.Tensor | None = None
) -> torch.Tensor:
    """Element-wise NB negative log-likelihood, written plainly (the ZINB's with π = 0)."""
    m = mean if size_factors is None else mean * size_factors[:, None]
    return -nb_log_prob(x, m, disp)


def zinb_heads(
    logits: torch.Tensor | Sequence[torch.Tensor], n_genes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The normalised mean, dispersion and dropout probability from the decoder's heads (or ``[a | b | c]``)."""
    a, b, c = _split_heads(logits, 3, n_genes)
    return torch.exp(a).clamp(MEAN_MIN, MEAN_MAX), F.softplus(b).clamp(DISP_MIN, DISP_MAX), torch.sigmoid(c)


def nb_heads(logits: torch.Tensor | Sequence[torch.Tensor], n_genes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised mean and dispersion of the NB likelihood from the decoder's heads (or ``[a | b]``)."""
    a, b = _split_heads(logits, 2, n_genes)
    return torch.exp(a).clamp(MEAN_MIN, MEAN_MAX), F.softplus(b).clamp(DISP_MIN, DISP_MAX)


# ----------------------------------------------------------------------------------------------------------------
# Fused loss
# ----------------------------------------------------------------------------------------------------------------
#: on a CPU, the non-zero counts up to this are handled by :func:`_summed_count_terms` (finite sums), the larger
#: and the non-integer ones by lgamma and digamma in float64 (:func:`_special_count_terms`); elsewhere all by the
#: latter, whose functions a GPU evaluates at little cost and whose sizes need no host-side count
SMALL_COUNT_MAX = 16
#: whether a CPU uses :func:`_summed_count_terms` (tests switch it off to check the other way against it)
TERM_SUMS_ON_CPU = True


def _special_count_terms(
    x: torch.Tensor, theta: torch.Tensor, m: torch.Tensor, wide: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-zero counts' loss terms, summed, and their part of ∂ℓ/∂θ, by lgamma and digamma in ``wide``.

    The sum over the counts ``x`` of x log((θ + m)/m) − log Γ(x + θ) + log Γ(θ) + log Γ(x + 1), and per count
    the part of ∂ℓ/∂θ beyond a zero count's, x/(θ + m) + ψ(θ) − ψ(x + θ). In float64 because log Γ(x + θ) −
    log Γ(θ) and ψ(θ) − ψ(x + θ) nearly cancel when θ ≫ x.
    """
    x64, th64, m64 = x.to(wide), theta.to(wide), m.to(wide)
    loss = (
        x64 * (torch.log1p(m64 / th64) - torch.log(m64 / th64))
        - torch.lgamma(x64 + th64)
        + torch.lgamma(th64)
        + torch.lgamma(x64 + 1)
    )
    return loss.sum(), x64 / (th64 + m64) + torch.digamma(th64) - torch.digamma(x64 + th64)


def _summed_count_terms(
    x: torch.Tensor, flat: torch.Tensor, theta: torch.Tensor, m: torch.Tensor, wide: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :func:`_special_count_terms` gives, from finite sums where the counts are small.

    The loss terms are summed over the non-zero counts ``x`` (at the flat indices ``flat`` of ``theta`` and
    ``m``); the gradient part x/(θ + m) + ψ(θ) − ψ(x + θ) comes per count at the flat indices returned with it
    (``flat`` reordered).

    For an integer count x the gamma functions are finite sums over j = 0 … x − 1:
    log Γ(x + θ) − log Γ(θ) = Σ log(θ + j) and ψ(x + θ) − ψ(θ) = Σ 1/(θ + j), so with u_j = (m − j)/(θ + j)
    the bracket is Σ log1p(u_j) − x log m + log x! and the gradient part is −Σ u_j/(θ + m): every term is
    small where θ ≫ x, m, and nothing cancels, so the input's precision (float32) suffices. The counts are
    sorted by value once, so that the counts above j are a contiguous tail for every j. Counts above
    :data:`SMALL_COUNT_MAX` (a few per cent of the non-zeros in UMI data) and non-integer values go through
    :func:`_special_count_terms`. A CPU evaluates lgamma and digamma one value at a time, far more slowly than
    these sums (``benchmarks/README.md``, "tl.autoencoder": the loss on data with many non-zero counts).
    """
    whole = x.to(torch.int32)
    small = (whole <= SMALL_COUNT_MAX) & (whole.to(x.dtype) == x)
    key = torch.where(small, whole, SMALL_COUNT_MAX + 1).to(torch.uint8)
    # stable: each value's counts keep their order in memory, so the gathers below run forward through it
    key_sorted, order = torch.sort(key, stable=True)
    values = torch.arange(SMALL_COUNT_MAX + 2, dtype=key_sorted.dtype, device=x.device)
    ends = torch.searchsorted(key_sorted, values, right=True).tolist()  # the counts ≤ v end at ends[v]
    n_small = ends[SMALL_COUNT_MAX]
    flat_sorted = flat.index_select(0, order)
    head = flat_sorted[:n_small]
    th_s, m_s = torch.take(theta, head), torch.take(m, head)
    inv_tm = torch.add(th_s, m_s).reciprocal_()
    log_terms = torch.zeros_like(th_s)
    g_extra = torch.zeros_like(th_s)
    for j in range(SMALL_COUNT_MAX):
        start = ends[j]  # the counts above j: [start, n_small)
        if start >= n_small:
            break
        u = torch.sub(m_s[start:], j).div_(torch.add(th_s[start:], j))
        g_extra[start:].addcmul_(u, inv_tm[start:], value=-1.0)
        log_terms[start:].add_(u.log1p_())
    n_of_value = torch.tensor(ends[: SMALL_COUNT_MAX + 1], dtype=wide).diff(prepend=torch.zeros(1, dtype=wide))
    log_factorials = torch.lgamma(torch.arange(1, SMALL_COUNT_MAX + 2, dtype=wide))
    loss = (
        log_terms.sum(dtype=wide)
        - (key_sorted[:n_small].to(x.dtype) * torch.log(m_s)).sum(dtype=wide)
        + (n_of_value * log_factorials).sum().to(x.device)
    )
    if n_small < x.numel():
        rest = flat_sorted[n_small:]
        loss_rest, g_rest = _special_count_terms(
            x.index_select(0, order[n_small:]),
            torch.take(theta, rest),
            torch.take(m, rest),
            wide,
        )
        loss = loss + loss_rest
        g_extra = torch.cat([g_extra, g_rest.to(x.dtype)])
    return loss, g_extra, flat_sorted


#: on a CPU the loss runs over blocks of rows of about this many entries (2 MB in float32), so that its ~26 passes
#: over a block find it in the cache rather than in memory
BLOCK_ENTRIES = 1 << 19


def _zinb_block(
    heads: list[torch.Tensor],
    x: torch.Tensor,
    size_factors: torch.Tensor,
    flat: torch.Tensor,
    grads: list[torch.Tensor] | None,
) -> torch.Tensor:
    """The summed loss of one block of rows (:class:`_ZINBLogits`); writes the heads' gradients into ``grads``."""
    zero_inflated = len(heads) == 3
    a, b = heads[0], heads[1]
    c = heads[2] if zero_inflated else None
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
    r = m / theta
    log1p_r = torch.log1p(r)  # log(θ + m) − log θ
    if zero_inflated:
        sp_c = F.softplus(c)  # −log(1 − π); log π = c − softplus(c)
        log_zero_nb = torch.addcmul(sp_c, theta, log1p_r).neg_()  # log((1 − π) NB(0)) = −softplus(c) − θ log1p_r
        log_pi = c - sp_c
        log_d = torch.logaddexp(log_pi, log_zero_nb)  # log(π + (1 − π) NB(0)): ℓ = −log_d where x = 0
    else:
        log_zero_nb = torch.mul(theta, log1p_r).neg_()  # log NB(0) = −θ log1p_r
        log_d = log_zero_nb
    # where x > 0, ℓ = −log(1 − π) − log NB(x); evaluated on the non-zero entries only
    x_nz = torch.take(x, flat)

    def at_nz(t: torch.Tensor) -> torch.Tensor:
        return torch.take(t, flat)

    wide = torch.float64 if x.device.type != "mps" else x.dtype  # MPS has no float64: keep float32 there
    # −log NB(x) − log(1 − π) = softplus(c) + θ log(1 + m/θ) + [x log((θ + m)/m) − log Γ(x + θ) + log Γ(θ)
    # + log Γ(x + 1)]: the bracket, summed over the non-zeros, and its part of ∂ℓ/∂θ beyond the zeros' one
    if on_cpu and TERM_SUMS_ON_CPU:
        loss_nz_sum, g_extra, flat_g = _summed_count_terms(x_nz, flat, theta, m, wide)
    else:
        loss_nz_sum, g_extra = _special_count_terms(x_nz, at_nz(theta), at_nz(m), wide)
        flat_g = flat
    # Σ over the zeros of −log_d, as the sum over all entries minus that over the non-zeros
    total = (loss_nz_sum - at_nz(log_zero_nb).sum(dtype=wide)).to(x.dtype) - log_d.sum() + at_nz(log_d).sum()
    if grads is not None:
        ga, gb = grads[0], grads[1]
        if zero_inflated:
            rho = log_zero_nb.sub_(log_d).exp_()  # posterior of the NB component at x = 0
            rho.view(-1).index_fill_(0, flat, 1.0)
        else:
            rho = None  # 1 everywhere
        inv_1p_r = torch.add(r, 1.0).reciprocal_()  # θ / (θ + m)
        m_w = r.mul_(inv_1p_r)  # m / (θ + m), formed directly: 1 − θ/(θ + m) would lose its precision
        # ∂ℓ/∂a = ρ m θ/(θ + m) (− x θ/(θ + m) where x > 0), zero where exp(a) is clamped
        torch.mul(m, inv_1p_r, out=ga)
        if rho is not None:
            ga.mul_(rho)
        ga.view(-1).scatter_add_(0, flat, -x_nz * at_nz(inv_1p_r))  # scatter_add_: faster than index_add_
        if clamp_a:
            ga.masked_fill_((a < _LOG_MEAN_MIN) | (a > _LOG_MEAN_MAX), 0.0)
        # ∂ℓ/∂θ = ρ (log(1 + m/θ) − m/(θ + m)) (+ x/(θ + m) + ψ(θ) − ψ(x + θ) where x > 0), times softplus' =
        # sigmoid; where x > 0 (ρ = 1) the bracket's terms nearly cancel for θ ≫ x: it comes from the finite sums
        # (CPU) or in float64, added there
        gtheta = log1p_r.sub_(m_w)
        if rho is not None:
            gtheta.mul_(rho)
        gtheta.view(-1).scatter_add_(0, flat_g, g_extra.to(x.dtype))
        torch.sigmoid(b, out=gb).mul_(gtheta)
        if clamp_b:
            gb.masked_fill_((sp_b < DISP_MIN) | (sp_b > DISP_MAX), 0.0)
        if zero_inflated:
            # ∂ℓ/∂c = π − 1 + ρ
            torch.add(log_pi.exp_(), rho, out=grads[2]).sub_(1.0)
    return total


class _ZINBLogits(torch.autograd.Function):
    """Mean ZINB (or NB) NLL of counts ``x`` given the head logits and the size factors.

    The heads are ``a, b, c`` (each rows × G) for the ZINB and ``a, b`` for the NB (``c`` is ``None``), which is
    the ZINB with π = 0 (c → −∞): then ρ = 1, log(π + (1 − π) NB(0)) = log NB(0) and there is no ∂ℓ/∂c.

    The gradient is formed analytically while the loss is evaluated (with ρ the posterior probability of the
    negative-binomial component, 1 for non-zero counts; the terms in x vanish where x = 0):
    ∂ℓ/∂a = (ρ m − x) θ/(θ + m), ∂ℓ/∂θ = ρ (log(1 + m/θ) − m/(θ + m)) + x/(θ + m) + ψ(θ) − ψ(x + θ),
    ∂ℓ/∂c = π − 1 + ρ.

    Written so that float32 keeps its precision where θ ≫ m (near-Poisson genes, θ up to 1e4): log(1 + m/θ) comes
    from log1p rather than a difference of two logarithms, and the gamma and digamma differences of the non-zero
    counts come from finite sums of small terms (:func:`_summed_count_terms`, on a CPU) or are evaluated in
    float64 (:func:`_special_count_terms`). Differences of nearly equal float32 logarithms there would leave
    ∂ℓ/∂θ as rounding noise (≫ 100 % relative error at θ > 1e3) and log NB(0) = −θ log(1 + m/θ) off by ~1e-2.

    Written for a CPU's memory bandwidth: every operation over the full rows × G block is one pass, so there
    are as few of them as the maths allows (about 26), mostly in place, and a CPU makes them over blocks of rows
    of :data:`BLOCK_ENTRIES` entries, each block staying in the cache through its passes; the terms of the
    non-zero counts (typically 5–15 % of a count matrix) are gathered once; ``nonzero`` (flat indices of the
    non-zero counts, known from a sparse matrix for free) spares the search for them; and on a CPU the clamps'
    masks are only built when a logit is near a clamp, which two reductions tell. Each head's gradient is its own
    rows × G tensor, as each head is its own layer: a block three times as wide would, beyond glibc's 32 MB mmap
    threshold (~11,000 genes at 256 cells), be fresh memory every step, every page of it faulting anew.
    """

    @staticmethod
    def forward(
        ctx,
        a: torch.Tensor,
        b: torch.Tensor,
        c: torch.Tensor | None,
        x: torch.Tensor,
        size_factors: torch.Tensor,
        nonzero: torch.Tensor | None,
    ) -> torch.Tensor:
        x = x.contiguous()
        for name, head in (("a", a), ("b", b), ("c", c)):
            if head is not None and head.shape != x.shape:
                raise ValueError(
                    f"expected the head {name} of shape {tuple(x.shape)} as the counts, got {tuple(head.shape)}"
                )
        on_cpu = x.device.type == "cpu"
        flat = x.view(-1).nonzero().squeeze(1) if nonzero is None else nonzero
        heads = [a, b] if c is None else [a, b, c]
        grads = None
        if any(ctx.needs_input_grad[: len(heads)]):
            grads = [torch.empty_like(h, memory_format=torch.contiguous_format) for h in heads]
        n_rows, n_genes = x.shape
        step = max(1, BLOCK_ENTRIES // max(n_genes, 1)) if on_cpu else n_rows
        if step >= n_rows:
            total = _zinb_block(heads, x, size_factors, flat, grads)
        else:
            if flat.numel() > 1 and not bool((flat[1:] >= flat[:-1]).all()):
                flat = flat.sort().values  # given in another order than row by row
            starts = list(range(0, n_rows, step))
            bounds = torch.tensor([*starts, n_rows], dtype=flat.dtype, device=flat.device) * n_genes
            cuts = torch.searchsorted(flat, bounds).tolist()
            total = x.new_zeros(())
            for k, r0 in enumerate(starts):
                rows = slice(r0, min(r0 + step, n_rows))
                total += _zinb_block(
                    [h[rows] for h in heads],
                    x[rows],
                    size_factors[rows],
                    flat[cuts[k] : cuts[k + 1]] - r0 * n_genes,
                    None if grads is None else [g[rows] for g in grads],
                )
        if grads is not None:
            ctx.save_for_backward(*grads)
        ctx.numel = x.numel()
        ctx.scaled_by = None
        return total / ctx.numel

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grads = ctx.saved_tensors
        scale = grad_output / ctx.numel
        if ctx.scaled_by is not None:  # a second backward through a retained graph: the buffers hold grad × the first
            out = [g * (scale / ctx.scaled_by) for g in grads]
        elif grads[0].device.type == "cpu" and bool(scale != 0):
            # scaled in place on a CPU (through .data, so that a second backward may still read the saved tensors:
            # ``scaled_by`` undoes it): new rows × G tensors would be fresh memory every step
            ctx.scaled_by = scale
            for g in grads:
                g.data.mul_(scale)
            out = list(grads)
        else:
            out = [g * scale for g in grads]
        if len(out) == 2:
            out.append(None)
        return *out, None, None, None


def _near_clamp(t: torch.Tensor, low: float, high: float, margin: float = 1e-2) -> bool:
    """Whether any entry of ``t`` lies within ``margin`` of [low, high]'s ends or outside it (one reduction)."""
    if t.numel() == 0:
        return False
    lo, hi = torch.aminmax(t)
    return bool(lo < low + margin) or bool(hi > high - margin)


def _split_heads(logits: torch.Tensor | Sequence[torch.Tensor], n_heads: int, n_genes: int) -> list[torch.Tensor]:
    """The heads as a list: a sequence as given, or the column blocks of one stacked rows × (n_heads · G) tensor."""
    if isinstance(logits, torch.Tensor):
        if logits.dim() != 2 or logits.shape[1] != n_heads * n_genes:
            raise ValueError(
                f"expected logits of shape (rows, {n_heads * n_genes}) for {n_genes} genes, got {tuple(logits.shape)}"
            )
        return list(logits.view(logits.shape[0], n_heads, n_genes).unbind(1))
    heads = list(logits)
    if len(heads) != n_heads:
        raise ValueError(f"expected {n_heads} heads, got {len(heads)}")
    return heads


def zinb_nll_logits(
    logits: torch.Tensor | Sequence[torch.Tensor],
    x: torch.Tensor,
    size_factors: torch.Tensor,
    nonzero: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean ZINB negative log-likelihood over rows × genes, from the decoder's heads (fused, fast).

    ``logits``: the heads ``(a, b, c)``, each rows × G, or ``[a | b | c]`` stacked in one rows × 3G tensor.
    ``nonzero``, if given, holds the flat indices (into ``x.view(-1)``) of exactly the non-zero counts, as
    :meth:`~scembed._engine.counts.CountData.batch` returns them; otherwise they are searched for.
    """
    a, b, c = _split_heads(logits, 3, x.shape[1])
    return _ZINBLogits.apply(a, b, c, x, size_factors, nonzero)


def nb_nll_logits(
    logits: torch.Tensor | Sequence[torch.Tensor],
    x: torch.Tensor,
    size_factors: torch.Tensor,
    nonzero: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean NB negative log-likelihood over rows × genes from the heads ``(a, b)`` or ``[a | b]`` (π = 0)."""
    a, b = _split_heads(logits, 2, x.shape[1])
    return _ZINBLogits.apply(a, b, None, x, size_factors, nonzero)


def mse_loss(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error over rows × genes between the decoder's output and the data."""
    return F.mse_loss(output, x)


def reconstruction_loss(
    likelihood: str,
    output: torch.Tensor | Sequence[torch.Tensor],
    x: torch.Tensor,
    size_factors: torch.Tensor,
    nonzero: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean loss of ``likelihood`` ("zinb", "nb" or "mse") over rows × genes of the decoder's heads ``output``."""
    if likelihood == "zinb":
        return zinb_nll_logits(output, x, size_factors, nonzero)
    if likelihood == "nb":
        return nb_nll_logits(output, x, size_factors, nonzero)
    if likelihood == "mse":
        return mse_loss(output if isinstance(output, torch.Tensor) else _split_heads(output, 1, x.shape[1])[0], x)
    raise ValueError(f"unknown likelihood {likelihood!r}; expected one of {LIKELIHOODS}")
