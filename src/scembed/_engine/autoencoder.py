"""Deep count autoencoder: the network and its training, shared by ``tl.autoencoder`` and scDeepCluster.

A denoising autoencoder in the manner of DCA (Eraslan et al., Nature Communications 2019) and of scDeepCluster's
pretraining (Tian et al., Nature Machine Intelligence 2019): the encoder reads the z-scored log-normalised
counts plus Gaussian noise, the decoder gives per gene the parameters of a likelihood of the raw counts
(ZINB: mean, dispersion, dropout; NB: mean, dispersion) or, for log-normalised data, its reconstruction (MSE).
One training loop (:func:`train_autoencoder`, on :func:`scembed._engine.training.train`) serves both callers;
:func:`pretrain` is scDeepCluster's call of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import counts
from .counts import CountData, epoch_batches, training_blocks
from .distributed import (
    all_gather_rows,
    all_reduce_sum,
    averaged_gradients,
    broadcast_module_,
    check_same_across_ranks,
    rank_generator,
    shard,
    world,
)
from .mmd import BatchPenalty
from .nn import mlp
from .training import adam, train
from .zinb import DISPERSIONS, LIKELIHOODS, N_HEADS, reconstruction_loss

#: default training length: about this many gradient steps, within the epoch bounds below
TARGET_STEPS = 20_000
MIN_EPOCHS, MAX_EPOCHS = 5, 400
#: held-out cells at most: plenty for the stopping rule, and a bounded amount of memory (they are read once)
MAX_VALIDATION_ROWS = 8192


#: share of cells held out for early stopping by default (as scvi-tools)
DEFAULT_VALIDATION_FRACTION = 0.1
#: epochs of the schedule used by default with a batch penalty acting (every cell trains, no early stop): the
#: original scDeepCluster's fixed pretraining, under which the penalty was measured
PENALISED_EPOCHS = 300


def default_holdout(fraction: float | None, patience: int | None, penalised: bool) -> tuple[float, int | None]:
    """The held-out share and patience where ``fraction`` is left to the default (``None``).

    The held-out loss measures the reconstruction only; with a batch penalty acting (``penalised``) the objective
    goes on aligning the batches after that loss stops improving, so by default every cell trains and nothing
    stops early. Otherwise :data:`DEFAULT_VALIDATION_FRACTION` and the given patience.
    """
    if fraction is not None:
        return fraction, patience
    return (0.0, None) if penalised else (DEFAULT_VALIDATION_FRACTION, patience)


def default_max_epochs(n_train: int, batch_size: int) -> int:
    """Epochs for about :data:`TARGET_STEPS` mini-batch steps: clip(round(S · batch_size / N), 5, 400)."""
    if n_train <= 0:
        return MIN_EPOCHS
    return int(np.clip(round(TARGET_STEPS * batch_size / n_train), MIN_EPOCHS, MAX_EPOCHS))


class Heads(nn.Module):
    """``n_heads`` Linear layers ``in_features`` → G side by side; the output is one rows × G tensor per head.

    Mathematically one Linear layer of width ``n_heads`` · G, and saved as one: the state dict holds ``weight``
    (``n_heads`` · G × ``in_features``) and ``bias`` with the heads stacked in order, and the initial weights are
    drawn as that one layer's. Kept apart because at many genes the stacked block (and its weight gradient)
    would exceed glibc's 32 MB mmap threshold (256 cells × 3 heads × ~11,000 genes) and be fresh memory every
    training step, every page of it faulting anew; each head's own rows × G block stays below it up to three
    times as many genes.
    """

    def __init__(self, in_features: int, n_genes: int, n_heads: int):
        super().__init__()
        self.in_features, self.n_genes, self.n_heads = in_features, n_genes, n_heads
        stacked = nn.Linear(in_features, n_heads * n_genes)  # the one layer's initial weights, same draws
        for i, (w, b) in enumerate(zip(stacked.weight.detach().split(n_genes), stacked.bias.detach().split(n_genes))):
            self.register_parameter(f"weight_{i}", nn.Parameter(w.clone()))
            self.register_parameter(f"bias_{i}", nn.Parameter(b.clone()))

    @property
    def out_features(self) -> int:
        return self.n_heads * self.n_genes

    def _parts(self, name: str) -> list[nn.Parameter]:
        return [getattr(self, f"{name}_{i}") for i in range(self.n_heads)]

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(F.linear(h, w, b) for w, b in zip(self._parts("weight"), self._parts("bias")))

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for name in ("weight", "bias"):
            destination[prefix + name] = torch.cat([p.detach() for p in self._parts(name)])

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        shapes = {"weight": (self.out_features, self.in_features), "bias": (self.out_features,)}
        for name, shape in shapes.items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if tuple(value.shape) != shape:
                error_msgs.append(f"size mismatch for {key}: copying {tuple(value.shape)}, expected {shape}.")
                continue
            with torch.no_grad():
                for p, part in zip(self._parts(name), value.split(self.n_genes)):
                    p.copy_(part)
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] not in shapes)


class Autoencoder(nn.Module):
    """Encoder G(+B) → hidden → latent (linear bottleneck); decoder latent(+B) → reversed hidden → heads.

    The heads (:class:`Heads`) give per gene the logits of the mean, dispersion and dropout (ZINB), of the mean
    and dispersion (NB), or the reconstruction itself (MSE), each rows × G. With ``dispersion="gene"`` (ZINB and
    NB) the dispersion's logit is one free parameter per gene (``dispersion_logit``, as scVI's default) instead of
    a head: the decoder has one Linear head fewer, and :meth:`decode` returns that parameter broadcast to rows ×
    G in the dispersion's place, so that the losses see the same heads either way. With ``n_batches`` > 0 the
    one-hot batch is appended to the decoder's input and, if ``batch_encoder``, to the encoder's.
    """

    def __init__(
        self,
        n_genes: int,
        n_latent: int = 32,
        hidden: Sequence[int] = (256, 64),
        n_batches: int = 0,
        *,
        likelihood: str = "zinb",
        batch_encoder: bool = False,
        dispersion: str = "cell",
    ):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; expected one of {LIKELIHOODS}")
        if dispersion not in DISPERSIONS:
            raise ValueError(f"unknown dispersion {dispersion!r}; expected one of {DISPERSIONS}")
        self.n_genes, self.n_latent, self.n_batches, self.hidden = n_genes, n_latent, n_batches, tuple(hidden)
        self.likelihood = likelihood
        # the MSE has no dispersion: "cell" there keeps one description of every network
        self.dispersion = dispersion if likelihood != "mse" else "cell"
        self.batch_encoder = bool(batch_encoder and n_batches)
        self.encoder = mlp([n_genes + (n_batches if self.batch_encoder else 0), *hidden, n_latent], batchnorm=False)
        dec = [n_latent + n_batches, *reversed(self.hidden)]
        self.decoder = mlp(dec, batchnorm=False, final_activation=True)
        gene_wise = self.dispersion == "gene"
        self.heads = Heads(dec[-1], n_genes, N_HEADS[likelihood] - gene_wise)
        if gene_wise:
            # softplus(0) ≈ 0.69: the inverse dispersion a per-cell head starts near (its logits start near 0)
            self.dispersion_logit = nn.Parameter(torch.zeros(n_genes))

    @property
    def z_dim(self) -> int:
        """The latent dimension (scDeepCluster's name for ``n_latent``)."""
        return self.n_latent

    def encode(self, x: torch.Tensor, onehot: torch.Tensor | None = None) -> torch.Tensor:
        """Latent coordinates of the encoder input ``x`` (the batch one-hot is used if ``batch_encoder``)."""
        return self.encoder(x if onehot is None or not self.batch_encoder else torch.cat([x, onehot], 1))

    def decode(self, z: torch.Tensor, onehot: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The heads' outputs, ``N_HEADS[likelihood]`` tensors of rows × G (for the ZINB: ``a, b, c``).

        With ``dispersion="gene"``, ``b`` is ``dispersion_logit`` broadcast to rows × G (a view: no copy).
        """
        out = self.heads(self.decoder(z if onehot is None else torch.cat([z, onehot], 1)))
        if self.dispersion == "gene":
            return (out[0], self.dispersion_logit.expand(len(z), -1), *out[1:])
        return out

    def forward(self, x: torch.Tensor, onehot: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        return self.decode(self.encode(x, onehot), onehot)


def _with_noise(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """The denoising input ``x`` + σ·N(0, 1), in one pass over ``x``; ``x`` itself when σ = 0."""
    if not sigma:
        return x
    return torch.add(x, torch.randn(x.shape, generator=generator, device=x.device), alpha=sigma)


@torch.no_grad()
def encode_all(
    net: Autoencoder,
    data: CountData,
    device: torch.device,
    batch_size: int | None = None,
    *,
    rows: slice | None = None,
) -> torch.Tensor:
    """Latent coordinates of every cell (or of the cells in ``rows``; no noise), in batches; float32 on ``device``.

    The matrix is read in contiguous slices of ``batch_size`` rows (default :func:`~.counts.infer_rows`: 8,192,
    fewer for many genes).
    """
    batch_size = batch_size or counts.infer_rows(len(data.genes))
    out = []
    first, last = (0, data.n_obs) if rows is None else (rows.start, rows.stop)
    for start in range(first, last, batch_size):
        mb = data.batch(slice(start, min(start + batch_size, last)), device, counts=False)
        out.append(net.encode(mb.xin, mb.onehot))
    return torch.cat(out) if out else torch.empty(0, net.n_latent, device=device)


def embed(net: Autoencoder, data: CountData, device: torch.device) -> np.ndarray:
    """Latent coordinates of every cell, float32, the same on every rank.

    Under ``torchrun`` each rank encodes (and reads) only its own contiguous share of the cells
    (:func:`~.distributed.shard`), and the shares are gathered in row order. One process: :func:`encode_all`.
    """
    z = encode_all(net, data, device, rows=shard(data.n_obs)).cpu().numpy()
    return all_gather_rows(z)


@torch.no_grad()
def evaluate(
    net: Autoencoder,
    data: CountData,
    rows: np.ndarray,
    device: torch.device,
    batch_size: int,
    *,
    noise: float = 0.0,
    seed: int = 0,
) -> float:
    """Mean loss over ``rows`` × genes, with the input noise of training drawn afresh from ``seed``.

    The same ``seed`` gives the same noise, so that the losses of successive epochs differ only by the weights.
    """
    net.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    total = 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        mb = data.batch(chunk, device)
        out = net(_with_noise(mb.xin, noise, gen), mb.onehot)
        total += float(reconstruction_loss(net.likelihood, out, mb.counts, mb.size_factors, mb.nonzero)) * len(chunk)
    return total / max(len(rows), 1)


def train_autoencoder(
    net: Autoencoder,
    data: CountData,
    *,
    max_epochs: int,
    batch_size: int,
    noise: float,
    lr: float = 1e-3,
    device: torch.device,
    generator: torch.Generator,
    noise_generator: torch.Generator,
    train_rows: np.ndarray | None = None,
    validation_rows: np.ndarray | None = None,
    patience: int | None = None,
    validation_seed: int = 0,
    desc: str = "autoencoder",
    show_progress: bool | None = None,
    batch_penalty: float = 0.0,
) -> tuple[dict[str, list[float]], int]:
    """Train ``net`` on its likelihood: Gaussian noise ``noise`` on the encoder input, Adam(amsgrad).

    Mini-batches are drawn from ``train_rows`` (default: every cell), read from ``data.X`` in row blocks
    (:class:`~.counts.RowBlocks`): every epoch the blocks of :data:`~.counts.BLOCK_ROWS` rows come in a new
    order, are read :data:`~.counts.READ_BLOCKS` at a time (more if one mini-batch needs more rows), and the rows
    of each read are shuffled and cut into mini-batches, so that one read is in memory at a time, whether ``X``
    is in memory or on disk. Under ``torchrun`` every rank reads only its own share of the blocks.

    With ``validation_rows``, the mean loss of those cells is recorded every epoch (with input noise as in
    training, the same draw every epoch: the denoising objective, whose clean-input counterpart stops
    improving long before the latent space is learnt; ``validation_seed`` seeds that draw), training stops when
    it has not improved for ``patience`` epochs and the weights of its best epoch are restored; without,
    ``patience`` watches the training loss and the last weights are kept. The held-out cells are read into
    memory once (under ``torchrun`` each rank those in its :func:`~.distributed.shard`, and the losses are
    added up across ranks).

    Returns
    -------
    history
        ``loss`` (training, per epoch) and, with validation cells, ``validation_loss``.
    n_epochs
        Epochs run.
    """
    opt = adam(net.parameters(), lr=lr, amsgrad=True, sync=False)
    rows = np.arange(data.n_obs) if train_rows is None else np.asarray(train_rows, dtype=np.int64)
    blocks = training_blocks(rows, batch_size)
    validate = validation_rows is not None and len(validation_rows) > 0
    penalty = BatchPenalty(batch_penalty, data.n_batches, net.n_latent, device, _penalty_generator(noise_generator))
    # under torchrun (distributed.py): rank 0's weights, this rank's share of the blocks, its own shuffles and
    # noise; the held-out loss is summed over the ranks' cells, so early stopping decides alike everywhere
    stats = [np.ravel(a) for a in (data.size_factors, data.genes, data.gene_mean, data.gene_std)]
    check_same_across_ranks("count data (size factors, genes, gene statistics)", np.concatenate(stats, dtype=float))
    broadcast_module_(net)
    noise_generator = rank_generator(noise_generator)
    row_generator = rank_generator(generator)  # one process: the generator itself, as before
    if validate:
        own = shard(data.n_obs)
        held = np.asarray(validation_rows, dtype=np.int64)
        held = held[(held >= own.start) & (held < own.stop)]
        held_out = data.take(held, counts.INFER_BATCH)

    def validation_loss() -> float:
        loss = evaluate(net, held_out, np.arange(held_out.n_obs), device, batch_size, noise=noise, seed=validation_seed)
        if not world().distributed:
            return loss
        total = all_reduce_sum(torch.tensor([loss * held_out.n_obs, held_out.n_obs], dtype=torch.float64))
        return float(total[0] / total[1])

    def step(epoch: int) -> dict[str, float]:
        net.train()
        total = torch.zeros((), device=device)
        n_seen = 0
        for rows_now, (xin, raw, sf, onehot, nonzero) in epoch_batches(
            data, blocks, batch_size, generator, row_generator, device
        ):
            noisy = _with_noise(xin, noise, noise_generator)
            if penalty.active:  # the penalty reads the codes of the clean input: one pass over both
                z_noisy, z_clean = net.encode(torch.cat([noisy, xin]), _twice(onehot)).chunk(2)
                out = net.decode(z_noisy, onehot)
                loss = reconstruction_loss(net.likelihood, out, raw, sf, nonzero)
                objective = loss + penalty(z_clean, onehot, torch.as_tensor(rows_now, device=device), loss)
            else:
                out = net.decode(net.encode(noisy, onehot), onehot)
                objective = loss = reconstruction_loss(net.likelihood, out, raw, sf, nonzero)
            opt.zero_grad(set_to_none=True)
            objective.backward()
            opt.step()
            total += loss.detach() * len(rows_now)
            n_seen += len(rows_now)
        out = {"loss": float(total) / max(n_seen, 1)}
        if penalty.active:
            out["batch_mmd"] = penalty.mean()
        if validate:
            out["validation_loss"] = validation_loss()
        return out

    # under torchrun: the wide layers' gradients are averaged while the backward pass goes on (one backward per step)
    with averaged_gradients(opt, overlap=True):
        result = train(
            step,
            max_epochs,
            desc=desc,
            show_progress=show_progress,
            monitor="validation_loss" if validate else "loss",
            patience=patience,
            module=net,
            keep_best=validate,
        )
    net.zero_grad(set_to_none=True)  # the last step's gradients (as large as the network) are training state only
    return result


def _twice(onehot: torch.Tensor | None) -> torch.Tensor | None:
    return None if onehot is None else torch.cat([onehot, onehot])


def _penalty_generator(noise_generator: torch.Generator) -> torch.Generator:
    """The batch labels' shuffles get their own stream, so that the noise is the same with or without them."""
    return torch.Generator().manual_seed(noise_generator.initial_seed() + 1)


def pretrain(
    net: Autoencoder,
    data: CountData,
    *,
    epochs: int | None = None,
    batch_size: int,
    sigma: float | None = None,
    lr: float = 1e-3,
    device: torch.device,
    generator: torch.Generator,
    noise_generator: torch.Generator,
    show_progress: bool | None = None,
    max_epochs: int | None = None,
    noise: float | None = None,
    batch_penalty: float = 0.0,
    train_rows: np.ndarray | None = None,
    validation_rows: np.ndarray | None = None,
    patience: int | None = None,
    validation_seed: int = 0,
) -> dict[str, list[float]]:
    """Pretrain scDeepCluster's network with :func:`train_autoencoder`.

    On every cell for a fixed number of epochs (the original), or, with ``validation_rows``, on ``train_rows``
    until the held-out loss has not improved for ``patience`` epochs, the weights of its best epoch kept.

    ``max_epochs``/``noise`` are the vocabulary's names of ``epochs``/``sigma`` (either may be given).
    Returns the history with the loss under the likelihood's name (``{"zinb": [...]}``) and, with held-out cells,
    theirs under ``"validation_" + likelihood``.
    """
    max_epochs = _one_of(epochs, max_epochs, "epochs", "max_epochs")
    noise = _one_of(sigma, noise, "sigma", "noise")
    history, _ = train_autoencoder(
        net,
        data,
        max_epochs=max_epochs,
        batch_size=batch_size,
        noise=noise,
        lr=lr,
        device=device,
        generator=generator,
        noise_generator=noise_generator,
        desc="scDeepCluster pretraining",
        show_progress=show_progress,
        batch_penalty=batch_penalty,
        train_rows=train_rows,
        validation_rows=validation_rows,
        patience=patience,
        validation_seed=validation_seed,
    )
    out = {net.likelihood: history.get("loss", [])}
    if "validation_loss" in history:
        out[f"validation_{net.likelihood}"] = history["validation_loss"]
    if "batch_mmd" in history:
        out["batch_mmd"] = history["batch_mmd"]
    return out


def _one_of(old, new, old_name: str, new_name: str):
    if old is None and new is None:
        raise TypeError(f"`{new_name}` is required")
    if old is not None and new is not None and old != new:
        raise TypeError(f"`{old_name}` and `{new_name}` name the same setting; give one")
    return new if new is not None else old


def split_validation(
    n_obs: int, fraction: float, random_state: int, max_rows: int | None = MAX_VALIDATION_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation rows (sorted): a random ``round(fraction · n_obs)`` cells are held out.

    At most ``max_rows`` (``None``: no bound); at least one cell is always left for training; with fewer than
    one held-out cell there is no validation.
    """
    n_val = min(int(math.floor(fraction * n_obs + 0.5)), n_obs - 1) if fraction > 0 else 0
    if max_rows is not None:
        n_val = min(n_val, max_rows)
    order = np.random.default_rng(random_state).permutation(n_obs)
    return np.sort(order[n_val:]), np.sort(order[:n_val])
