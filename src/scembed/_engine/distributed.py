"""Data-parallel training and sharded affinities on ``torch.distributed``, launched by ``torchrun``.

The engine is PyTorch's own: ``torchrun`` (``python -m torch.distributed.run``) starts one process per device and
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` turns
that into a ``torch.distributed`` process group (NCCL on CUDA, gloo on CPU). Nothing here starts processes or
opens sockets. Without those variables (or with ``WORLD_SIZE=1``) every function below is a no-op and scembed
runs as one process, exactly as before.

Where the collectives live
--------------------------
- Gradients: :func:`sync_gradients` registers a step pre-hook on an optimiser that all-reduces (mean) every
  parameter's ``.grad`` just before ``opt.step()``. The package's one optimiser factory
  (:func:`scembed._engine.training.adam`) calls it, so every Adam-trained network is data-parallel without a
  collective in its trainer. :func:`grad_sync` does the same for a module, for optimisers made elsewhere.
  Why not ``DistributedDataParallel``: the trainers have step structures DDP handles badly or not at all —
  NeuralEE backpropagates from two roots with a hand-computed gradient for one of them, iMAP alternates a critic
  and a generator with a gradient penalty (double backward), scDeepCluster recomputes targets on all cells
  between steps. One flat all-reduce per step just before the update is correct for all of them. The count
  autoencoder's two trainers (``train_autoencoder``, scDeepCluster's clustering), which call ``backward`` once per
  step, also get DDP's overlap of communication with the backward pass: ``averaged_gradients(opt, overlap=True)``
  all-reduces each gradient of at least :data:`EARLY_GRAD_BYTES` in place as soon as the backward pass has
  produced it (their gene-wide heads and input layer: 8.4 MB at 2,000 genes). NeuralEE's gradients are small
  (~24k parameters, 95 kB per step) and iMAP's generator step also accumulates the critic's gradients, so both keep
  the one all-reduce before the step.
- Losses: the training driver (:func:`scembed._engine.training.train`) averages each epoch's losses across ranks
  (:func:`mean_across_ranks`), so that patience, ``keep_best`` and every stopping rule decide identically on
  every rank (a rank that stopped alone would leave the others waiting in a collective).
- Data: every rank draws the same permutation from the shared seed and takes whole mini-batches ``r, r + W, …``
  of it (:func:`rank_blocks`, :func:`rank_minibatches`), all ranks the same number per epoch, so a W-rank step is
  the one-process step on W batches with their gradients averaged. NeuralEE ("graph" and "batch" modes) and
  scDeepCluster's clustering split their batches this way. The count autoencoder (``train_autoencoder``:
  ``tl.autoencoder`` and scDeepCluster's pretraining) splits row blocks alike: one shared order of the blocks of
  consecutive rows, rank r reading those at positions r, r + W, … (:func:`rank_share`; ``counts.RowBlocks``), so
  that each rank reads only its own blocks of a matrix that may be on disk; its statistics passes, held-out loss
  and final embedding each read the rank's :func:`shard` of the rows, combined by :func:`all_reduce_sum` and
  :func:`all_gather_rows`. Draws that should differ per rank (denoising noise, the shuffles within a read, iMAP's
  mixup and pool samples) come from :func:`rank_generator`.
  scDeepCluster's DEC targets come from :func:`dec_assignments` (cluster sums all-reduced), its initial centres
  from :func:`on_main`; its Adadelta optimiser is averaged by :func:`averaged_gradients` itself. :func:`knn_affinities`
  splits the rows of the affinity computation (``compute_affinities``: ``pp.affinity`` and the affinities
  ``tl.ee`` and ``tl.neuralee`` compute).
- BatchNorm: each rank normalises with its own batch's statistics while training (no synchronised BatchNorm).
  NeuralEE recomputes the running statistics on all cells after training (every rank holds all cells), iMAP
  averages them over ranks (:func:`average_buffers_`); either way every rank ends with the same network.
- Not split (every rank does the same work, and gets the same result): ``tl.ee``, full-batch NeuralEE, the
  affinities of a given neighbour graph (``neighbors_key``), iMAP's kNN/MNN pools, and the final embedding of all
  cells (but the autoencoder's, above).

Each rank holds the same inputs (the same AnnData, or the same backed ``.h5ad`` path); :func:`check_same_across_ranks`
compares fingerprints before any work and raises one ``ValueError`` on every rank naming what differs (for the
autoencoder, whose ranks read different rows, the cell and gene names).

Failure: the process group gets a timeout (``SCEMBED_DIST_TIMEOUT`` seconds, default 600): a collective that
waits longer for a dead or hung rank raises on the ranks still alive, so the job ends with an error instead of
hanging. ``SCEMBED_DISTRIBUTED=0`` makes scembed ignore ``torchrun``'s variables (every rank then works alone).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import sparse

#: environment variable: seconds a collective may wait for the other ranks before the job fails
ENV_TIMEOUT = "SCEMBED_DIST_TIMEOUT"
#: environment variable: "0" ignores torchrun's variables
ENV_ENABLE = "SCEMBED_DISTRIBUTED"
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` of ``size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, shows progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.size > 1


def _available() -> bool:
    return torch.distributed.is_available()


def _enabled() -> bool:
    return os.environ.get(ENV_ENABLE, "1").strip().lower() not in ("0", "false", "no", "off")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def timeout_seconds() -> float:
    """The collective timeout: ``SCEMBED_DIST_TIMEOUT`` seconds, else 600."""
    raw = os.environ.get(ENV_TIMEOUT)
    if raw is None or not raw.strip():
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_TIMEOUT} must be a number of seconds, got {raw!r}.") from None
    if not value > 0:
        raise ValueError(f"{ENV_TIMEOUT} must be positive, got {raw!r}.")
    return value


def init_from_env(*, backend: str | None = None, timeout: float | None = None) -> World:
    """Initialise ``torch.distributed`` from ``torchrun``'s environment, once; return :func:`world`.

    Does nothing when ``WORLD_SIZE`` is unset or 1, when ``SCEMBED_DISTRIBUTED=0``, or when a process group
    already exists (one made by the caller, e.g. Lightning, is used as it is).

    Parameters
    ----------
    backend
        ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is present, gloo otherwise. With NCCL the process uses
        ``cuda:LOCAL_RANK`` (``torch.cuda.set_device``), so ``device="cuda"`` means its own GPU.
    timeout
        Seconds a collective waits for the other ranks before raising (default :func:`timeout_seconds`).
    """
    if not (_available() and _enabled()):
        return World()
    if torch.distributed.is_initialized():
        return world()
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return World()
    local_rank = _env_int("LOCAL_RANK", 0)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.distributed.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    seconds = timeout_seconds() if timeout is None else float(timeout)
    torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=seconds))
    return world()


def world() -> World:
    """Rank of this process and the number of processes; initialises the group from the environment if needed."""
    if not (_available() and _enabled()):
        return World()
    if not torch.distributed.is_initialized():
        if _env_int("WORLD_SIZE", 1) <= 1:
            return World()
        return init_from_env()
    return World(
        rank=torch.distributed.get_rank(),
        size=torch.distributed.get_world_size(),
        local_rank=_env_int("LOCAL_RANK", 0),
        backend=str(torch.distributed.get_backend()),
    )


def is_main() -> bool:
    """Whether this process is rank 0 (or the only one). Never starts a process group."""
    if _available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    if not _enabled():
        return True
    return _env_int("RANK", 0) == 0


def local_device(dev: torch.device) -> torch.device:
    """Under ``torchrun``, a plain ``cuda`` device becomes this rank's GPU, ``cuda:LOCAL_RANK`` (the one NCCL uses).

    Anything else (CPU, an explicit index, one process) is returned as it is. Never starts a process group, so a
    device resolved before the first collective is already the right one.
    """
    if dev.type != "cuda" or dev.index is not None or not (_available() and _enabled()):
        return dev
    if torch.distributed.is_initialized():
        return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_world_size() > 1 else dev
    if _env_int("WORLD_SIZE", 1) <= 1:
        return dev
    return torch.device("cuda", _env_int("LOCAL_RANK", 0))


# ------------------------------------------------------------------------------------------------- collectives
def _comm_device(w: World) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if w.backend == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place; returns it."""
    w = world()
    if not w.distributed:
        return tensor
    buf = tensor.to(_comm_device(w))
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def all_reduce_mean_(tensors: Iterable[torch.Tensor]) -> None:
    """Average every tensor over ranks, in place, with one all-reduce per dtype (a flat buffer, like a DDP bucket)."""
    w = world()
    if not w.distributed:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    dev = _comm_device(w)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to(dev) for t in group])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat /= w.size
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s, in place; returns it."""
    w = world()
    if not w.distributed:
        return tensor
    buf = tensor.to(_comm_device(w))
    torch.distributed.broadcast(buf, src=src)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def average_buffers_(*modules: torch.nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running mean and variance) of ``modules`` over ranks.

    Each rank's BatchNorm layers normalise with their own batch's statistics while training and keep running
    averages of their own batches only; call this once after training so that every rank evaluates with the same
    statistics (the mean over ranks of the running averages: the running mean of all ranks' batches; the
    variance leaves out the small spread between the ranks' batch means).
    """
    if not world().distributed:
        return
    with torch.no_grad():
        all_reduce_mean_([b for m in modules for b in m.buffers() if b.is_floating_point()])


