"""Count data for the autoencoders: size factors, z-scored log input and mini-batches read from row blocks.

:class:`CountData` keeps the counts as given (canonical CSR or dense in memory, or a matrix on disk such as the
``X`` of a backed ``.h5ad``) and turns the rows of one mini-batch at a time into what the network and the loss
need (:class:`MiniBatch`), so the whole matrix is never densified, and never read at once. Every pass reads
contiguous row slices: the checks and gene statistics (:func:`scan`), library sizes and :meth:`CountData.fit`
read :data:`INFER_BATCH` rows of sparse storage at a time (of dense storage at most :data:`INFER_ELEMENTS`
entries), training reads blocks of :data:`BLOCK_ROWS` rows, :data:`READ_BLOCKS`
of them at a time (:class:`RowBlocks`, :meth:`CountData.take`). Under ``torchrun`` each rank makes those passes
over its own contiguous share of the rows (:func:`~scembed._engine.distributed.shard`) and the sums are added
up across ranks (``across_ranks``), so that every rank ends with the statistics of all cells.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse

from .._utils._validation import ValueFacts
from .distributed import World, all_gather_rows, all_reduce_sum, rank_share, shard, world

#: rows handled at once outside training (statistics, encoding, target distribution): the largest slice read
INFER_BATCH = 8192
#: dense entries (rows × genes) at most of one encoding batch and of one slice of a pass over dense storage: 64 MiB
#: per float32 array, so that many genes take fewer rows at a time (8,192 rows × 14,000 genes: 460 MB per array)
INFER_ELEMENTS = 1 << 24
#: contiguous rows of one block: training reads the cells block by block and shuffles them within a read
BLOCK_ROWS = 512
#: blocks per read in training (more when one mini-batch needs more rows): 8,192 rows in memory at a time
READ_BLOCKS = 16
#: share of non-zero entries above which a sparse mini-batch is densified before it is transformed: the sparse
#: route gathers and scatters per non-zero (~12 ns each on a CPU), the dense one makes a few passes over every
#: entry (~1.2 ns each, plus ~6 ns per non-zero); they cost the same at about one entry in eight
#: (``benchmarks/README.md``, "tl.autoencoder": reading dense-ish counts)
DENSE_SHARE = 0.125


def _rows(X, rows) -> np.ndarray:
    block = X[rows]
    if sparse.issparse(block):
        block = block.toarray()
    return np.asarray(block, dtype=np.float32)


def _dense(X) -> np.ndarray:
    return X.toarray() if sparse.issparse(X) else np.asarray(X)


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


def _read(X: Any, rows: slice, genes: np.ndarray | None = None) -> np.ndarray | sparse.csr_matrix:
    """Rows ``rows`` of ``X`` (in memory or on disk), columns ``genes`` (default: all): canonical CSR or dense.

    One contiguous slice, the only read a matrix on disk is asked for; the values keep their stored dtype.
    """
    block = X[rows]
    if sparse.issparse(block):
        block = _canonical_csr(block)
        if genes is not None and len(genes) != block.shape[1]:
            block = _canonical_csr(block[:, genes])
        return block
    block = np.asarray(block)
    return block if genes is None or len(genes) == block.shape[1] else block[:, genes]


def _own_rows(n: int, across_ranks: bool) -> slice:
    """The rows a pass reads here: this rank's contiguous share under ``torchrun`` (``across_ranks``), else all."""
    return shard(n) if across_ranks else slice(0, n)


def _slices(rows: slice, size: int) -> Iterator[slice]:
    for start in range(rows.start, rows.stop, size):
        yield slice(start, min(start + size, rows.stop))


def _pass_rows(X: Any, n_cols: int) -> int:
    """Rows per slice of a pass over ``X``: :data:`INFER_BATCH` of sparse storage, :func:`infer_rows` of dense.

    A dense slice becomes float64 working copies (8,192 rows × 14,000 genes: 0.9 GB each); a sparse one holds only
    its non-zeros. ``format`` marks anndata's backed sparse matrices as well as scipy's.
    """
    stored_sparse = sparse.issparse(X) or getattr(X, "format", None) in ("csr", "csc")
    return INFER_BATCH if stored_sparse else infer_rows(n_cols)


