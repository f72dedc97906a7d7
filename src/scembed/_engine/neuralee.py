"""NeuralEE: a network f_θ mapping cells to an embedding, trained on the Elastic Embedding objective.

Three ways to train, all minimising E(Y) = Σ W⁺‖y_n − y_m‖² + λ Σ W⁻ exp(−‖y_n − y_m‖²) with Y = f_θ(X):

- full batch (every cell in every step) on the sparse global affinities, with :class:`EEObjective`;
- mini-batches with in-batch affinities (``"batch"``): every step draws B fresh cells, finds their k nearest
  neighbours *within the batch*, calibrates them to the perplexity and evaluates EE on the batch, as the original
  did on its fixed partitions (but re-drawn every epoch and without storing any B×B matrix);
- mini-batches on the global graph (``"graph"``): every step draws B fresh cells and, for each, a few neighbours
  from the global sparse affinities; attraction is estimated from these edges (importance-weighted, unbiased),
  repulsion from all pairs of the batch. This is a stochastic gradient of the EE objective of all N cells.

Memory: the inputs (N·D), the optional affinity graph (N·k) and tiles of (tile × B) inside a batch; nothing of size
N·B or N² is ever built.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from scipy import sparse
from torch import nn

from .affinity import calibrate_perplexity
from .distributed import broadcast_module_, check_enough_blocks, check_inputs, rank_blocks, world
from .ee import initial_embedding
from .ee_objective import EEObjective, exp_neg_
from .knn import nearest_neighbors
from .nn import mlp
from .training import adam, train


def __getattr__(name: str) -> Any:
    # the model class lives in scembed._engine.models; importing it from here keeps working
    if name == "NeuralEEModel":
        from .models.neuralee import NeuralEEModel

        return NeuralEEModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


BatchAffinity = Literal["batch", "graph"]
BATCH_AFFINITIES = ("batch", "graph")
Init = Literal["spectral", "pca", "random"]
INITS = ("spectral", "pca", "random")
#: standard deviation of the first coordinate of the network's initial output: the length scale of the kernel
#: exp(−‖y_n − y_m‖²), where the repulsion's pull is strongest; a tl.ee-like 1e-4 would leave the network in the
#: kernel's linear regime, with the output weights to grow by four orders of magnitude in the first steps
INIT_SCALE = 1.0
#: the pre-fit stops once the network reproduces the initial layout to this share of its variance
PREFIT_TOL = 1e-3
#: cells per step of the pre-fit (a smooth 2-D layout is learnt from a few thousand cells; bounds its cost at any N)
PREFIT_BATCH = 8192
#: elements of one (tile × B) block in the in-batch repulsion
_TILE_ELEMENTS = {"cpu": 4 * 2**20, "cuda": 64 * 2**20}


# --------------------------------------------------------------------------------------------------- network
def build_network(n_in: int, n_out: int, hidden: Sequence[int] = (50, 50)) -> nn.Sequential:
    """The original's network: Linear–BatchNorm–ReLU blocks through ``hidden``, then Linear; weights N(0, 0.1²)."""
    net = mlp((n_in, *hidden, n_out), batchnorm=True, activation=nn.ReLU)
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.1)
            nn.init.zeros_(m.bias)
    return net


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, X: torch.Tensor, batch_size: int = 65536) -> None:
    """Set every BatchNorm's running statistics to those of all rows of X (cumulative average over chunks).

    After training, the running averages lag behind the final weights; with this, ``net.eval()(X)`` matches what
    training saw, so ``transform`` of the training cells reproduces the stored embedding.
    """
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was_training = net.training
    net.train()
    n = X.shape[0]
    # equal-sized chunks, so the average of chunk means is the mean of all rows
    n_chunks = max(1, math.ceil(n / batch_size))
    size = math.ceil(n / n_chunks)
    for start in range(0, n, size):
        net(X[start : start + size])
    for m, (mom, _) in zip(bns, saved):
        m.momentum = mom
    net.train(was_training)