def broadcast_module_(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters and buffers (as DDP does when it wraps a module)."""
    if not world().distributed:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            broadcast_(t.data, src=src)


def all_gather_rows(array: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Concatenate every rank's rows in rank order (row counts may differ); same type and dtype as ``array``."""
    w = world()
    if not w.distributed:
        return array
    is_numpy = not isinstance(array, torch.Tensor)
    t = torch.from_numpy(np.ascontiguousarray(array)) if is_numpy else array
    dev = _comm_device(w)
    t_dev = t.to(dev)
    counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(w.size)]
    torch.distributed.all_gather(counts, torch.tensor([t.shape[0]], dtype=torch.int64, device=dev))
    counts_ = [int(c.item()) for c in counts]
    n_max = max(counts_)
    padded = torch.zeros((n_max, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t_dev
    parts = [torch.empty_like(padded) for _ in range(w.size)]
    torch.distributed.all_gather(parts, padded)
    out = torch.cat([p[:c] for p, c in zip(parts, counts_)]).to(t.device)
    return out.numpy() if is_numpy else out


def mean_across_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """Average named numbers over ranks (in float64); the names must come in the same order on every rank."""
    values = dict(values)
    w = world()
    if not w.distributed or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    all_reduce_sum(t)
    return {k: float(v) / w.size for k, v in zip(values, t.tolist())}


def grad_sync(params: torch.nn.Module | Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` (a module or parameters) over ranks; call after backward, before the step.

    Parameters without a gradient are skipped; which ones have none must be the same on every rank.
    """
    if not world().distributed:
        return
    params = params.parameters() if isinstance(params, torch.nn.Module) else params
    all_reduce_mean_([p.grad for p in params if p.grad is not None])


#: gradients of at least this many bytes are all-reduced as soon as the backward pass has produced them
#: (``sync_gradients(..., overlap=True)``), while it goes on with the layers before; the rest in one flat buffer
EARLY_GRAD_BYTES = 1 << 20


def sync_gradients(optimizer: torch.optim.Optimizer, *, overlap: bool = False) -> Any:
    """Make ``optimizer.step()`` average its parameters' gradients over ranks first (a step pre-hook).

    With ``overlap``, each gradient of at least :data:`EARLY_GRAD_BYTES` is all-reduced in place, asynchronously,
    the moment the backward pass has accumulated it (``register_post_accumulate_grad_hook``), so that its
    communication overlaps the backward pass through the layers before it, as DDP's buckets do; the step hook
    waits for these and all-reduces the smaller gradients in one flat buffer. The same mean either way. Only for
    trainers that call ``backward`` once per optimiser step: a gradient accumulated twice before a step raises
    (its first sum would already be on its way). The count autoencoder's wide heads and input layer (8.4 MB of
    gradients at 2,000 genes) are its users. The per-parameter hooks outlive the optimiser: remove them (the
    returned handle's ``remove()``) when its training ends, before the parameters are trained by another.

    Returns a handle whose ``remove()`` removes every hook, or ``None`` when there is one process (then nothing is
    registered).
    """
    w = world()
    if not w.distributed:
        return None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    started: dict[int, Any] = {}  # id(param) -> its all-reduce's work, this step

    def early(param: torch.Tensor) -> None:
        if id(param) in started:
            raise RuntimeError(
                "sync_gradients(overlap=True): a gradient was accumulated twice before one optimiser step; use "
                "overlap=False for trainers that call backward more than once per step."
            )
        started[id(param)] = torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.SUM, async_op=True)

    handles = []
    if overlap:
        dev = _comm_device(w)
        for p in params:
            if p.requires_grad and p.numel() * p.element_size() >= EARLY_GRAD_BYTES and p.device == dev:
                handles.append(p.register_post_accumulate_grad_hook(early))

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grad_sync([p for p in params if id(p) not in started])
        for p in params:
            work = started.pop(id(p), None)
            if work is not None:
                work.wait()
                p.grad /= w.size

    handles.append(optimizer.register_step_pre_hook(hook))
    return _Handles(handles)


@contextlib.contextmanager
def averaged_gradients(optimizer: torch.optim.Optimizer, *, overlap: bool = False) -> Iterator[None]:
    """:func:`sync_gradients` for the length of a training loop: every hook is removed when it ends (or raises)."""
    handle = sync_gradients(optimizer, overlap=overlap)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


class _Handles:
    """Several hook handles removed together."""

    def __init__(self, handles: list[Any]):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------- checks
def _fingerprint(value: Any) -> tuple[str, str]:
    """A digest of ``value`` and a short description of it for the error message."""
    h = hashlib.sha256()
    if sparse.issparse(value):
        m = sparse.csr_matrix(value)
        for part in (np.asarray(m.shape), m.indptr, m.indices, m.data):
            h.update(np.ascontiguousarray(part).tobytes())
        return h.hexdigest(), f"sparse {m.shape} with {m.nnz} entries"
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray) and value.dtype != object:
        h.update(str((value.shape, value.dtype.str)).encode())
        h.update(np.ascontiguousarray(value).tobytes())
        return h.hexdigest(), f"array {value.shape} {value.dtype}, digest {h.hexdigest()[:12]}"
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) > 8:
        items = [str(v) for v in value]
        h.update("\x1f".join(items).encode())
        return h.hexdigest(), f"{len(items)} items starting {items[:3]}, digest {h.hexdigest()[:12]}"
    text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
    h.update(text.encode())
    return h.hexdigest(), text if len(text) <= 80 else text[:77] + "..."


def check_same_across_ranks(name: str, value: Any) -> None:
    """Raise the same ``ValueError`` on every rank when ``value`` differs between ranks (no-op for one process).

    ``value`` may be an array, tensor, sparse matrix, a sequence (e.g. gene names, batch categories) or anything
    with a stable ``repr`` (shapes, parameters). Only fingerprints travel. Call it with the same ``name`` on every
    rank, in the same order, before training.
    """
    w = world()
    if not w.distributed:
        return
    mine = _fingerprint(value)
    everyone: list[Any] = [None] * w.size
    torch.distributed.all_gather_object(everyone, mine)
    if any(d != everyone[0][0] for d, _ in everyone):
        differing = [r for r, (d, _) in enumerate(everyone) if d != everyone[0][0]]
        where = _first_difference(value, differing, w)
        raise ValueError(
            f"`{name}` differs across the {w.size} ranks: rank 0 has {everyone[0][1]}, "
            + ", ".join(f"rank {r} has {everyone[r][1]}" for r in differing)
            + where
            + ". Every rank must be given the same data (the same AnnData or the same .h5ad file) and parameters."
        )


def _first_difference(value: Any, differing: list[int], w: World) -> str:
    """For sequences of names (genes, batch categories): where the first rank that differs first departs from rank 0.

    Runs only after a mismatch was found, on every rank (it is a collective), so it costs nothing otherwise.
    """
    is_names = isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1)
    is_names = is_names and len(value) <= 10**6
    flags: list[Any] = [None] * w.size
    torch.distributed.all_gather_object(flags, bool(is_names))
    if not all(flags):
        return ""
    everyone: list[Any] = [None] * w.size
    torch.distributed.all_gather_object(everyone, [str(v) for v in value])
    ref, other, r = everyone[0], everyone[differing[0]], differing[0]
    for i, (a, b) in enumerate(zip(ref, other)):
        if a != b:
            return f" (first difference at position {i}: {a!r} on rank 0, {b!r} on rank {r})"
    return f" (rank 0 has {len(ref)} items, rank {r} has {len(other)})"


def check_inputs(named: Mapping[str, Any]) -> None:
    """:func:`check_same_across_ranks` for each item, in order."""
    for name, value in named.items():
        check_same_across_ranks(name, value)


# ------------------------------------------------------------------------------------------------- rows
def shard(n: int, w: World | None = None) -> slice:
    """The contiguous block of ``range(n)`` this rank owns (sizes differ by at most one, rank order)."""
    w = world() if w is None else w
    base, extra = divmod(n, w.size)
    start = w.rank * base + min(w.rank, extra)
    return slice(start, start + base + (1 if w.rank < extra else 0))


def rank_blocks(n_blocks: int, n_steps: int, w: World | None = None) -> list[int]:
    """The block this rank takes at each of ``n_steps`` steps: ``rank, rank + W, ...`` (mod ``n_blocks``).

    Step ``s`` uses blocks ``s·W … s·W + W − 1`` of the shared permutation, one per rank, so the W-rank step is the
    one-process step on those W blocks with their gradients averaged.
    """
    w = world() if w is None else w
    return [(s * w.size + w.rank) % n_blocks for s in range(n_steps)]


def rank_share(n_blocks: int, w: World | None = None) -> list[int]:
    """The positions of this rank in one shared order of ``n_blocks`` items: :func:`rank_blocks` for one pass.

    Every rank gets ``n_blocks // W`` positions ``r, r + W, …``, so that the ranks take disjoint items (the
    ``n_blocks mod W`` left over wait for the next order). One process: every position, in order.

    Raises
    ------
    ValueError
        Fewer items than processes (``W > n_blocks``): some rank would have nothing of its own to train on, and
        sharing items round would weight them twice; the message says how many processes the data allow.
    """
    w = world() if w is None else w
    check_enough_blocks(n_blocks, w)
    return rank_blocks(n_blocks, n_blocks // w.size, w)


def check_enough_blocks(n_blocks: int, w: World | None = None) -> None:
    """A ValueError when more processes were started than there are blocks (mini-batches or row blocks) per epoch."""
    w = world() if w is None else w
    if w.distributed and n_blocks < w.size:
        raise ValueError(
            f"{w.size} processes were started, but the data make only {n_blocks} "
            f"{'block' if n_blocks == 1 else 'blocks'} (mini-batches or row blocks) per epoch: every process needs "
            f"at least one of its own. Start at most {max(n_blocks, 1)} processes (torchrun --nproc-per-node), or "
            "use a smaller batch_size."
        )


def knn_affinities(
    X: np.ndarray,
    k: int,
    perplexity: float,
    *,
    method: str = "auto",
    metric: str = "euclidean",
    tol: float = 1e-5,
    n_jobs: int | None = None,
    device: torch.device | str = "cpu",
    random_state: int = 0,
) -> tuple[sparse.csr_matrix, np.ndarray, int, str]:
    """Nearest neighbours and entropic affinities of the rows of ``X``, the rows split across ranks.

    One process: :func:`~scembed._engine.knn.nearest_neighbors` then
    :func:`~scembed._engine.affinity.entropic_affinities`, unchanged. Under ``torchrun``: every rank builds the
    same search structure over all of ``X`` (the exact search needs none; faiss, annoy and pynndescent build their
    index from the same data and seed on every rank), searches only its own contiguous block of rows (:func:`shard`),
    calibrates those rows, and the blocks' neighbours, conditional affinities and precisions are all-gathered and
    symmetrised on every rank. Calibration is row by row, so with the exact search the result equals the
    one-process one (ties between equally distant neighbours at the k-th place aside); an approximate index
    built alike on every rank gives its usual recall.

    Returns
    -------
    P
        ``(n, n)`` CSR float32, symmetric, summing to 1, identical on every rank.
    beta
        ``(n,)`` precisions.
    n_unconverged
        Rows not calibrated to ``tol`` (over all ranks).
    method
        The search used.
    """
    from .affinity import calibrate_perplexity, entropic_affinities, symmetrize
    from .knn import _drop_self, nearest_neighbors, resolve_knn_method

    w = world()
    if not w.distributed:
        idx, dist, used = nearest_neighbors(
            X, k, method=method, metric=metric, n_jobs=n_jobs, device=device, random_state=random_state
        )
        P, beta, n_bad = entropic_affinities(idx, dist, perplexity, tol=tol, device=device)
        return P, beta, n_bad, used
    n = X.shape[0]
    check_same_across_ranks("affinity input (X)", np.asarray(X))
    check_same_across_ranks("affinity parameters", (k, float(perplexity), method, metric, float(tol), random_state))
    used = resolve_knn_method(method, n, torch.device(device))
    rows = shard(n, w)
    row_ids = np.arange(rows.start, rows.stop)
    if len(row_ids):
        idx, dist, used = nearest_neighbors(
            X,
            min(k + 1, n),
            method=used,
            metric=metric,
            n_jobs=n_jobs,
            device=device,
            random_state=random_state,
            query=np.asarray(X)[rows],
        )
        idx, dist = _drop_self(idx, dist, k, row_ids)
        dist = np.where(idx < 0, np.inf, dist)
        P_cond, beta, n_bad = calibrate_perplexity(dist, perplexity, tol=tol, device=device)
    else:
        idx, P_cond, beta, n_bad = (np.empty((0, k), np.int64), np.empty((0, k)), np.empty(0), 0)
    # int32 column indices travel at half the bytes (n < 2**31 always holds for cells)
    idx_all = all_gather_rows(idx.astype(np.int32) if n < 2**31 else idx).astype(np.int64)
    P_all = all_gather_rows(np.ascontiguousarray(P_cond, dtype=np.float64))
    beta_all = all_gather_rows(np.ascontiguousarray(beta, dtype=np.float64))
    n_bad_all = int(all_reduce_sum(torch.tensor([n_bad], dtype=torch.int64)).item())
    return symmetrize(idx_all, P_all, n), beta_all, n_bad_all, used


def shard_sizes(n: int, size: int) -> Sequence[int]:
    """Rows per rank for ``n`` rows over ``size`` ranks (what :func:`shard` gives each)."""
    return [shard(n, World(rank=r, size=size)).stop - shard(n, World(rank=r, size=size)).start for r in range(size)]


# ------------------------------------------------------------------------------------------------- trainers' helpers
def rank_minibatches(
    n: int,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """Mini-batches of this rank: one permutation of ``range(n)`` drawn alike on every rank.

    Rank r takes batches ``r, r + W, …`` (:func:`rank_blocks`), every rank the same number,
    ``max(1, n_batches // W)``, so that the ranks step in lock-step; the batches left over are reshuffled into the
    next call's permutation. With one process this is every batch in order, the last one possibly short: the same
    as :func:`scembed._engine.training.minibatches`, from the same generator draws.
    """
    w = world()
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(device)
    batches = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    if not w.distributed:
        return batches
    return [batches[b] for b in rank_share(len(batches), w)]


def rank_generator(generator: torch.Generator) -> torch.Generator:
    """An independent random stream per rank, for draws that should differ between ranks (noise, mixup, samples).

    One process: ``generator`` itself, so one-process results do not change. Under ``torchrun``: every rank draws
    one seed from ``generator`` (so the shared stream advances alike everywhere and later shared draws still agree)
    and gets a new generator on the same device seeded from it and its rank.
    """
    w = world()
    if not w.distributed:
        return generator
    seed = int(torch.randint(2**62, (1,), generator=generator))
    digest = hashlib.sha256(f"{seed}:{w.rank}".encode()).digest()
    return torch.Generator(device=generator.device).manual_seed(int.from_bytes(digest[:7], "little"))


def on_main(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` on rank 0 only and give its result (picklable) to every rank.

    For work that must be done once and identically, e.g. the initial KMeans/Leiden centres of scDeepCluster.
    An exception on rank 0 is raised on every rank.
    """
    w = world()
    if not w.distributed:
        return fn(*args, **kwargs)
    box: list[Any] = [None]
    if w.is_main:
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except Exception as err:  # sent to the others, then raised everywhere
            box[0] = ("error", err)
    torch.distributed.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


@torch.no_grad()
def dec_assignments(z_local: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft assignments Q and DEC targets P (scDeepCluster) of all cells, from this rank's rows of the latent.

    Each rank encodes only its :func:`shard` of the cells; the per-cluster sums f_j = Σ_i q_ij are all-reduced
    (the only global quantity P needs), each rank forms P for its rows, and Q and P (cells × clusters, small) are
    all-gathered in rank order, so that every rank holds the rows of every mini-batch it may draw. Equal to
    :func:`scembed._engine.scdeepcluster.assignments` on all rows; one process: exactly that.
    """
    from .scdeepcluster import assignments, soft_assign, target_distribution

    if not world().distributed:
        return assignments(z_local, centroids)
    q = soft_assign(z_local, centroids) if z_local.shape[0] else z_local.new_zeros((0, centroids.shape[0]))
    f = all_reduce_sum(q.sum(0))
    p = target_distribution(q, f) if q.shape[0] else q
    return all_gather_rows(q), all_gather_rows(p)