def _add_over_ranks(*arrays: np.ndarray) -> list[np.ndarray]:
    """The element-wise sums over ranks of float64 ``arrays`` (one all-reduce); the arrays themselves for one rank."""
    if not world().distributed:
        return list(arrays)
    flat = torch.from_numpy(np.concatenate([np.ravel(a) for a in arrays]).astype(np.float64))
    all_reduce_sum(flat)
    out, offset = [], 0
    for a in arrays:
        out.append(flat[offset : offset + a.size].numpy().reshape(a.shape))
        offset += a.size
    return out


def _row_sums(block) -> np.ndarray:
    """Sum of every row, accumulated in float64 (sparse or dense, any real dtype)."""
    return np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()


def library_sizes(X, genes: np.ndarray | None = None, *, across_ranks: bool = False) -> np.ndarray:
    """Total counts per cell (float64) over ``genes`` (default: all), read in row slices, never densifying.

    With ``across_ranks``, under ``torchrun`` each rank reads its own share of the rows and every rank gets the
    sizes of all cells (a collective: call it on every rank).
    """
    own = _own_rows(X.shape[0], across_ranks)
    # summed in float64 whatever the input's dtype (a float16 sum rounds library sizes of a few thousand counts)
    step = _pass_rows(X, X.shape[1] if genes is None else len(genes))
    parts = [_row_sums(_read(X, rows, genes)) for rows in _slices(own, step)]
    lib = np.concatenate(parts) if parts else np.zeros(0)
    return all_gather_rows(lib) if across_ranks else lib


@dataclass
class CountScan:
    """One pass over a matrix (:func:`scan`): the facts its checks need, per-gene and per-cell sums."""

    n_obs: int
    facts: ValueFacts  #: non-finite, non-integer and smallest values, for the input checks
    detected: np.ndarray  #: cells with a positive value, per gene
    library: np.ndarray  #: sum of the values per cell (float64): the library size over all genes
    log2_sum: np.ndarray | None = None  #: sum of log2 of the positive values per gene (``log2``)
    total: np.ndarray | None = None  #: sum of the values per gene (``moments``)
    squares: np.ndarray | None = None  #: sum of the squared values per gene (``moments``)


def scan(X, *, log2: bool = False, moments: bool = False, across_ranks: bool = True) -> CountScan:
    """One pass over ``X`` in row slices: the facts of its values, genes detected and library sizes.

    On request also the sums that gene selection needs (``log2``: :func:`select_genes_by_zero_rate`; ``moments``:
    :func:`select_genes_by_variance`). Sums over NaN or negative values are meaningless; the caller raises on
    ``facts`` before using them. With ``across_ranks``, under ``torchrun`` each rank reads its own share of the
    rows and every rank gets the sums over all cells (a collective: call it on every rank).
    """
    n_obs, n_genes = X.shape
    own = _own_rows(n_obs, across_ranks)
    facts = ValueFacts()
    detected = np.zeros(n_genes)
    log2_sum = np.zeros(n_genes) if log2 else None
    total = np.zeros(n_genes) if moments else None
    squares = np.zeros(n_genes) if moments else None
    library = np.zeros(own.stop - own.start)
    for rows in _slices(own, _pass_rows(X, n_genes)):
        block = _read(X, rows)
        facts += ValueFacts.of(block)
        library[rows.start - own.start : rows.stop - own.start] = _row_sums(block)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            if sparse.issparse(block):
                block = sparse.csr_matrix(block, dtype=np.float64)
                positive = block.data > 0
                cols = block.indices[positive]
                detected += np.bincount(cols, minlength=n_genes)
                if log2:
                    log2_sum += np.bincount(cols, weights=np.log2(block.data[positive]), minlength=n_genes)
                if moments:
                    total += np.asarray(block.sum(0)).ravel()
                    squares += np.asarray(block.multiply(block).sum(0)).ravel()
            else:
                block = np.asarray(block, dtype=np.float64)
                pos = block > 0
                detected += pos.sum(0)
                if log2:
                    log2_sum += np.where(pos, np.log2(np.where(pos, block, 1.0)), 0.0).sum(0)
                if moments:
                    total += block.sum(0)
                    squares += (block * block).sum(0)
    if across_ranks and world().distributed:
        gene_sums = [a for a in (detected, log2_sum, total, squares) if a is not None]
        gene_sums = iter(_add_over_ranks(*gene_sums))
        detected = next(gene_sums)
        log2_sum, total, squares = (None if a is None else next(gene_sums) for a in (log2_sum, total, squares))
        library = all_gather_rows(library)
        mine = np.array([[facts.n_nonfinite, facts.n_noninteger, facts.minimum]], dtype=np.float64)
        every = all_gather_rows(mine)
        facts = ValueFacts(int(every[:, 0].sum()), int(every[:, 1].sum()), float(every[:, 2].min()))
    return CountScan(n_obs, facts, detected, library, log2_sum, total, squares)