# --------------------------------------------------------------------------------------------------- initialisation
def init_layout(
    init: str | np.ndarray, X: np.ndarray, P: sparse.spmatrix | None, n_components: int, random_state: int = 0
) -> np.ndarray | None:
    """The layout the network is pre-fitted to.

    ``"spectral"``: Laplacian eigenmaps of the training cells' affinities ``P`` (as ``tl.ee``); ``"pca"``: the
    first principal components of ``X``; both centred, first coordinate scaled to :data:`INIT_SCALE`. An
    ``(n, n_components)`` array: that layout as it is; ``"random"``: ``None`` (the original's random weights, no
    pre-fit). O(N·k) for the spectral layout, O(N·D²) for PCA.
    """
    if isinstance(init, str):
        if init == "random":
            return None
        if init not in INITS:
            raise ValueError(f"`init` must be one of {INITS} or an array, got {init!r}.")
        Y0 = initial_embedding(init, n_components, P=P, X=X, random_state=random_state, scale=INIT_SCALE)
        return Y0.astype(np.float32)
    Y0 = np.asarray(init, dtype=np.float64)
    if Y0.shape != (X.shape[0], n_components):
        raise ValueError(f"`init` must have shape ({X.shape[0]}, {n_components}), got {Y0.shape}.")
    return Y0.astype(np.float32)


