"""Exact Elastic Embedding: initialisation and the spectral-direction optimiser (no AnnData here).

The spectral direction (Vladymyrov & Carreira-Perpiñán 2012) preconditions the gradient with the attractive part
of the Hessian: solve (4L⁺ + μI) p = −∇E. L⁺ is the Laplacian of the sparse affinities, so the system is sparse:
it is factorised once with a sparse LU (``"splu"``), or solved by Jacobi-preconditioned conjugate gradients on the
device, warm-started from the previous direction (``"cg"``), which keeps memory at O(nnz) for any N. A backtracking
line search (Armijo) whose step may grow again after an accepted first trial picks the step.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from scipy import sparse
from scipy.sparse import linalg as sla

from .._utils._logging import progress
from .ee_objective import EEObjective

Solver = Literal["auto", "splu", "cg"]
SOLVERS = ("auto", "splu", "cg")
DIRECTIONS = ("spectral", "gradient")
#: ``solver="auto"`` factorises up to this many cells; beyond, kNN graphs fill in too much (20k cells: 37 M
#: factor entries, 17 s on 2 cores) and CG on the device is cheaper than one objective evaluation anyway
SPLU_MAX_CELLS = 10_000
#: standard deviation of the first coordinate of a (non-array) initialisation: small, so that the embedding
#: starts in the near-linear regime of the kernel and the optimiser sets the scale
INIT_SCALE = 1e-4


def laplacian(P: sparse.spmatrix | sparse.sparray) -> sparse.csr_matrix:
    """Graph Laplacian D − W of a symmetric sparse weight matrix, float64 CSR, without the self-loops."""
    W = sparse.csr_matrix(P, dtype=np.float64, copy=True)
    W.setdiag(0)
    W.eliminate_zeros()
    deg = np.asarray(W.sum(1)).ravel()
    return (sparse.diags(deg) - W).tocsr()


def default_mu(L: sparse.spmatrix) -> float:
    """μ = 1e-6 · mean degree of 4L⁺: makes 4L⁺ + μI positive definite without changing its other modes."""
    mean_deg = float(4 * L.diagonal().mean())
    return 1e-6 * mean_deg if mean_deg > 0 else 1e-12


class SpectralDirection:
    """p = −(4L⁺ + μI)⁻¹ g for fixed affinities.

    Parameters
    ----------
    P
        Symmetric sparse affinities.
    solver
        ``"splu"`` (factorise once on the CPU), ``"cg"`` (Jacobi-preconditioned conjugate gradients on ``device``,
        warm-started) or ``"auto"`` (``"splu"`` up to :data:`SPLU_MAX_CELLS` cells, ``"cg"`` beyond).
    mu
        Shift μ; default :func:`default_mu`.
    device, dtype
        Where the gradient and direction live.
    cg_rtol, cg_maxiter
        Relative residual at which CG stops, and its iteration cap per solve.
    """

    def __init__(
        self,
        P: sparse.spmatrix | sparse.sparray,
        *,
        solver: Solver = "auto",
        mu: float | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        cg_rtol: float = 1e-3,
        cg_maxiter: int = 200,
    ) -> None:
        if solver not in SOLVERS:
            raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}.")
        L = laplacian(P)
        n = L.shape[0]
        self.mu = default_mu(L) if mu is None else float(mu)
        self.solver = ("splu" if n <= SPLU_MAX_CELLS else "cg") if solver == "auto" else solver
        self.device = torch.device(device)
        self.dtype = dtype
        self.cg_rtol = cg_rtol
        self.cg_maxiter = cg_maxiter
        self.cg_iterations: list[int] = []
        B = (4 * L + self.mu * sparse.identity(n, format="csr")).tocsc()
        if self.solver == "splu":
            # B is symmetric positive definite: a symmetric fill-reducing ordering and no pivoting (Cholesky-like)
            self._lu = sla.splu(B, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
        else:
            # CG in float64: B's condition number (~ degree / μ) is far beyond float32's reach
            if self.device.type == "cpu":
                self._B = B.tocsr()
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                    B = B.tocsr()
                    self._B = torch.sparse_csr_tensor(
                        torch.as_tensor(B.indptr, dtype=torch.int64),
                        torch.as_tensor(B.indices, dtype=torch.int64),
                        torch.as_tensor(B.data, dtype=torch.float64),
                        size=B.shape,
                    ).to(self.device)
            self._inv_diag = torch.as_tensor(1.0 / B.diagonal(), dtype=torch.float64, device=self.device)[:, None]
            self._x: torch.Tensor | None = None

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        """The spectral direction for gradient ``grad`` (``(N, d)`` on ``device``)."""
        if self.solver == "splu":
            p = -self._lu.solve(grad.detach().cpu().double().numpy())
            return torch.as_tensor(p, dtype=self.dtype, device=self.device)
        b = -grad.detach().to(torch.float64)
        x = self._cg(b, self._x)
        if self._x is not None and float((x * b).sum()) <= 0:  # a warm start that lost descent: solve afresh
            x = self._cg(b, None)
        self._x = x
        return x.to(self.dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self._B, sparse.spmatrix):  # scipy's CSR product is much faster than torch's on the CPU
            return torch.from_numpy(self._B @ x.numpy())
        return self._B @ x

    def _cg(self, b: torch.Tensor, x0: torch.Tensor | None) -> torch.Tensor:
        """Jacobi-preconditioned CG for every column of ``b`` at once (columns are independent systems)."""
        x = torch.zeros_like(b) if x0 is None else x0.clone()
        r = b - self._matmul(x) if x0 is not None else b.clone()
        b_norm = b.norm(dim=0).clamp_min(1e-300)
        z = self._inv_diag * r
        p = z.clone()
        rz = (r * z).sum(0)
        it = 0
        for it in range(1, self.cg_maxiter + 1):
            if bool((r.norm(dim=0) <= self.cg_rtol * b_norm).all()):
                it -= 1
                break
            Bp = self._matmul(p)
            pBp = (p * Bp).sum(0)
            alpha = torch.where(pBp > 0, rz / pBp.clamp_min(1e-300), torch.zeros_like(rz))
            x.add_(alpha * p)
            r.sub_(alpha * Bp)
            z = self._inv_diag * r
            rz_new = (r * z).sum(0)
            p = z + (rz_new / rz.clamp_min(1e-300)) * p
            rz = rz_new
        self.cg_iterations.append(it)
        return x


def spectral_init(P: sparse.spmatrix | sparse.sparray, n_components: int, random_state: int = 0) -> np.ndarray:
    """Laplacian eigenmaps of the affinities: the leading non-trivial eigenvectors of D^{-1/2} P D^{-1/2}.

    Returns the random-walk eigenvectors D^{-1/2} u (the constant vector is dropped), one per column.
    """
    W = sparse.csr_matrix(P, dtype=np.float64)
    n = W.shape[0]
    if n_components > n - 1:
        raise ValueError(
            f"a spectral initialisation has at most n - 1 = {n - 1} non-trivial eigenvectors; "
            f"n_components={n_components} were asked for."
        )
    deg = np.asarray(W.sum(1)).ravel()
    inv_sqrt = 1.0 / np.sqrt(np.maximum(deg, 1e-300))
    A = sparse.diags(inv_sqrt) @ W @ sparse.diags(inv_sqrt)
    k = n_components + 1
    if n <= max(2 * k + 1, 200):  # ARPACK needs k < n; tiny problems are cheaper dense
        vals, vecs = np.linalg.eigh(A.toarray())
        vals, vecs = vals[::-1][:k], vecs[:, ::-1][:, :k]
    else:
        v0 = np.random.default_rng(random_state).uniform(0.5, 1.0, n)
        # + I shifts the spectrum to [0, 2] so that the largest-magnitude eigenvalues are the wanted ones
        A = A + sparse.identity(n, format="csr")
        vals, vecs = sla.eigsh(A, k=k, which="LA", v0=v0, tol=1e-4, maxiter=max(1000, n // 10))
        order = np.argsort(-vals)
        vals, vecs = vals[order] - 1, vecs[:, order]
    Y = vecs[:, 1:k] * inv_sqrt[:, None]
    # the sign of an eigenvector is arbitrary: fix it so that the result does not depend on ARPACK's choice
    signs = np.sign(Y[np.abs(Y).argmax(0), np.arange(Y.shape[1])])
    return Y * np.where(signs == 0, 1, signs)


def pca_init(X: np.ndarray, n_components: int) -> np.ndarray:
    """The first principal components of X (SVD of the centred data; signs fixed deterministically)."""
    Xc = np.asarray(X, dtype=np.float64)
    Xc = Xc - Xc.mean(0)
    if Xc.shape[1] < n_components:
        raise ValueError(f"init='pca' needs at least {n_components} input dimensions, got {Xc.shape[1]}.")
    U, S, _ = np.linalg.svd(Xc, full_matrices=False)
    Y = U[:, :n_components] * S[:n_components]
    signs = np.sign(Y[np.abs(Y).argmax(0), np.arange(n_components)])
    return Y * np.where(signs == 0, 1, signs)


def random_init(n: int, n_components: int, random_state: int = 0) -> np.ndarray:
    """Standard normal coordinates from a local, seeded generator."""
    return np.random.default_rng(random_state).standard_normal((n, n_components))


def rescale(Y: np.ndarray, scale: float = INIT_SCALE) -> np.ndarray:
    """Centre Y and scale it so that its first column has standard deviation ``scale``."""
    Y = np.asarray(Y, dtype=np.float64)
    Y = Y - Y.mean(0)
    sd = Y[:, 0].std()
    return Y * (scale / sd) if sd > 0 else Y


#: the named initialisations of :func:`initial_embedding`
INITS = ("spectral", "pca", "random")


def initial_embedding(
    init: str,
    n_components: int,
    *,
    P: sparse.spmatrix | sparse.sparray | None = None,
    X: np.ndarray | None = None,
    random_state: int = 0,
    scale: float = INIT_SCALE,
) -> np.ndarray:
    """A named initial embedding, centred and scaled by :func:`rescale` (float64, ``(N, n_components)``).

    ``"spectral"``: Laplacian eigenmaps of the affinities ``P``; ``"pca"``: the first principal components of ``X``;
    ``"random"``: seeded standard normal coordinates (N from ``P`` or ``X``).
    """
    if init == "spectral":
        if P is None:
            raise ValueError("init='spectral' needs the affinities P.")
        Y = spectral_init(P, n_components, random_state=random_state)
    elif init == "pca":
        if X is None:
            raise ValueError("init='pca' needs the representation X.")
        Y = pca_init(X, n_components)
    elif init == "random":
        n = P.shape[0] if P is not None else (X.shape[0] if X is not None else None)
        if n is None:
            raise ValueError("init='random' needs P or X to know the number of cells.")
        Y = random_init(n, n_components, random_state=random_state)
    else:
        raise ValueError(f"`init` must be one of {INITS} or an array, got {init!r}.")
    return rescale(Y, scale)


def optimize_ee(
    objective: EEObjective,
    Y0: torch.Tensor,
    *,
    direction: str | Callable[[torch.Tensor], torch.Tensor] = "spectral",
    solver: Solver = "auto",
    P: sparse.spmatrix | sparse.sparray | None = None,
    maxiter: int = 200,
    tol: float = 1e-5,
    armijo: float = 0.1,
    shrink: float = 0.8,
    grow: float = 2.0,
    interpolate: bool = True,
    show_progress: bool | None = None,
) -> tuple[torch.Tensor, dict]:
    """Minimise the EE objective from ``Y0`` along the spectral (or plain gradient) direction.

    Each iteration solves for the direction, then backtracks from the current trial step until the Armijo
    condition E(Y + αp) ≤ E(Y) + c α ∇Eᵀp holds. Unlike the original, the trial step of the next iteration grows
    by ``grow`` when the first trial was accepted, so a step cut by an early difficult iteration recovers. Objective
    and gradient are evaluated together (the exponentials dominate the cost), so an accepted first trial costs
    one evaluation. A direction is abandoned once the decrease it promises is below the rounding of E (or the step
    is negligible); a failed spectral direction gets one try of the gradient before the run stops with
    ``"line search failed"``.

    Parameters
    ----------
    objective
        The EE objective (fixed affinities, λ and repulsion).
    Y0
        ``(N, d)`` start, on the objective's device.
    direction
        ``"spectral"``, ``"gradient"`` (steepest descent, for comparison) or a callable mapping the gradient to a
        descent direction.
    solver
        Linear solver of the spectral direction (see :class:`SpectralDirection`).
    P
        The affinities, needed for ``direction="spectral"``.
    maxiter
        Maximum number of iterations.
    tol
        Stop when ‖Y_new − Y‖ < tol · ‖Y‖.
    armijo, shrink, grow
        Sufficient-decrease constant, backtracking factor and growth of the trial step after an easy iteration.
    show_progress
        Show a progress bar (default: follows verbosity).

    Returns
    -------
    Y
        The embedding.
    info
        ``objective`` (E at the start and after every iteration, never increasing), ``step`` (accepted steps),
        ``n_iter``, ``n_evaluations``, ``converged`` (relative change below ``tol``), ``stop_reason``, ``solver``,
        ``mu``, ``time_direction`` and ``time_total`` (seconds).
    """
    t_start = time.perf_counter()
    solve: Callable[[torch.Tensor], torch.Tensor]
    info: dict = {"solver": "none", "mu": 0.0}
    if callable(direction):
        solve = direction
    elif direction == "spectral":
        if P is None:
            raise ValueError("direction='spectral' needs the affinities P.")
        sd = SpectralDirection(P, solver=solver, device=Y0.device, dtype=Y0.dtype)
        solve = sd
        info.update(solver=sd.solver, mu=sd.mu)
    elif direction == "gradient":
        solve = torch.neg
    else:
        raise ValueError(f"`direction` must be one of {DIRECTIONS} or a callable, got {direction!r}.")
    time_direction = time.perf_counter() - t_start

    Y = Y0.clone()
    E, G = objective(Y)
    E = float(E)
    if not math.isfinite(E):
        raise FloatingPointError("the EE objective is not finite at the initial embedding.")
    history, steps = [E], []
    n_evals, alpha, converged, reason = 1, 1.0, False, "maxiter"
    n_fallbacks = 0  # times the spectral direction's line search failed and the gradient was tried instead
    bar = progress(range(maxiter), desc="EE", show=show_progress)
    for _ in bar:
        t0 = time.perf_counter()
        p = solve(G)
        slope = float((G * p).sum())
        if not slope < 0:  # not a descent direction (e.g. a solver failure): fall back to the gradient
            p, slope = -G, -float((G * G).sum())
        time_direction += time.perf_counter() - t0
        if slope == 0:
            converged, reason = True, "zero gradient"
            break
        trial, first = alpha, True
        fallback = False
        # a direction is given up once the step is negligible or the decrease it promises is below the rounding of
        # E (float32 tile sums): past that point Armijo passes or fails on noise, and every further try costs a
        # full evaluation (~20 s at 60,000 cells on the CPU)
        resolution = 8 * torch.finfo(Y.dtype).eps * getattr(objective, "rounding_scale", abs(E))
        negligible_step = 1e-12 * (1.0 + float(Y.abs().max()))
        while True:
            if trial * float(p.abs().max()) < negligible_step or -trial * slope < resolution:
                if fallback or direction == "gradient":
                    trial = 0.0
                    break
                # the spectral direction can be dominated by the near-null modes of 4L⁺ (e.g. moving whole
                # disconnected clusters): try the gradient once, with the same initial step length, before stopping
                fallback, first = True, False
                n_fallbacks += 1
                g_norm = float(G.norm())
                trial = alpha * float(p.norm()) / max(g_norm, 1e-300)
                p, slope = -G, -(g_norm**2)
                continue
            Y_new = Y + trial * p
            E_new, G_new = objective(Y_new)
            E_new = float(E_new)
            n_evals += 1
            if math.isfinite(E_new) and E_new <= E + armijo * trial * slope:
                break
            first = False
            # minimiser of the quadratic through E, the slope and E_new, kept within [0.1, shrink] of the trial
            curv = 2 * (E_new - E - slope * trial)
            t_q = -slope * trial * trial / curv if math.isfinite(E_new) and curv > 0 else 0.0
            trial = min(max(t_q, 0.1 * trial), shrink * trial) if interpolate else shrink * trial
        if trial == 0.0:
            reason = "line search failed (no decrease along the direction: converged to float32 precision)"
            converged = True
            break
        change = float((Y_new - Y).norm()) / max(float(Y.norm()), 1e-300)
        Y, E, G = Y_new, E_new, G_new
        history.append(E)
        steps.append(trial)
        if not fallback:  # a gradient step's length says nothing about the next spectral step
            alpha = trial * grow if first else trial
        bar.set_postfix({"E": f"{E:.6g}", "step": f"{trial:.3g}"}, refresh=False)
        if change < tol:
            converged, reason = True, f"relative change {change:.2e} < tol"
            break
    bar.close()
    info.update(
        objective=history,
        step=steps,
        n_iter=len(steps),
        n_evaluations=n_evals,
        n_gradient_fallbacks=n_fallbacks,
        converged=converged,
        stop_reason=reason,
        time_direction=time_direction,
        time_total=time.perf_counter() - t_start,
    )
    if isinstance(solve, SpectralDirection) and solve.cg_iterations:
        info["cg_iterations"] = solve.cg_iterations
    return Y, info