def select_genes_by_zero_rate(X, n: int, *, atleast: int = 10, decay: float = 1.5, yoffset: float = 0.02) -> np.ndarray:
    """Indices of the ``n`` genes (approximately) whose zero rate is highest for their mean expression.

    Kobak & Berens (2019), as scDeepCluster's ``geneSelection``: a gene is kept when its zero rate exceeds
    exp(−decay (mean log2 non-zero expression − x₀)) + yoffset; x₀ is found by bisection so that about ``n``
    genes pass. Genes detected in fewer than ``atleast`` cells are never kept. ``X``: the counts (read in row
    slices) or their :func:`scan` with ``log2``.
    """
    counts = X if isinstance(X, CountScan) else scan(X, log2=True, across_ranks=False)
    n_cells, n_genes = counts.n_obs, len(counts.detected)
    detected, log_sum = counts.detected, counts.log2_sum
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


def select_genes_by_variance(X, n: int) -> np.ndarray:
    """Indices (sorted) of the ``n`` genes with the largest variance of the values as given.

    ``X``: the matrix (read in row slices) or its :func:`scan` with ``moments``.
    """
    values = X if isinstance(X, CountScan) else scan(X, moments=True, across_ranks=False)
    n_cells = values.n_obs
    var = values.squares / n_cells - (values.total / n_cells) ** 2
    return np.sort(np.argsort(-var, kind="stable")[:n])