def prefit_network(
    net: nn.Module,
    X: torch.Tensor,
    target: torch.Tensor,
    *,
    lr: float = 0.01,
    max_steps: int = 500,
    tol: float = PREFIT_TOL,
    batch_size: int = PREFIT_BATCH,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Regress ``net(X)`` onto ``target`` with Adam, so that training starts from that layout.

    The loss is the mean squared error relative to the target's variance (1 − R²), on ``batch_size`` random cells
    per step; the pre-fit stops when it falls below ``tol`` or after ``max_steps`` steps. The optimiser is local:
    the training's Adam starts afresh. Returns ``residual`` (the last relative error, on all cells when they fit in
    one batch) and ``steps``.
    """
    n = X.shape[0]
    var = float(((target - target.mean(0)) ** 2).sum(1).mean())
    opt = adam(net.parameters(), lr=lr)
    net.train()
    residual, steps = math.inf, 0
    while steps < max_steps:
        steps += 1
        if n > batch_size:
            rows = torch.randint(n, (batch_size,), generator=generator).to(X.device)
            xb, yb = X[rows], target[rows]
        else:
            xb, yb = X, target
        opt.zero_grad(set_to_none=True)
        loss = ((net(xb) - yb) ** 2).sum(1).mean() / var
        loss.backward()
        opt.step()
        residual = float(loss.detach())
        if residual < tol:
            break
    return {"residual": residual, "steps": float(steps)}


# --------------------------------------------------------------------------------------------------- losses
def batch_repulsion(
    Y: torch.Tensor, X: torch.Tensor | None = None, *, x_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_{n≠m} W⁻_nm exp(−‖y_n − y_m‖²) over the rows of a batch, and its gradient; tiled, O(tile · B) memory.

    ``X is None``: uniform W⁻ = 1 / (B(B−1)). Otherwise W⁻_nm = ‖x_n − x_m‖² / S, where S is ``x_scale`` when given
    (an estimate of the global normaliser, scaled to the batch) and the batch's own Σ_{n≠m} ‖x_n − x_m‖² otherwise
    (the original's in-batch normalisation).
    """
    B = Y.shape[0]
    if B < 2:
        return Y.new_zeros(()), torch.zeros_like(Y)
    y_sq = (Y * Y).sum(1)
    if X is not None:
        x_sq = (X * X).sum(1)
        if x_scale is None:
            x_scale = float(2 * B * x_sq.double().sum() - 2 * (X.double().sum(0) ** 2).sum())
        scale = 1.0 / x_scale if x_scale > 0 else 0.0
    else:
        scale = 1.0 / (B * (B - 1))
    total = torch.zeros((), dtype=torch.float64, device=Y.device)
    grad = torch.empty_like(Y)
    step = max(1, min(B, _TILE_ELEMENTS.get(Y.device.type, _TILE_ELEMENTS["cpu"]) // B))
    for start in range(0, B, step):
        stop = min(start + step, B)
        block = Y[start:stop]
        w = torch.addmm(y_sq[None, :], block, Y.T, alpha=-2.0).add_(y_sq[start:stop, None]).clamp_min_(0)
        exp_neg_(w)
        if X is not None:
            wx = torch.addmm(x_sq[None, :], X[start:stop], X.T, alpha=-2.0).add_(x_sq[start:stop, None])
            w.mul_(wx.clamp_min_(0))
        rows = torch.arange(stop - start, device=Y.device)
        w[rows, rows + start] = 0
        total += w.sum(dtype=torch.float64)
        grad[start:stop] = -4 * (w.sum(1, keepdim=True) * block - w @ Y)
    return (total * scale).to(Y.dtype), grad * scale


def in_batch_affinities(
    Xb: torch.Tensor, perplexity: float, *, n_neighbors: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropic affinities of a batch among itself: edges (rows, cols) and weights p_{j|i} / B.

    Σ_ij P_ij ‖y_i − y_j‖² with the symmetrised P = (P_cond + P_condᵀ) / (2B) equals Σ_ij P_cond,ij ‖y_i − y_j‖² / B,
    so the conditional affinities are enough. The perplexity is capped at (B − 1) / 3 for tiny batches.
    """
    B = Xb.shape[0]
    k = min(int(3 * perplexity), B - 1) if n_neighbors is None else min(n_neighbors, B - 1)
    perp = min(perplexity, max(1.0, (B - 1) / 3.0), k - 1e-3 if k > 1 else 1.0)
    device = Xb.device
    idx, dist, _ = nearest_neighbors(Xb.detach().cpu().numpy(), k, method="exact", device=device)
    P_cond, _, _ = calibrate_perplexity(dist, perp, device=device)
    rows = torch.arange(B, device=device).repeat_interleave(k)
    cols = torch.as_tensor(idx.ravel(), device=device)
    w = torch.as_tensor(P_cond.ravel() / B, dtype=Xb.dtype, device=device)
    return rows, cols, w


class GraphSampler:
    """Draws, for given cells, neighbours from a sparse affinity graph with importance weights.

    For cell i with c_i stored neighbours, j is drawn uniformly among them and the edge gets the weight
    c_i · P_ij; then (N / B) Σ_{i ∈ batch} c_i P_ij ‖y_i − y_j‖² (averaged over draws) is an unbiased estimate of
    Σ_ij P_ij ‖y_i − y_j‖². Memory: the CSR arrays only (N·k).
    """

    def __init__(self, P: sparse.spmatrix | sparse.sparray, device: torch.device) -> None:
        P = sparse.csr_matrix(P)
        self.n = P.shape[0]
        counts = np.diff(P.indptr)
        if (counts == 0).any():
            raise ValueError("every cell needs at least one neighbour in the affinity graph")
        self.indptr = torch.as_tensor(P.indptr[:-1], dtype=torch.int64, device=device)
        self.counts = torch.as_tensor(counts, dtype=torch.int64, device=device)
        self.indices = torch.as_tensor(P.indices, dtype=torch.int64, device=device)
        self.data = torch.as_tensor(P.data, dtype=torch.float32, device=device)
        self.device = device

    def sample(
        self, cells: torch.Tensor, n_per_cell: int, generator: torch.Generator, u: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, cols, weights)`` with ``n_per_cell`` draws for each of ``cells`` (uniforms ``u`` if given)."""
        rows = cells.repeat_interleave(n_per_cell)
        u = (torch.rand(rows.shape[0], generator=generator) if u is None else u).to(self.device)
        c = self.counts[rows]
        offset = torch.minimum((u * c).long(), c - 1)
        pos = self.indptr[rows] + offset
        return rows, self.indices[pos], c.float() * self.data[pos]


# --------------------------------------------------------------------------------------------------- training
def fit_neuralee(
    X: np.ndarray,
    *,
    n_components: int = 2,
    lam: float = 1.0,
    perplexity: float = 30.0,
    repulsion: str = "distance",
    P: sparse.spmatrix | sparse.sparray | None = None,
    affinities: Callable[[np.ndarray], sparse.spmatrix] | None = None,
    batch_size: int | None = None,
    batch_affinity: BatchAffinity = "graph",
    n_subsample: int | None = None,
    max_epochs: int = 500,
    refine_max_epochs: int = 0,
    lr: float = 0.01,
    hidden: Sequence[int] = (50, 50),
    early_exaggeration: float = 1.0,
    exaggeration_epochs: int = 0,
    neighbor_samples: int = 4,
    patience: int | None = 50,
    min_delta: float = 1e-4,
    init: str | np.ndarray | None = None,
    lr_drops: int = 2,
    device: torch.device | str = "cpu",
    random_state: int = 0,
    show_progress: bool | None = None,
    on_shape: Callable[[str, tuple[int, ...]], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a NeuralEE network on ``X`` (cells × D, float32). See the module docstring for the three modes.

    Parameters
    ----------
    X
        Input representation.
    n_components, lam, perplexity, repulsion
        Embedding dimension, repulsion weight λ, perplexity of the affinities, ``"uniform"``/``"distance"`` W⁻.
    P
        Global affinities of all cells (full batch and ``"graph"`` mode), when already computed.
    affinities
        Turns a representation (rows of ``X``) into its affinities: called for the global graph when ``P`` is
        None and needed, and for the subsample of the large-data recipe in ``"graph"`` mode. Required then;
        :func:`scembed.pp._affinity.compute_affinities` is the package's one such path.
    batch_size
        Cells per step; ``None`` or ≥ N: full batch.
    batch_affinity
        ``"batch"`` or ``"graph"`` (mini-batches only).
    n_subsample
        Train first on this many random cells (with their own affinities in ``"graph"`` mode), map everything and
        refine on all cells for ``refine_max_epochs`` epochs (openTSNE's large-data recipe). ``None``: all cells.
    max_epochs
        Epochs (passes over the training cells) of the main phase.
    refine_max_epochs
        Epochs of the refinement on all cells after a subsample phase.
    lr, hidden
        Adam learning rate and hidden layer sizes.
    early_exaggeration, exaggeration_epochs
        Attraction multiplied by ``early_exaggeration`` during the first ``exaggeration_epochs`` epochs.
    neighbor_samples
        ``"graph"`` mode: neighbours drawn per batch cell and step.
    patience, min_delta
        A plateau is ``patience`` epochs without a relative improvement of ``min_delta`` of the loss (after the
        exaggeration phase). At a plateau training goes back to the best epoch's weights and, ``lr_drops`` times,
        goes on with the learning rate divided by 4; the next plateau stops it.
    init
        Layout the network is pre-fitted to before training (:func:`prefit_network`): ``"spectral"`` (Laplacian
        eigenmaps of the training cells' affinities, as ``tl.ee``), ``"pca"``, an ``(n_train, n_components)``
        array, or ``"random"`` (random weights, as the original). ``None``: ``"spectral"`` where a graph of the
        training cells is used (full batch, ``"graph"``), ``"pca"`` with ``"batch"`` affinities.
    lr_drops
        Times the learning rate is divided by 4 at a plateau before training stops (mini-batch gradients have a
        noise floor proportional to the step size; a smaller step then goes further down).
    on_shape
        Called with a name and the shape of every large buffer the trainer builds (for memory tests).

    Returns
    -------
    net
        The trained network, in eval mode, BatchNorm statistics recomputed on all cells.
    info
        ``history`` (``loss`` per epoch, and ``phase``), ``n_epochs``, ``mode``, ``batch_size``, ``n_subsample``,
        ``init``, ``prefit_residual`` (1 − R² of the pre-fit; NaN without one) and ``seconds`` (wall time per part:
        ``affinity`` of all cells and ``subsample_affinity`` where computed here, ``init_layout``, ``prefit``,
        ``train``, ``refine``, ``batchnorm``).
    """
    device = torch.device(device)
    N, D = X.shape
    B = N if batch_size is None else min(int(batch_size), N)
    full = B >= N
    note = on_shape or (lambda name, shape: None)
    gen = torch.Generator().manual_seed(int(random_state))
    Xt = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=device)
    note("X", tuple(Xt.shape))
    # global normaliser of the distance repulsion: mean ‖x_n − x_m‖² over all pairs, O(N·D)
    xd = Xt.double()
    mean_pair = float((2 * N * (xd * xd).sum() - 2 * (xd.sum(0) ** 2).sum()) / max(N * (N - 1), 1))
    del xd

    seconds: dict[str, float] = {}

    @contextmanager
    def timed(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0

    def get_affinities(rows: np.ndarray | None = None) -> sparse.spmatrix:
        if affinities is None:
            raise ValueError("fit_neuralee needs `P` or an `affinities` function in this mode.")
        with timed("affinity" if rows is None else "subsample_affinity"):
            return affinities(X if rows is None else X[rows])

    net = build_network(D, n_components, hidden).to(device)
    # under torchrun (distributed.py): same inputs on every rank, rank 0's initial weights, whole blocks per rank
    ranks = world()
    check_inputs({"X": X, "NeuralEE parameters": (B, batch_affinity, n_subsample, lr, neighbor_samples, random_state)})
    broadcast_module_(net)
    opt = adam(net.parameters(), lr=lr)
    history: dict[str, list[float]] = {"loss": [], "phase": []}

    def run_phase(step: Callable[[int], float], n_epochs: int, phase: int) -> int:
        with timed("train" if phase == 0 else "refine"):
            return train_phase(step, n_epochs, phase)

    def train_phase(step: Callable[[int], float], n_epochs: int, phase: int) -> int:
        if n_epochs <= 0:
            return 0
        n_ex = min(exaggeration_epochs, n_epochs) if phase == 0 else 0
        n_run = 0
        if n_ex:
            h, n_run = train(step, n_ex, desc="NeuralEE (exaggeration)", show_progress=show_progress)
            history["loss"] += h["loss"]
        n = 0
        for drop in range(max(0, lr_drops) + 1 if patience is not None else 1):
            for group in opt.param_groups:
                group["lr"] = lr / 4**drop
            h, m = train(
                lambda e, done=n_ex + n: step(e + done),
                n_epochs - n_ex - n,
                desc="NeuralEE" if phase == 0 else "NeuralEE (refine)",
                show_progress=show_progress,
                patience=patience,
                min_delta=min_delta,
                module=net,
                keep_best=True,
            )
            history["loss"] += h["loss"]
            n += m
            if n >= n_epochs - n_ex:
                break
        for group in opt.param_groups:
            group["lr"] = lr
        history["phase"] += [phase] * (n_run + n)
        return n_run + n

    start = {"init": "random", "prefit_residual": math.nan}

    def start_from(train_P: sparse.spmatrix | None, rows: torch.Tensor | None) -> None:
        """Pre-fit the network to the initial layout of the training cells (all, or ``rows``)."""
        choice = init if init is not None else ("pca" if train_P is None else "spectral")
        if not isinstance(choice, str):
            choice = np.asarray(choice)[rows.numpy()] if rows is not None and len(choice) == N else choice
        with timed("init_layout"):
            target = init_layout(choice, X if rows is None else X[rows.numpy()], train_P, n_components, random_state)
        if target is None:
            return
        inputs = Xt if rows is None else Xt[rows.to(device)]
        with timed("prefit"):
            fit = prefit_network(net, inputs, torch.as_tensor(target, device=device), lr=lr, generator=gen)
        start.update(init=choice if isinstance(choice, str) else "array", prefit_residual=fit["residual"])

    def alpha(epoch: int, phase: int) -> float:
        return early_exaggeration if (phase == 0 and epoch < exaggeration_epochs) else 1.0

    if full:
        if P is None:
            P = get_affinities()
        obj = EEObjective(P, lam=lam, repulsion=repulsion, X=X, device=device)
        note("P", (int(sparse.csr_matrix(P).nnz),))
        start_from(P, None)

        def full_step(epoch: int) -> float:
            net.train()
            opt.zero_grad(set_to_none=True)
            Y = net(Xt)
            Yd = Y.detach()
            ea, ga = obj.attractive(Yd)
            er, gr = obj.repulsive(Yd)
            a = alpha(epoch, 0)
            Y.backward(a * ga + lam * gr)
            opt.step()
            return float(ea + lam * er)

        n_epochs = run_phase(full_step, max_epochs, 0)
        with timed("batchnorm"):
            recalibrate_batchnorm(net, Xt)
        net.eval()
        info = {"history": history, "n_epochs": n_epochs, "mode": "full", "batch_size": N, "n_subsample": N}
        return net, {**info, **start, "seconds": seconds}

    # ---- mini-batches
    n_sub = N if n_subsample is None else min(int(n_subsample), N)
    cells_all = torch.arange(N)

    def make_step(train_cells: torch.Tensor, phase: int) -> Callable[[int], float]:
        """One epoch with in-batch affinities: every step is EE on a fresh random batch."""
        n_train = train_cells.shape[0]
        b = min(B, n_train)
        check_enough_blocks(max(1, n_train // b), ranks)  # before training: every rank needs a batch of its own

        def step(epoch: int) -> float:
            net.train()
            order = train_cells[torch.randperm(n_train, generator=gen)]
            n_blocks = max(1, n_train // b)  # full batches; the remainder is drawn in the next epoch's permutation
            n_steps = max(1, n_blocks // ranks.size)
            a = alpha(epoch, phase)
            total = 0.0
            for blk in rank_blocks(n_blocks, n_steps, ranks):
                Xb = Xt[order[blk * b : (blk + 1) * b].to(device)]
                rows, cols, w = in_batch_affinities(Xb, perplexity)
                note("batch_input", tuple(Xb.shape))
                note("edges", (rows.shape[0],))
                opt.zero_grad(set_to_none=True)
                Yb = net(Xb)
                diff = Yb[rows] - Yb[cols]
                att = (w * (diff * diff).sum(1)).sum()
                er, gr = batch_repulsion(Yb.detach(), Xb if repulsion == "distance" else None)
                torch.autograd.backward([a * att, Yb], [None, lam * gr])
                opt.step()
                total += float(att.detach()) + lam * float(er)
            return total / n_steps

        return step

    # the "graph" sampler indexes rows by position in the training set; batches are drawn as positions too
    def graph_step(train_P: sparse.spmatrix, train_cells: torch.Tensor, phase: int) -> Callable[[int], float]:
        sampler = GraphSampler(train_P, device)
        note("P", (int(sampler.indices.shape[0]),))
        n_train = train_cells.shape[0]
        b = min(B, n_train)
        check_enough_blocks(max(1, n_train // b), ranks)
        x_scale = mean_pair * b * (b - 1)
        Xtrain = Xt if n_train == N else Xt[train_cells.to(device)]

        def step(epoch: int) -> float:
            net.train()
            order = torch.randperm(n_train, generator=gen)
            n_blocks = max(1, n_train // b)
            n_steps = max(1, n_blocks // ranks.size)  # every step takes W blocks, one per rank (rank_blocks)
            a = alpha(epoch, phase)
            total = 0.0
            for blk in rank_blocks(n_blocks, n_steps, ranks):
                pos = order[blk * b : (blk + 1) * b]
                # every rank draws the neighbour uniforms of all W blocks and keeps its own: one shared stream
                n_u = b * neighbor_samples
                u = torch.rand(ranks.size * n_u, generator=gen)[ranks.rank * n_u : (ranks.rank + 1) * n_u]
                _, cols, w = sampler.sample(pos.to(device), neighbor_samples, gen, u=u)
                inputs = torch.cat([Xtrain[pos.to(device)], Xtrain[cols]])
                note("batch_input", tuple(inputs.shape))
                opt.zero_grad(set_to_none=True)
                Yall = net(inputs)
                Yb = Yall[:b]
                diff = Yb.repeat_interleave(neighbor_samples, 0) - Yall[b:]
                att = (w * (diff * diff).sum(1)).sum() * (n_train / (b * neighbor_samples))
                er, gr = batch_repulsion(
                    Yb.detach(),
                    inputs[:b] if repulsion == "distance" else None,
                    x_scale=x_scale if b < n_train else None,
                )
                torch.autograd.backward([a * att, Yb], [None, lam * gr])
                opt.step()
                total += float(att.detach()) + lam * float(er)
            return total / n_steps

        return step

    n_epochs = 0
    if batch_affinity == "graph":
        if n_sub < N:
            sub = torch.sort(torch.randperm(N, generator=gen)[:n_sub]).values
            P_sub = get_affinities(sub.numpy())
            start_from(P_sub, sub)
            n_epochs += run_phase(graph_step(P_sub, sub, 0), max_epochs, 0)
            del P_sub
            if refine_max_epochs > 0:
                P = P if P is not None else get_affinities()
                n_epochs += run_phase(graph_step(P, cells_all, 1), refine_max_epochs, 1)
        else:
            P = P if P is not None else get_affinities()
            start_from(P, None)
            n_epochs += run_phase(graph_step(P, cells_all, 0), max_epochs, 0)
    elif batch_affinity == "batch":
        if n_sub < N:
            sub = torch.sort(torch.randperm(N, generator=gen)[:n_sub]).values
            start_from(None, sub)
            n_epochs += run_phase(make_step(sub, 0), max_epochs, 0)
            n_epochs += run_phase(make_step(cells_all, 1), refine_max_epochs, 1)
        else:
            start_from(None, None)
            n_epochs += run_phase(make_step(cells_all, 0), max_epochs, 0)
    else:
        raise ValueError(f"`batch_affinity` must be one of {BATCH_AFFINITIES}, got {batch_affinity!r}.")
    with timed("batchnorm"):
        recalibrate_batchnorm(net, Xt)
    net.eval()
    info = {
        "seconds": seconds,
        "history": history,
        "n_epochs": n_epochs,
        "mode": batch_affinity,
        "batch_size": B,
        "n_subsample": n_sub,
        **start,
    }
    return net, info
