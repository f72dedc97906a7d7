"""iMAP (Wang et al. 2021): stage I content autoencoder on mixup samples, stage II WGAN-GP residual correction.

Pure numpy/scipy/torch; the AnnData side lives in :mod:`scembed.tl._imap`. Differences from the original that do
not change the maths: the encoder runs once per step instead of three times, the decoder translates only the
cells sent to another batch (for the others Dec(E(x), b̃) is the reconstruction already made), the batch branch of
the decoder is evaluated on the ``n_batches`` one-hot vectors only (it sees nothing else), critic steps do not
back-propagate through the generator and take the generator's first layer from one product with the query pool per
generator update, sampling is vectorised in torch, and sparse input is densified one mini-batch at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import sparse
from torch import nn

from .._utils._model_data import canonical_matrix
from .distributed import average_buffers_, rank_generator
from .knn import nearest_neighbors
from .nn import autocast, mlp, predict_in_batches
from .training import adam, train


def __getattr__(name: str) -> Any:
    # the model class lives in scembed._engine.models; importing it from here keeps working
    if name == "IMAPModel":
        from .models.imap import IMAPModel

        return IMAPModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: rows densified at once when a whole batch of cells is encoded or corrected
CHUNK = 8192
#: steps per epoch of stage I (mixup steps) and of stage II (critic steps), as in the original
STAGE1_STEPS, STAGE2_STEPS = 20, 10
#: largest value of log-normalised expression that is plausible; above it the input is probably raw counts
LOG_MAX = 50.0


# ------------------------------------------------------------------------------------------------ data access
class RowSource:
    """Rows of a dense or CSR matrix as dense float32 tensors on ``device``, densified a mini-batch at a time.

    On a GPU a CSR matrix is kept as its three arrays on the device and rows are scattered into a dense block; on
    the CPU scipy's row indexing densifies the rows (faster there than the scatter: ``benchmarks/imap.py
    --gather-compare``); a dense matrix stays where it is and only the requested rows are copied.
    """

    def __init__(self, X: np.ndarray | sparse.spmatrix | sparse.sparray, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.shape = X.shape
        self.csr = None
        if sparse.issparse(X):
            X = canonical_matrix(X, "the expression matrix")  # duplicate entries added up, on a copy
        if sparse.issparse(X) and self.device.type == "cpu":
            self.csr = sparse.csr_matrix(X, dtype=np.float32)
            self.data = torch.from_numpy(self.csr.data)
            self.dense = None
        elif sparse.issparse(X):
            self.indptr = torch.from_numpy(X.indptr.astype(np.int64)).to(self.device)
            self.indices = torch.from_numpy(X.indices.astype(np.int64)).to(self.device)
            self.data = torch.from_numpy(X.data.astype(np.float32, copy=False)).to(self.device)
            self.dense = None
        else:
            self.dense = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))

    def __call__(self, rows: torch.Tensor | np.ndarray | slice) -> torch.Tensor:
        if isinstance(rows, slice):
            rows = torch.arange(*rows.indices(self.shape[0]))
        if self.csr is not None:
            rows = rows.numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows, dtype=np.int64)
            return torch.from_numpy(self.csr[rows].toarray())
        rows = torch.as_tensor(rows, dtype=torch.int64)
        if self.dense is not None:
            return self.dense[rows.cpu()].to(self.device)
        rows = rows.to(self.device)
        start, stop = self.indptr[rows], self.indptr[rows + 1]
        counts = stop - start
        out = torch.zeros((rows.shape[0], self.shape[1]), dtype=torch.float32, device=self.device)
        total = int(counts.sum())
        if total:
            row_of = torch.repeat_interleave(torch.arange(rows.shape[0], device=self.device), counts)
            offsets = torch.arange(total, device=self.device) - torch.repeat_interleave(
                torch.cumsum(counts, 0) - counts, counts
            )
            pos = start[row_of] + offsets
            out[row_of, self.indices[pos]] = self.data[pos]
        return out


def batch_total_std(source: RowSource, groups: Sequence[np.ndarray]) -> np.ndarray:
    """Sum over genes of the per-gene (population) standard deviation of every batch, in float64."""
    totals = []
    for rows in groups:
        s = torch.zeros(source.shape[1], dtype=torch.float64)
        s2 = torch.zeros(source.shape[1], dtype=torch.float64)
        for start in range(0, len(rows), CHUNK):
            block = source(rows[start : start + CHUNK]).double().cpu()
            s += block.sum(0)
            s2 += (block * block).sum(0)
        mean = s / len(rows)
        var = (s2 / len(rows) - mean * mean).clamp_min(0)
        totals.append(float(var.sqrt().sum()))
    return np.asarray(totals)


# ------------------------------------------------------------------------------------------------ budget
#: epochs of the default budget at most: the original's optimisation length in both stages (stage I: 150 epochs of 20
#: Adam steps; stage II, per query batch: 150 generator steps of ``n_critic`` critic steps each)
DEFAULT_EPOCHS = (150, 150)
#: the fewest stage-I epochs of the default budget (1,500 steps, half the original's)
MIN_STAGE1_EPOCHS = 75
#: passes over the cells that the default budget's batch sizes aim at (stage I: the cells of the data; stage II: the
#: distinct cells of a query batch's pool), and the smallest batch it draws
STAGE1_PASSES, STAGE2_PASSES, MIN_BUDGET_BATCH = 50, 100, 64
SHIFT_PAIRS = 4096  # pairs whose median distance estimates the batch shift (run_stage2)


def default_budget(
    n_cells: int,
    n_batches: int,
    batch_size: tuple[int, int] = (512, 1024),
    *,
    smallest_batch: int | None = None,
) -> tuple[tuple[int, int], int]:
    """The default budget: stage-I steps and cells per step that follow the data, stage II's 150 epochs.

    The original runs 150 + 150 epochs of fixed-size steps whatever the data: its 3,000 stage-I steps of
    ``batch_size[0] = 512`` mixup cells per batch pass over 499 cells in two batches about 6,000 times, and over a
    million cells less than 3 times. Here stage I aims at :data:`STAGE1_PASSES` passes over every batch's cells
    (mixup makes every pass new samples):

    * its steps are those that 50 passes take at :data:`MIN_BUDGET_BATCH` (64) cells per batch and step, between
      :data:`MIN_STAGE1_EPOCHS` (75 epochs, 1,500 steps) and the original's 150 (3,000 steps):
      ``clip(ceil(50 · n_cells / (n_batches · 64 · 20)), 75, 150)`` epochs. The floor is where stage I stopped
      gaining on the smallest set measured (499 cells: 30 and 50 epochs lowered the integration, 100 and 150 were no
      better than 75); on 14,000 cells (7,000 per batch, 150 epochs by the rule) 50, 75 and 100
      epochs all integrated less than 150 (``benchmarks/README.md``, "tl.imap_integrate", measures both). Beyond
      3,840 cells per batch every set gets the original's 3,000 steps.
    * its cells per batch and step are ``clip(ceil(50 · n_cells / (n_batches · steps)), 64, batch_size[0])``, never
      more than the smallest batch holds: 64 below 3,840 cells per batch, more above, the original's 512 from about
      ``n_batches · 30,700`` cells. The floor keeps each step's BatchNorm statistics from at least 64 cells of every
      batch.
    * stage II keeps the original's 150 generator steps per query batch (fewer left kang_ifnb_2batches' generator
      short of its target); its cells per critic step follow its pool in the same way (:func:`budget_batch_size`,
      100 passes of the 1,500 critic steps over the pool's distinct cells), applied where the pool is known.

    The time therefore grows with the data up to the original's (reached for large data) and is a small fraction of it
    for small data. Returns ``((stage I epochs, stage II epochs), stage I cells per batch and step)``. Passing epochs
    explicitly (``max_epochs`` of :func:`scembed.tl.imap_integrate`) runs the original's fixed sizes instead.
    """
    per_batch = n_cells / n_batches
    epochs1 = math.ceil(STAGE1_PASSES * per_batch / (MIN_BUDGET_BATCH * STAGE1_STEPS))
    epochs1 = min(DEFAULT_EPOCHS[0], max(MIN_STAGE1_EPOCHS, epochs1))
    available = smallest_batch if smallest_batch is not None else math.ceil(per_batch)
    size = budget_batch_size(per_batch, epochs1 * STAGE1_STEPS, STAGE1_PASSES, batch_size[0], available)
    return (epochs1, DEFAULT_EPOCHS[1]), size


def budget_batch_size(cells: float, steps: int, passes: float, largest: int, available: int) -> int:
    """Cells per step for ``steps`` steps to pass about ``passes`` times over ``cells`` cells.

    ``ceil(passes · cells / steps)``, at least :data:`MIN_BUDGET_BATCH`, at most ``largest`` (the ``batch_size``
    given, by default the original's) and never more than the ``available`` cells: beyond them a draw repeats the
    same cells within one step, which costs time in proportion but adds little information. At least 2, which keeps
    BatchNorm defined.
    """
    size = max(MIN_BUDGET_BATCH, math.ceil(passes * cells / steps))
    return max(2, min(size, int(largest), int(available)))


def check_expression(source: RowSource) -> float:
    """Largest value of the input; a ValueError for non-finite values (iMAP expects log-normalised expression)."""
    values = (source.data if source.dense is None else source.dense).reshape(-1)
    step = CHUNK * 1024  # a block at a time: no full-size boolean copy of a large matrix
    if not all(bool(torch.isfinite(values[i : i + step]).all()) for i in range(0, values.numel(), step)):
        raise ValueError("the expression holds NaN or infinite values; iMAP needs finite log-normalised expression.")
    return float(values.max()) if values.numel() else 0.0


def _diverged(stage: str, epoch: int, err: FloatingPointError, vmax: float | None) -> FloatingPointError:
    """The error raised when a stage's losses become non-finite: the stage, the epoch and the likely cause."""
    if vmax is not None and vmax > LOG_MAX:
        cause = f"the input reaches {vmax:g}: iMAP expects log-normalised expression, not raw counts"
    else:
        cause = "the input is finite and log-scaled, so a smaller learning rate may help"
    return FloatingPointError(f"iMAP {stage} diverged at epoch {epoch} (non-finite loss); {cause}.")


# ------------------------------------------------------------------------------------------------ networks
def init_weights(module: nn.Module) -> None:
    """The original's initialisation: Linear weights ~ N(0, 0.02), BatchNorm scales ~ N(1, 0.02), shifts 0."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm1d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class BatchDecoder(nn.Module):
    """Dec(c, b) = ReLU(G2([c; b]) + G1(b)) with b the one-hot batch."""

    def __init__(self, latent_dim: int, n_batches: int, n_genes: int):
        super().__init__()
        self.n_batches = n_batches
        self.content = mlp((latent_dim + n_batches, 512, 1024, n_genes), batchnorm=False, activation=nn.Mish)
        self.batch = mlp((n_batches, 512, 1024, n_genes), batchnorm=False, activation=nn.Mish)

    def forward(self, code: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Decode ``code`` as if measured in ``batch`` (integer batch index per row)."""
        eye = torch.eye(self.n_batches, device=code.device, dtype=code.dtype)
        one_hot = eye[batch]
        # G1 depends on the one-hot batch only: evaluate it on the n_batches distinct inputs, then pick each row's by a
        # product with the one-hot rows. Indexing would give the same values, but its backward accumulates the rows'
        # gradients with parallel atomic adds on the CPU, in an order that changes from run to run
        return torch.relu(self.content(torch.cat([code, one_hot], 1)) + one_hot @ self.batch(eye))


class ResidualGenerator(nn.Module):
    """G(x) = ReLU(x + F(x)), F: D→1024→512→latent (BatchNorm) →512→1024→D, BatchNorm + Mish."""

    def __init__(self, n_genes: int, latent_dim: int = 256):
        super().__init__()
        self.residual = nn.Sequential(
            mlp((n_genes, 1024, 512, latent_dim), activation=nn.Mish),
            nn.BatchNorm1d(latent_dim),
            mlp((latent_dim, 512, 1024, n_genes), activation=nn.Mish),
        )

    @property
    def first(self) -> nn.Linear:
        """The D-wide input layer of F, whose output :meth:`from_first` takes."""
        return self.residual[0][0]

    def from_first(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Corrected expression of ``x`` given ``h = self.first(x)``, so that ``h`` can be computed in advance."""
        for layer in (*self.residual[0][1:], *self.residual[1:]):
            h = layer(h)
        return torch.relu(x + h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Corrected expression of ``x``."""
        return self.from_first(x, self.first(x))


def make_encoder(n_genes: int, latent_dim: int = 256) -> nn.Sequential:
    """The stage-I content encoder genes→1024→512→``latent_dim`` (BatchNorm + Mish)."""
    return mlp((n_genes, 1024, 512, latent_dim), activation=nn.Mish)


def make_critic(n_genes: int) -> nn.Sequential:
    """The WGAN critic D→512→512→1 (Mish, no normalisation, as a gradient penalty requires)."""
    return mlp((n_genes, 512, 512, 1), batchnorm=False, activation=nn.Mish)


class _Gram(torch.autograd.Function):
    """W Wᵀ with the backward (G + Gᵀ) W: one width × width × D product instead of autograd's two."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return weight @ weight.T

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (weight,) = ctx.saved_tensors
        return (grad + grad.T) @ weight


def critic_losses(
    critic: nn.Sequential, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wasserstein estimate mean critic(real) − mean critic(fake) and the gradient penalty at ε real + (1 − ε) fake.

    Same values and parameter gradients as ``critic(real).mean() - critic(fake).mean()`` and the penalty
    mean_i (‖∇ critic(x̂_i)‖₂ − 1)² evaluated directly (a test checks both in float64), with fewer D-wide
    products. The critic's first layer h = W₁x + b₁ is affine, so (a) real and fake go through it in one product
    and the interpolate's pre-activation is ε h(real) + (1 − ε) h(fake) — as a function of W₁, b₁ exactly h(x̂)
    for the fixed x̂ — and (b) ∇ₓ̂ critic = W₁ᵀ g with g = ∇ₕ critic. Its squared norm is taken whichever way
    costs fewer multiply-adds (:func:`_gram_is_cheaper`): from the rows g W₁ (n × width × D, three such products
    with the backward) or as gᵀ(W₁W₁ᵀ)g (a width × width Gram matrix: two width × width × D products, whatever n).
    """
    first, rest = critic[0], critic[1:]
    n = real.shape[0]
    h = first(torch.cat([real, fake]))
    out = rest(h).to(first.weight.dtype)  # float32 means under mixed precision (bfloat16 sums round)
    w_dist = out[:n].mean() - out[n:].mean()
    h_mixed = eps * h[:n] + (1 - eps) * h[n:]
    (g,) = torch.autograd.grad(rest(h_mixed).sum(), h_mixed, create_graph=True)
    # the norm in float32 even under mixed precision: the penalty is a small difference from 1, which bfloat16's
    # 8-bit mantissa would round away
    with torch.autocast(g.device.type, enabled=False):
        g = g.to(first.weight.dtype)
        if _gram_is_cheaper(n, first.weight.shape[0]):
            squared = ((g @ _Gram.apply(first.weight)) * g).sum(1)
        else:
            squared = (g @ first.weight).square().sum(1)
        # rounding can make a tiny squared norm negative; the clamp keeps sqrt real
        norm = squared.clamp_min(1e-30).sqrt()
    return w_dist, ((norm - 1) ** 2).mean()


def _gram_is_cheaper(n: int, width: int) -> bool:
    """Whether the penalty's norm costs fewer multiply-adds through the Gram matrix than through the n rows g W₁.

    Rows: g W₁ and, in the backward, its products with g and with W₁: 3 · n · width · D. Gram: W₁W₁ᵀ and its backward
    (G + Gᵀ) W₁: 2 · width² · D. At the default budget's 64–200 cells per critic step the rows cost a third to two
    thirds as much (a critic step 0.6–0.9× as long on 2 CPU threads); at the original's 1,024 the Gram matrix wins.
    """
    return 3 * n > 2 * width


# ------------------------------------------------------------------------------------------------ stage I
def _adam(params, lr: float) -> torch.optim.Adam:
    return adam(params, lr=lr, betas=(0.5, 0.999))


def stage1_losses(
    encoder: nn.Module, decoder: BatchDecoder, x: torch.Tensor, batch: torch.Tensor, other: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction MSE(Dec(E(x), b), x) and content MSE(E(x), E(Dec(E(x), b̃))) of one stage-I mini-batch.

    ``batch`` holds every row's own batch b, ``other`` the random batch b̃ it is translated to.
    """
    code = encoder(x)
    n = x.shape[0]
    # Dec(E(x), b̃) is the reconstruction itself wherever b̃ = b (the decoder keeps no batch statistics), so only
    # the rows sent to another batch are decoded again: about half of them with two batches. Having no batch
    # statistics, the decoder maps every row on its own, so both decodings run as one product over the stacked rows
    # (larger matrix products, and one gradient per weight instead of two to add)
    moved = torch.nonzero(other != batch).squeeze(1)
    both = decoder(torch.cat([code, code[moved]]), torch.cat([batch, other[moved]]))
    decoded = both[:n]
    translated = decoded.index_copy(0, moved, both[n:])
    mse = nn.functional.mse_loss
    return mse(decoded, x), mse(code, encoder(translated))


def split_validation(
    groups: Sequence[np.ndarray], fraction: float, generator: torch.Generator, *, most: int = 1024
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Hold out ``fraction`` of every batch (at most ``most`` cells, and none of a batch under 20 cells).

    Returns the training rows and the held-out rows of every batch; a batch keeps at least 2 training cells.
    """
    train_rows, val_rows = [], []
    for rows in groups:
        rows = np.asarray(rows, dtype=np.int64)
        k = min(most, int(fraction * len(rows))) if len(rows) >= 20 else 0
        perm = rows[torch.randperm(len(rows), generator=generator).numpy()]
        val_rows.append(np.sort(perm[:k]))
        train_rows.append(np.sort(perm[k:]))
    return train_rows, val_rows


def train_stage1(
    source: RowSource,
    groups: Sequence[np.ndarray],
    *,
    latent_dim: int = 256,
    n_epochs: int = 150,
    steps_per_epoch: int = STAGE1_STEPS,
    batch_size: int = 512,
    lr: float = 5e-4,
    lambda_recon: float = 1.0,
    lambda_content: float = 3.0,
    validation: float = 0.0,
    patience: int = 10,
    min_delta: float = 0.001,
    min_epochs: int = 1,
    generator: torch.Generator,
    show_progress: bool | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[nn.Module, BatchDecoder, dict[str, list[float]]]:
    """Train the content encoder and batch-conditioned decoder on batch-balanced mixup samples.

    Every step draws ``batch_size`` mixup cells α x₁ + (1 − α) x₂ (x₁, x₂ from the same batch, α ~ U(0, 1)) per
    batch and minimises λ_recon · MSE(Dec(E(x), b), x) + λ_content · MSE(E(x), E(Dec(E(x), b̃))), b̃ random.

    With ``validation > 0`` that share of every batch (see :func:`split_validation`) is held out of training, the
    same loss is evaluated on these cells (as they are, eval mode, a fixed b̃) after every epoch (history entry
    ``val_loss``), training stops once it has not improved by a relative ``min_delta`` for ``patience`` epochs
    (never before ``min_epochs``), and the networks of the best epoch are kept. Without held-out cells
    (``validation=0``, or no batch large enough) exactly ``n_epochs`` epochs run. The history's ``batch_size``
    entry (one value per epoch) records the cells drawn per batch and step. Raises FloatingPointError naming the
    epoch when the loss becomes non-finite. ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the training passes
    under mixed precision (:func:`scembed._engine.nn.autocast`); the held-out loss is evaluated in float32.
    """
    device = source.device
    vmax = check_expression(source)
    n_genes, n_b = source.shape[1], len(groups)
    encoder = make_encoder(n_genes, latent_dim).to(device)
    decoder = BatchDecoder(latent_dim, n_b, n_genes).to(device)
    encoder.apply(init_weights)
    decoder.apply(init_weights)
    opt = _adam([*encoder.parameters(), *decoder.parameters()], lr)
    val_rows: list[np.ndarray] = [np.zeros(0, np.int64)] * n_b
    if validation > 0:
        groups, val_rows = split_validation(groups, validation, generator)
    sizes = torch.tensor([len(g) for g in groups], dtype=torch.float64)
    offsets = torch.from_numpy(np.cumsum([0] + [len(g) for g in groups])[:-1])
    all_rows = torch.from_numpy(np.concatenate(groups).astype(np.int64))
    batch_of = torch.arange(n_b).repeat_interleave(batch_size).to(device)
    n_val = sum(len(v) for v in val_rows)
    if n_val:
        x_val = source(np.concatenate(val_rows))
        b_val = torch.arange(n_b).repeat_interleave(torch.tensor([len(v) for v in val_rows])).to(device)
        o_val = torch.randint(n_b, (n_val,), generator=generator).to(device)
    # the held-out cells above are the same on every rank; under torchrun each rank then draws its own mixup cells
    generator = rank_generator(generator)
    networks = nn.ModuleDict({"encoder": encoder, "decoder": decoder})
    epoch_now = [0]

    def step(epoch: int) -> dict[str, float]:
        epoch_now[0] = epoch + 1
        networks.train()
        tot = torch.zeros(3, dtype=torch.float64, device=device)
        for _ in range(steps_per_epoch):
            # two cells of the same batch per sample: positions drawn within each batch's block of all_rows, one
            # gather for both
            u = torch.rand((2, n_b, batch_size), generator=generator, dtype=torch.float64)
            pick = (u * sizes[None, :, None]).long() + offsets[None, :, None]
            alpha = torch.rand((n_b * batch_size, 1), generator=generator).to(device)
            other = torch.randint(n_b, (n_b * batch_size,), generator=generator).to(device)
            x1, x2 = source(all_rows[pick.reshape(-1)]).chunk(2)
            x = alpha * x1 + (1 - alpha) * x2
            with autocast(device, autocast_dtype):
                recon, content = stage1_losses(encoder, decoder, x, batch_of, other)
            recon, content = recon.to(x.dtype), content.to(x.dtype)
            loss = lambda_recon * recon + lambda_content * content
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += torch.stack([loss.detach(), recon.detach(), content.detach()])
        out = dict(zip(("loss", "recon", "content"), (tot / steps_per_epoch).tolist(), strict=True))
        if n_val:
            networks.eval()
            with torch.no_grad():
                v_recon, v_content = stage1_losses(encoder, decoder, x_val, b_val, o_val)
            out["val_loss"] = float(lambda_recon * v_recon + lambda_content * v_content)
        return out

    best = [math.inf, 0]

    def plateau(epoch: int, losses) -> bool:
        if losses["val_loss"] < best[0] - min_delta * abs(best[0] if math.isfinite(best[0]) else 0):
            best[:] = [losses["val_loss"], epoch]
        return epoch + 1 >= min_epochs and epoch - best[1] >= patience

    stop_early = {"monitor": "val_loss", "stop": plateau} if n_val else {}
    try:
        history, _ = train(
            step,
            n_epochs,
            desc="iMAP stage I",
            show_progress=show_progress,
            module=networks,
            keep_best=bool(n_val),
            **stop_early,
        )
    except FloatingPointError as err:
        raise _diverged("stage I", epoch_now[0], err, vmax) from err
    average_buffers_(encoder, decoder)  # under torchrun: one set of BatchNorm statistics on every rank
    # the last step's gradients, as large as the networks, are training state: freed before the codes, stage II and
    # the corrected layer are allocated
    encoder.zero_grad(set_to_none=True)
    decoder.zero_grad(set_to_none=True)
    encoder.eval()
    decoder.eval()
    history["batch_size"] = [float(batch_size)] * len(history.get("loss", []))
    return encoder, decoder, history


@torch.no_grad()
def correct_rows(
    source: RowSource, rows: np.ndarray, batch_of: np.ndarray, generators: dict[int, nn.Module]
) -> np.ndarray:
    """Corrected expression of ``rows`` (float32, ``(len(rows), n_genes)``), ``CHUNK`` rows at a time.

    A row of batch ``batch_of[row]`` goes through that batch's generator (eval mode); rows of a batch without one (the
    anchor) are returned as they are. Computed on demand, so that no corrected copy of the whole matrix is kept.
    """
    rows = np.asarray(rows, dtype=np.int64)

    def corrected(part: np.ndarray) -> torch.Tensor:
        x, of = source(part), batch_of[part]
        for b, gen in generators.items():
            mine = torch.from_numpy(np.flatnonzero(of == b)).to(x.device)
            if len(mine):
                gen.eval()
                x[mine] = gen(x[mine]).float()
        return x

    if len(rows) <= CHUNK:  # one chunk: its dense rows are the result (no second copy of them)
        return corrected(rows).cpu().numpy()
    out = np.empty((len(rows), source.shape[1]), dtype=np.float32)
    for start in range(0, len(rows), CHUNK):
        part = rows[start : start + CHUNK]
        out[start : start + len(part)] = corrected(part).cpu().numpy()
    return out


def apply_in_chunks(module: nn.Module, source: RowSource, rows: np.ndarray) -> np.ndarray:
    """``module`` (eval mode) on the given rows of ``source``, densifying ``CHUNK`` rows at a time."""
    rows = np.asarray(rows, dtype=np.int64)
    out = predict_in_batches(
        module, rows, batch_size=CHUNK, device=source.device, to_tensor=lambda sl: source(rows[sl])
    )
    return out.numpy()


# ------------------------------------------------------------------------------------------------ stage II pairs
def cross_neighbors(
    index: np.ndarray, query: np.ndarray, k: int, *, method: str, metric: str, random_state: int = 0
) -> np.ndarray:
    """The ``k`` nearest rows of ``index`` for every row of ``query`` (``(n_query, k)`` int64, nearest first)."""
    indices, _, _ = nearest_neighbors(index, k, method=method, metric=metric, random_state=random_state, query=query)
    return indices


def mutual_pairs(
    A: np.ndarray, Q: np.ndarray, k: int, *, method: str = "annoy", metric: str = "cosine", random_state: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours between A and Q: (a, q) with q among the k nearest Q of a and vice versa.

    Returns the pairs as two index arrays (into A and into Q), sorted by a then q.
    """
    k_aq = min(k, Q.shape[0])
    k_qa = min(k, A.shape[0])
    nn_a = cross_neighbors(Q, A, k_aq, method=method, metric=metric, random_state=random_state)  # A → Q
    nn_q = cross_neighbors(A, Q, k_qa, method=method, metric=metric, random_state=random_state)  # Q → A
    nq = Q.shape[0]
    forward = np.unique(np.repeat(np.arange(A.shape[0]), k_aq) * nq + nn_a.ravel())
    backward = np.unique(nn_q.ravel() * nq + np.repeat(np.arange(nq), k_qa))
    both = np.intersect1d(forward, backward, assume_unique=True)
    return both // nq, both % nq


def mutual_knn_graph(
    X: np.ndarray, k: int, *, method: str = "annoy", metric: str = "cosine", random_state: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Mutual kNN graph within X plus self-loops, as CSR arrays ``(indptr, indices)``.

    Every cell keeps itself as a neighbour (the original's annoy query returns the cell first), so a random walk
    may stay in place and no cell is isolated.
    """
    n = X.shape[0]
    if n == 1:
        return np.array([0, 1]), np.array([0])
    idx, _, _ = nearest_neighbors(X, min(k, n - 1), method=method, metric=metric, random_state=random_state)
    rows = np.repeat(np.arange(n), idx.shape[1])
    adj = sparse.csr_matrix((np.ones(rows.size, dtype=np.float32), (rows, idx.ravel())), shape=(n, n))
    mutual = adj.multiply(adj.T).tocsr() + sparse.identity(n, dtype=np.float32, format="csr")
    mutual.sort_indices()
    return mutual.indptr.astype(np.int64), mutual.indices.astype(np.int64)


def random_walk_pairs(
    pairs_a: np.ndarray,
    pairs_q: np.ndarray,
    graph_a: tuple[np.ndarray, np.ndarray],
    graph_q: tuple[np.ndarray, np.ndarray],
    n_steps: int,
    generator: torch.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Expand every MNN pair by an ``n_steps``-long walk moving both ends to a random graph neighbour each step.

    Returns the visited (anchor, query) cells, ``len(pairs) * n_steps`` each, the start pairs included.
    """
    out_a, out_q = [], []
    cur_a, cur_q = pairs_a.astype(np.int64), pairs_q.astype(np.int64)
    for _ in range(n_steps):
        out_a.append(cur_a)
        out_q.append(cur_q)
        cur_a = _walk(cur_a, graph_a, generator)
        cur_q = _walk(cur_q, graph_q, generator)
    return np.concatenate(out_a), np.concatenate(out_q)


def _median_distance(x_left, x_right, left: np.ndarray, right: np.ndarray, generator: torch.Generator) -> float:
    """Median expression distance over (at most ``SHIFT_PAIRS`` randomly chosen of) the row pairs (left, right)."""
    if len(left) == 0:
        return 0.0
    if len(left) > SHIFT_PAIRS:
        keep = torch.randperm(len(left), generator=generator)[:SHIFT_PAIRS].numpy()
        left, right = left[keep], right[keep]
    return float(torch.linalg.vector_norm(x_left(left) - x_right(right), dim=1).median())


def _graph_edges(graph: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    indptr, indices = graph
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    other = rows != indices  # not the self-loops
    return rows[other], indices[other]


def batch_shift(
    x_anchor,
    x_query,
    pairs: tuple[np.ndarray, np.ndarray],
    graph_a: tuple[np.ndarray, np.ndarray],
    graph_q: tuple[np.ndarray, np.ndarray],
    generator: torch.Generator,
) -> dict[str, float]:
    """How far the batch effect moves a cell, from the expression distances of neighbours across and within batches.

    ``x_anchor(i)`` / ``x_query(i)`` give the expression of sample rows ``i``. Two mutual nearest neighbours across
    the batches differ by the batch effect and by both cells' own variation within their type; two mutual
    neighbours within a batch only by the latter. So shift² ≈ d_MNN² − (d_anchor² + d_query²) / 2 with the median
    distances of the MNN pairs and of the within-batch graph edges. Returns ``shift``, ``pair_distance`` (d_MNN),
    ``within_distance`` (the mean of d_anchor and d_query in quadrature).
    """
    d_pair = _median_distance(x_anchor, x_query, *pairs, generator)
    d_a = _median_distance(x_anchor, x_anchor, *_graph_edges(graph_a), generator)
    d_q = _median_distance(x_query, x_query, *_graph_edges(graph_q), generator)
    within = math.sqrt((d_a**2 + d_q**2) / 2)
    return {"shift": math.sqrt(max(d_pair**2 - within**2, 0.0)), "pair_distance": d_pair, "within_distance": within}


def _walk(cur: np.ndarray, graph: tuple[np.ndarray, np.ndarray], generator: torch.Generator) -> np.ndarray:
    indptr, indices = graph
    deg = indptr[cur + 1] - indptr[cur]
    u = torch.rand(cur.shape[0], generator=generator, dtype=torch.float64).numpy()
    return indices[indptr[cur] + np.minimum((u * deg).astype(np.int64), deg - 1)]


# ------------------------------------------------------------------------------------------------ stage II GAN
def train_generator(
    query_pool: torch.Tensor,
    anchor_pool: torch.Tensor,
    query_weights: torch.Tensor,
    anchor_weights: torch.Tensor,
    *,
    n_epochs: int = 150,
    steps_per_epoch: int = STAGE2_STEPS,
    batch_size: int = 1024,
    n_critic: int = 10,
    lr: float = 2e-4,
    penalty: float = 10.0,
    latent_dim: int = 256,
    generator: torch.Generator,
    stage: str = "stage II",
    show_progress: bool | None = None,
    project_pool: bool | None = None,
    budget_batch: bool = False,
    reach: float | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[ResidualGenerator, dict[str, list[float]]]:
    """WGAN-GP: a residual generator maps query cells onto the anchor cells of the pool.

    ``*_pool`` hold the distinct cells of the random-walk pool (on the device), ``*_weights`` how often each was
    visited; training batches are drawn with these weights, as the original draws uniformly from the visits. The
    critic is updated every step; the generator after every ``n_critic``-th critic step (the original: once per
    epoch of 10 steps). ``project_pool`` (default: when the pool is smaller than ``n_critic`` batches) applies the
    generator's first layer to the whole query pool once per generator update; same maths either way.
    ``budget_batch`` draws the default budget's cells per critic step instead of ``batch_size``: about
    ``STAGE2_PASSES`` passes of all critic steps over the larger pool's distinct cells, within
    [``MIN_BUDGET_BATCH``, ``batch_size``] and never more than that pool holds (:func:`budget_batch_size`). ``stage``
    names the run in the progress bar and in the FloatingPointError raised when the critic's loss becomes
    non-finite. ``reach`` (an expression distance; ``None``: none) adds the transport cost
    ‖G(x) − x‖² / (2 · reach) to the generator's loss: its pull back to x balances a 1-Lipschitz critic's largest
    push at distance ``reach``, so among the maps that match the anchor the one that moves cells least wins.
    ``autocast_dtype`` runs the critic and generator passes under mixed precision; the gradient penalty's norm stays
    in float32 (:func:`critic_losses`).
    """
    desc = f"iMAP {stage}"
    if budget_batch:
        pool = max(len(query_pool), len(anchor_pool))
        batch_size = budget_batch_size(pool, n_epochs * steps_per_epoch, STAGE2_PASSES, batch_size, pool)
    device = query_pool.device
    generator = rank_generator(generator)  # under torchrun: each rank its own pool draws (distributed.py)
    n_genes = query_pool.shape[1]
    gen = ResidualGenerator(n_genes, latent_dim).to(device)
    critic = make_critic(n_genes).to(device)
    gen.apply(init_weights)
    critic.apply(init_weights)
    opt_g, opt_d = _adam(gen.parameters(), lr), _adam(critic.parameters(), lr)
    counter = [0]
    # The generator changes only every n_critic-th step, so its D-wide first layer can be applied to the whole query
    # pool once per generator update and gathered, instead of to every critic batch; worth it when the pool is
    # smaller than the n_critic batches it serves. BatchNorm still sees each batch's own statistics.
    if project_pool is None:
        project_pool = len(query_pool) < n_critic * batch_size
    projected: list[torch.Tensor | None] = [None]

    def draw() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        iq = torch.multinomial(query_weights, batch_size, replacement=True, generator=generator).to(device)
        ia = torch.multinomial(anchor_weights, batch_size, replacement=True, generator=generator)
        return iq, query_pool[iq], anchor_pool[ia.to(device)]

    epoch_now = [0]

    def step(epoch: int) -> dict[str, float]:
        epoch_now[0] = epoch + 1
        gen.train()
        tot = torch.zeros(3, dtype=torch.float64, device=device)
        g_losses = []
        for _ in range(steps_per_epoch):
            iq, z, real = draw()
            with torch.no_grad(), autocast(device, autocast_dtype):
                if project_pool:
                    if projected[0] is None:
                        projected[0] = gen.first(query_pool)
                    fake = gen.from_first(z, projected[0][iq])
                else:
                    fake = gen(z)
            eps = torch.rand((batch_size, 1), generator=generator).to(device)
            with autocast(device, autocast_dtype):
                w_dist, gp = critic_losses(critic, real, fake.to(real.dtype), eps)
            d_loss = -w_dist + penalty * gp
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            tot += torch.stack([d_loss.detach(), w_dist.detach(), gp.detach()])
            if counter[0] % n_critic == 0:
                with autocast(device, autocast_dtype):
                    moved = gen(z)
                    g_loss = -critic(moved).to(z.dtype).mean()
                if reach:
                    g_loss = g_loss + ((moved.to(z.dtype) - z) ** 2).sum(1).mean() / (2 * reach)
                opt_g.zero_grad(set_to_none=True)
                g_loss.backward()
                opt_g.step()
                projected[0] = None
                g_losses.append(g_loss.detach())
            counter[0] += 1
        out = dict(zip(("critic", "wasserstein", "penalty"), (tot / steps_per_epoch).tolist(), strict=True))
        out["generator"] = float(torch.stack(g_losses).mean()) if g_losses else float("nan")
        return out

    try:
        history, _ = train(step, n_epochs, desc=desc, show_progress=show_progress, monitor="critic")
    except FloatingPointError as err:
        raise _diverged(stage, epoch_now[0], err, None) from err
    average_buffers_(gen, critic)  # under torchrun: one set of BatchNorm statistics on every rank
    gen.zero_grad(set_to_none=True)  # training state only: freed before the corrected layer is allocated
    gen.eval()
    history["batch_size"] = [float(batch_size)] * len(history.get("critic", []))
    return gen, history


def run_stage2(
    source: RowSource,
    groups: Sequence[np.ndarray],
    codes: np.ndarray,
    order: Sequence[int],
    *,
    incremental: bool = False,
    n_sample: int = 3000,
    k_within: int = 30,
    k_mnn: int = 15,
    walk_steps: int = 50,
    metric: str = "cosine",
    knn_method: str = "annoy",
    n_epochs: int = 150,
    n_critic: int = 10,
    batch_size: int = 1024,
    latent_dim: int = 256,
    generator: torch.Generator,
    random_state: int = 0,
    labels: Sequence[str] | None = None,
    show_progress: bool | None = None,
    budget_batch: bool = False,
    reach: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[dict[int, ResidualGenerator], list[dict], list[dict[str, list[float]]]]:
    """Train the generators that correct every batch but the anchor ``order[0]`` onto it (or onto all corrected so far).

    ``groups[b]`` are the rows of batch b, ``codes`` the stage-I representation of every row. Returns the generator
    of every query batch, per-query information (sample sizes, number of MNN pairs, pool sizes, cells drawn per
    critic step) and per-query training histories; :func:`correct_rows` applies the generators. Only the sampled
    cells' expression is held, never a corrected copy of every cell. ``budget_batch``: see :func:`train_generator`.
    ``reach`` (> 0) sets the generator's transport cost in units of the batch shift estimated by :func:`batch_shift`
    (recorded per query with its parts); ``0``: none, as the original.
    """
    labels = [str(b) for b in range(len(groups))] if labels is None else list(labels)
    batch_of = np.empty(source.shape[0], dtype=np.int64)
    for b, rows in enumerate(groups):
        batch_of[rows] = b
    anchor = np.asarray(groups[order[0]], dtype=np.int64)
    generators: dict[int, ResidualGenerator] = {}
    infos, histories = [], []
    for q in order[1:]:
        query = np.asarray(groups[q], dtype=np.int64)
        sa = anchor[torch.randperm(len(anchor), generator=generator).numpy()[:n_sample]]
        sq = query[torch.randperm(len(query), generator=generator).numpy()[:n_sample]]
        ca, cq = codes[sa], codes[sq]
        kw = {"method": knn_method, "metric": metric, "random_state": random_state}
        graph_a = mutual_knn_graph(ca, k_within, **kw)
        graph_q = mutual_knn_graph(cq, k_within, **kw)
        pa, pq = mutual_pairs(ca, cq, k_mnn, **kw)
        fallback = len(pa) == 0
        if fallback:  # no mutual pair at all: pair every query cell with its nearest anchor cell
            pq = np.arange(len(sq))
            pa = cross_neighbors(ca, cq, 1, **kw)[:, 0]
        va, vq = random_walk_pairs(pa, pq, graph_a, graph_q, walk_steps, generator)
        wa, wq = np.bincount(va, minlength=len(sa)), np.bincount(vq, minlength=len(sq))
        ua, uq = np.flatnonzero(wa), np.flatnonzero(wq)
        # the anchor's cells as corrected so far (with ``incremental``, earlier query batches through their generators)
        anchor_pool = torch.from_numpy(correct_rows(source, sa[ua], batch_of, generators)).to(source.device)
        query_pool = source(sq[uq])
        shift = batch_shift(
            lambda i, sa=sa: torch.from_numpy(correct_rows(source, sa[i], batch_of, generators)).to(source.device),
            lambda i, sq=sq: source(sq[i]),
            (pa, pq),
            graph_a,
            graph_q,
            generator,
        )
        # no batch shift at all: a vanishing reach, which keeps the generator at the identity
        distance = max(reach * shift["shift"], 1e-3 * shift["pair_distance"]) if reach else 0.0
        gen, history = train_generator(
            query_pool,
            anchor_pool,
            torch.from_numpy(wq[uq].astype(np.float64)),
            torch.from_numpy(wa[ua].astype(np.float64)),
            n_epochs=n_epochs,
            n_critic=n_critic,
            batch_size=batch_size,
            latent_dim=latent_dim,
            generator=generator,
            stage=f"stage II (batch {labels[q]})",
            show_progress=show_progress,
            budget_batch=budget_batch,
            reach=distance or None,
            autocast_dtype=autocast_dtype,
        )
        drawn = history.pop("batch_size", [])  # cells per critic step (budget_batch_size), recorded once below
        generators[q] = gen
        histories.append(history)
        infos.append(
            {
                "batch": labels[q],
                "n_anchor_sample": int(len(sa)),
                "n_query_sample": int(len(sq)),
                "n_mnn_pairs": 0 if fallback else int(len(pa)),
                "n_anchor_pool": int(len(ua)),
                "n_query_pool": int(len(uq)),
                "batch_size": int(drawn[0]) if drawn else int(batch_size),
                **shift,
                "reach": distance,
            }
        )
        if incremental:
            anchor = np.concatenate([anchor, query])
    return generators, infos, histories