def infer_rows(n_genes: int) -> int:
    """Rows encoded at once: :data:`INFER_BATCH`, fewer where rows × ``n_genes`` would exceed :data:`INFER_ELEMENTS`."""
    return int(max(1, min(INFER_BATCH, INFER_ELEMENTS // max(int(n_genes), 1))))


class MiniBatch(NamedTuple):
    """What the network and the loss need of some cells (see :meth:`CountData.batch`)."""

    xin: torch.Tensor  #: encoder input: z-scored log1p of the normalised counts (or z-scored data), rows × genes
    counts: torch.Tensor | None  #: raw counts (or the data as given), dense rows × genes; None if not asked for
    size_factors: torch.Tensor  #: per row (ones when the data is not normalised)
    onehot: torch.Tensor | None  #: batch one-hot (batch-aware model), else None
    nonzero: torch.Tensor | None  #: flat indices of the non-zero counts when known (sparse input), else None


#: how the centred log-normalised counts are scaled for an encoder (:meth:`CountData.fit`)
SCALES = ("gene", "global", "floor")


def check_scale(scale: str) -> str:
    """``scale`` if it is one of :data:`SCALES`, else a ValueError naming the argument."""
    if scale not in SCALES:
        raise ValueError(f"`scale` must be one of {', '.join(map(repr, SCALES))}, got {scale!r}.")
    return scale


@dataclass
class CountData:
    """Raw counts of the genes used, with what the network needs per mini-batch.

    ``X`` stays as given (CSR or dense, in memory or on disk); rows are densified one batch at a time. The input
    of the encoder is the z-score (with the training cells' gene means and standard deviations) of log1p of the counts
    normalised to ``target_sum``; the likelihood is evaluated on the raw counts with size factors
    library size / ``target_sum``. With ``normalize=False`` (data already transformed, e.g. log-normalised,
    for a Gaussian/MSE loss) the input is the z-score of the values as given and the size factors are 1.
    ``gene_mean``/``gene_std`` are per gene, or per batch × gene (:meth:`fit` with ``standardize_per_batch``):
    then every cell is standardised with its own batch's statistics.
    """

    X: Any  # CSR or dense in memory, or a matrix on disk read in row slices (a backed .h5ad's X)
    genes: np.ndarray  # column indices of X that the model uses
    size_factors: np.ndarray  # float32, per cell
    target_sum: float
    gene_mean: np.ndarray
    gene_std: np.ndarray
    batch_codes: np.ndarray | None = None  # int, per cell
    n_batches: int = 0
    normalize: bool = True  # log1p of counts normalised to target_sum (else the values as given)

    @property
    def n_obs(self) -> int:
        return self.X.shape[0]

    def batch(self, rows, device: torch.device, *, counts: bool = True) -> MiniBatch:
        """Encoder input, raw counts, size factors, batch one-hot (and, from sparse counts, non-zeros) of ``rows``.

        From a sparse matrix only the non-zero counts are transformed (log1p of zero is zero, so a zero's
        input is −mean / std) and sent to the device, and their flat indices come for free from the CSR
        structure; dense counts are densified rows as they are. Where more than :data:`DENSE_SHARE` of a sparse
        mini-batch's entries are non-zero, its rows are densified and transformed as dense rows (the same values
        to the bit), the flat indices still taken from the CSR structure. ``counts=False`` (encoding only): a
        sparse matrix's dense counts are not formed, and ``counts`` is None.
        """
        sf = torch.from_numpy(self.size_factors[rows]).to(device)
        codes = None
        if self.n_batches:
            codes = torch.from_numpy(np.asarray(self.batch_codes[rows], dtype=np.int64)).to(device)
        mean = torch.as_tensor(self.gene_mean, device=device)
        std = torch.as_tensor(self.gene_std, device=device)
        if mean.ndim == 2:  # statistics per batch: every row is standardised with those of its batch
            mean, std = mean.index_select(0, codes), std.index_select(0, codes)
        nonzero, densify = None, False
        block = self.X[rows]  # a matrix on disk is read in slices only (training reads through take)
        if sparse.issparse(block):
            # canonical: the scatter below would not add up duplicate entries
            block = _canonical_csr(block)
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
            nonzero = torch.from_numpy(row_of * n_genes + col_of).to(device)
            densify = len(values) > DENSE_SHARE * n_rows * n_genes
            if densify:  # transformed below as dense rows; float32 first, so the dense copy is never wider
                block = block.astype(np.float32, copy=False).toarray()
        if sparse.issparse(block):
            values_t = torch.from_numpy(values).to(device)
            row_t = torch.from_numpy(row_of).to(device)
            col_t = torch.from_numpy(col_of).to(device)
            raw = None
            if counts:
                raw = torch.zeros(n_rows, n_genes, device=device)
                raw.view(-1).index_copy_(0, nonzero, values_t)
            xin = mean.div(std).neg_().expand(n_rows, n_genes).clone()
            if self.normalize:
                values_t = torch.log1p(values_t * sf.reciprocal().index_select(0, row_t))
            if mean.ndim == 2:
                z_values = (values_t - mean.reshape(-1)[nonzero]) / std.reshape(-1)[nonzero]
            else:
                z_values = (values_t - mean.index_select(0, col_t)) / std.index_select(0, col_t)
            xin.view(-1).index_copy_(0, nonzero, z_values)
        else:
            block = np.asarray(block, dtype=np.float32)
            raw = torch.from_numpy(block if len(self.genes) == block.shape[1] else block[:, self.genes])
            raw = raw.to(device, non_blocking=True)
            xin = torch.log1p(raw * (1.0 / sf)[:, None]) if self.normalize else raw.clone()
            xin.sub_(mean).div_(std)
            if densify and not counts:
                raw = None
        onehot = None
        if self.n_batches:
            onehot = F.one_hot(codes, self.n_batches).to(torch.float32)
        return MiniBatch(xin, raw, sf, onehot, nonzero)

    @classmethod
    def fit(
        cls,
        X,
        genes: np.ndarray,
        batch_codes: np.ndarray | None = None,
        n_batches: int = 0,
        *,
        normalize: bool = True,
        scale: str = "gene",
        standardize_per_batch: bool = False,
        library: np.ndarray | None = None,
        across_ranks: bool = True,
    ) -> CountData:
        """Size factors (library / median library) and gene statistics of the normalised log counts.

        With ``normalize=False``, the gene statistics of the values as given, and size factors 1. ``scale``:
        ``"gene"`` divides every centred gene by its own standard deviation (z-score; scDeepCluster's input);
        ``"global"`` divides every gene by one number, the root mean gene variance, so that the input has unit
        variance per gene on average while genes keep their relative variances (PCA's weighting); ``"floor"``
        divides every gene by its standard deviation or by the root mean gene variance, whichever is larger:
        genes more variable than the typical gene are z-scored, the less variable ones are not scaled up (so a
        gene seen in a handful of cells keeps its small weight). With
        ``standardize_per_batch`` (and batches), the gene means and standard deviations are those of each batch
        (``n_batches`` × genes; with ``"global"`` one number per batch), and every cell's input is standardised
        with its own batch's.

        ``X`` is read in row slices (:func:`_pass_rows`): the library sizes over ``genes`` (unless given
        as ``library``), then the statistics. With ``across_ranks``, under ``torchrun`` each rank reads its own
        share of the rows and the sums are added up across ranks (a collective: call it on every rank).
        """
        check_scale(scale)
        X = _canonical_csr(X)
        genes = np.asarray(genes, dtype=np.int64)
        if normalize:
            lib = library_sizes(X, genes, across_ranks=across_ranks) if library is None else np.asarray(library)
            target = float(np.median(lib))
        else:
            lib, target = np.ones(X.shape[0]), 1.0
        per_batch = bool(standardize_per_batch and n_batches)
        n_groups = n_batches if per_batch else 1
        s1 = np.zeros((n_groups, len(genes)))
        s2 = np.zeros((n_groups, len(genes)))
        for rows in _slices(_own_rows(X.shape[0], across_ranks), _pass_rows(X, len(genes))):
            block = _read(X, rows, genes)
            factor = target / lib[rows]
            if sparse.issparse(block):
                if normalize:
                    block = sparse.csr_matrix(block.multiply(factor[:, None]), dtype=np.float64)
                    block.data = np.log1p(block.data)
                else:
                    block = sparse.csr_matrix(block, dtype=np.float64)
                squares = block.multiply(block)
            else:
                block = np.asarray(block, dtype=np.float64)
                if normalize:
                    block = np.log1p(block * factor[:, None])
                squares = block * block
            if per_batch:
                codes = np.asarray(batch_codes[rows], dtype=np.int64)
                groups = sparse.csr_matrix(
                    (np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(n_groups, len(codes))
                )
                s1 += _dense(groups @ block)
                s2 += _dense(groups @ squares)
            else:
                s1[0] += np.asarray(block.sum(0)).ravel()
                s2[0] += np.asarray(squares.sum(0)).ravel()
        if across_ranks:
            s1, s2 = _add_over_ranks(s1, s2)
        n = np.bincount(batch_codes, minlength=n_groups)[:, None] if per_batch else np.array([[X.shape[0]]])
        mean = s1 / np.maximum(n, 1)
        var = np.maximum(s2 - n * mean**2, 0.0) / np.maximum(n - 1, 1)  # ddof = 1, as scanpy's scale
        std = np.sqrt(var)
        typical = np.sqrt(var.mean(1, keepdims=True))  # per batch (or overall): the root mean gene variance
        if scale == "global":
            std = np.broadcast_to(typical, var.shape).copy()
        elif scale == "floor":  # no gene scaled up beyond the typical gene's variance
            std = np.maximum(std, typical)
        std[std == 0] = 1.0
        if not per_batch:
            mean, std = mean[0], std[0]
        return cls(
            X=X,
            genes=genes,
            size_factors=(lib / target).astype(np.float32),
            target_sum=target,
            gene_mean=mean.astype(np.float32),
            gene_std=std.astype(np.float32),
            batch_codes=batch_codes,
            n_batches=n_batches,
            normalize=normalize,
        )

    def like(self, X, batch_codes: np.ndarray | None = None) -> CountData:
        """New cells normalised with this data's target sum and gene statistics (for prediction; read in row slices)."""
        X = _canonical_csr(X)
        if self.normalize:
            size_factors = (library_sizes(X, self.genes) / self.target_sum).astype(np.float32)
        else:
            size_factors = np.ones(X.shape[0], dtype=np.float32)
        return CountData(
            X=X,
            genes=self.genes,
            size_factors=size_factors,
            target_sum=self.target_sum,
            gene_mean=self.gene_mean,
            gene_std=self.gene_std,
            batch_codes=batch_codes,
            n_batches=self.n_batches,
            normalize=self.normalize,
        )

    def take(self, rows: np.ndarray, span: int) -> CountData:
        """The cells ``rows``, in this order, read into memory: the genes used only (``genes`` becomes 0 … G − 1).

        ``X`` is read in contiguous slices, one per run of ascending rows within an aligned window of ``span``
        rows, so that no read covers more than ``span`` rows; the cells' size factors and batches come along. A
        dense array already in memory is not copied: the result indexes its rows where they are.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if isinstance(self.X, np.ndarray):
            X = _DenseRows(self.X, rows, self.genes)
        else:
            X = _read_rows(self.X, rows, self.genes, span)
        return CountData(
            X=X,
            genes=np.arange(len(self.genes)),
            size_factors=self.size_factors[rows],
            target_sum=self.target_sum,
            gene_mean=self.gene_mean,
            gene_std=self.gene_std,
            batch_codes=None if self.batch_codes is None else np.asarray(self.batch_codes)[rows],
            n_batches=self.n_batches,
            normalize=self.normalize,
        )


def _read_rows(X: Any, rows: np.ndarray, genes: np.ndarray, span: int) -> np.ndarray | sparse.csr_matrix:
    """Rows ``rows`` (in this order) and columns ``genes`` of ``X``, read in contiguous slices of at most ``span``."""
    parts = []
    if len(rows):
        cuts = np.flatnonzero((np.diff(rows) <= 0) | (np.diff(rows // span) != 0)) + 1
        for run in np.split(rows, cuts):
            first = int(run[0])
            block = _read(X, slice(first, int(run[-1]) + 1), genes)
            parts.append(block if len(run) == block.shape[0] else block[run - first])
    if not parts:
        return _read(X, slice(0, 0), genes)
    if sparse.issparse(parts[0]):
        return sparse.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
    return np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])


class _DenseRows:
    """Rows ``rows`` and columns ``genes`` of an in-memory dense matrix, indexed without copying them first.

    What :meth:`CountData.take` gives for a dense array in memory: indexing returns the selected rows (a copy of
    those only), as the read would have held them.
    """

    def __init__(self, base: np.ndarray, rows: np.ndarray, genes: np.ndarray) -> None:
        self.base, self.rows = base, rows
        self.genes = None if len(genes) == base.shape[1] and np.array_equal(genes, np.arange(len(genes))) else genes
        self.shape = (len(rows), len(genes))

    def __getitem__(self, index) -> np.ndarray:
        block = self.base[self.rows[index]]
        return block if self.genes is None else block[:, self.genes]


def training_blocks(rows: np.ndarray, batch_size: int) -> RowBlocks:
    """The row blocks a trainer draws ``batch_size``-cell mini-batches of ``rows`` from.

    :data:`READ_BLOCKS` blocks of :data:`BLOCK_ROWS` rows per read, more when one mini-batch needs more rows.
    """
    return RowBlocks(rows, BLOCK_ROWS, max(READ_BLOCKS, -(-batch_size // BLOCK_ROWS)))


def epoch_batches(
    data: CountData,
    blocks: RowBlocks,
    batch_size: int,
    generator: torch.Generator,
    row_generator: torch.Generator,
    device: torch.device,
) -> Iterator[tuple[np.ndarray, MiniBatch]]:
    """One epoch's mini-batches on this rank: the cells' rows of ``data.X`` and what the network needs of them.

    The blocks come as :meth:`RowBlocks.epoch` orders them; each read is taken into memory once
    (:meth:`CountData.take`) and cut into the mini-batches.
    """
    for read_rows, batches in blocks.epoch(batch_size, generator, row_generator):
        chunk = data.take(read_rows, BLOCK_ROWS)
        for idx in batches:
            yield read_rows[idx], chunk.batch(idx, device)


class RowBlocks:
    """Rows a trainer draws from (ascending), grouped into the aligned blocks of ``block_rows`` rows that hold them.

    Every epoch (:meth:`epoch`) the blocks are put in one order, drawn alike on every rank; each rank takes its
    share of that order (:func:`~scembed._engine.distributed.rank_share`: positions ``r, r + W, …``, disjoint
    between ranks) and reads its blocks ``per_read`` at a time; the rows of one read are shuffled and cut into
    mini-batches. In memory at a time: one read, at most ``per_read · block_rows`` rows. One process with every
    block in one read: the mini-batches of one permutation of all rows (no order of the blocks is drawn: the
    shuffle within the read would undo it).
    """

    def __init__(self, rows: np.ndarray, block_rows: int, per_read: int) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)
        self.block_rows, self.per_read = int(block_rows), int(per_read)
        ids = self.rows // self.block_rows
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, np.int64)
        self.bounds = np.r_[starts, len(self.rows)]  # block b holds rows[bounds[b] : bounds[b + 1]]
        self.n_blocks = len(starts)

    def _reads(self, order: np.ndarray, w: World) -> list[np.ndarray]:
        """The reads of rank ``w``: its share of ``order``, ``per_read`` blocks at a time."""
        mine = order[rank_share(self.n_blocks, w)]
        return [mine[i : i + self.per_read] for i in range(0, len(mine), self.per_read)]

    def _n_batches(self, reads: list[np.ndarray], batch_size: int) -> int:
        sizes = np.diff(self.bounds)
        return sum(-(-int(sizes[read].sum()) // batch_size) for read in reads)

    def epoch(
        self, batch_size: int, generator: torch.Generator, row_generator: torch.Generator
    ) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        """The reads of one epoch on this rank: ``(rows, batches)``, rows of ``X`` and mini-batches (positions).

        ``generator`` (the same on every rank) orders the blocks; ``row_generator`` shuffles the rows of each read.
        Every rank makes the same number of steps, the smallest over the ranks (a rank with more drops its last
        batches for this epoch), so that the ranks step in lock-step.
        """
        if not self.n_blocks:
            return
        w = world()
        shuffle = self.n_blocks > 1 and (w.distributed or self.n_blocks > self.per_read)
        order = torch.randperm(self.n_blocks, generator=generator).numpy() if shuffle else np.arange(self.n_blocks)
        reads = self._reads(order, w)
        n_steps = self._n_batches(reads, batch_size)
        if w.distributed:
            n_steps = min(
                self._n_batches(self._reads(order, World(rank=r, size=w.size)), batch_size) for r in range(w.size)
            )
        for read in reads:
            if n_steps <= 0:
                return
            rows = np.concatenate([self.rows[self.bounds[b] : self.bounds[b + 1]] for b in read])
            perm = torch.randperm(len(rows), generator=row_generator).numpy()
            batches = [perm[s : s + batch_size] for s in range(0, len(perm), batch_size)][:n_steps]
            n_steps -= len(batches)
            yield rows, batches
