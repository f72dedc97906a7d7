"""Count data for the autoencoders: size factors, z-scored log input and mini-batches read from row blocks.

:class:`CountData` keeps the counts as given (canonical CSR or dense) and turns the rows of one mini-batch at a
time into what the network and the loss need (:class:`MiniBatch`), so the whole matrix is never densified.
Gene selection (:func:`select_genes_by_zero_rate`, :func:`select_genes_by_variance`) and library sizes read
the matrix in row blocks too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse

#: rows handled at once outside training (statistics, encoding, target distribution)
INFER_BATCH = 8192


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


def select_genes_by_variance(X, n: int) -> np.ndarray:
    """Indices (sorted) of the ``n`` genes with the largest variance of the values as given (row blocks)."""
    n_cells, n_genes = X.shape
    s1, s2 = np.zeros(n_genes), np.zeros(n_genes)
    for start in range(0, n_cells, INFER_BATCH):
        block = X[start : start + INFER_BATCH]
        if sparse.issparse(block):
            block = sparse.csr_matrix(block, dtype=np.float64)
            s1 += np.asarray(block.sum(0)).ravel()
            s2 += np.asarray(block.multiply(block).sum(0)).ravel()
        else:
            block = np.asarray(block, dtype=np.float64)
            s1 += block.sum(0)
            s2 += (block * block).sum(0)
    var = s2 / n_cells - (s1 / n_cells) ** 2
    return np.sort(np.argsort(-var, kind="stable")[:n])


class MiniBatch(NamedTuple):
    """What the network and the loss need of some cells (see :meth:`CountData.batch`)."""

    xin: torch.Tensor  #: encoder input: z-scored log1p of the normalised counts (or z-scored data), rows × genes
    counts: torch.Tensor  #: raw counts (or the data as given), dense rows × genes
    size_factors: torch.Tensor  #: per row (ones when the data is not normalised)
    onehot: torch.Tensor | None  #: batch one-hot (batch-aware model), else None
    nonzero: torch.Tensor | None  #: flat indices of the non-zero counts when known (sparse input), else None


@dataclass
class CountData:
    """Raw counts of the genes used, with what the network needs per mini-batch.

    ``X`` stays as given (CSR or dense); rows are densified one batch at a time. The input of the encoder is
    the z-score (with the training cells' gene means and standard deviations) of log1p of the counts
    normalised to ``target_sum``; the likelihood is evaluated on the raw counts with size factors
    library size / ``target_sum``. With ``normalize=False`` (data already transformed, e.g. log-normalised,
    for a Gaussian/MSE loss) the input is the z-score of the values as given and the size factors are 1.
    """

    X: np.ndarray | sparse.csr_matrix
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
            if self.normalize:
                values_t = torch.log1p(values_t * sf.reciprocal().index_select(0, row_t))
            z_values = (values_t - mean.index_select(0, col_t)) / std.index_select(0, col_t)
            xin.view(-1).index_copy_(0, nonzero, z_values)
        else:
            block = _rows(self.X, rows)
            raw = torch.from_numpy(block if len(self.genes) == block.shape[1] else block[:, self.genes])
            raw = raw.to(device, non_blocking=True)
            xin = torch.log1p(raw * (1.0 / sf)[:, None]) if self.normalize else raw.clone()
            xin.sub_(mean).div_(std)
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
        *,
        normalize: bool = True,
    ) -> CountData:
        """Size factors (library / median library) and gene statistics of the normalised log counts.

        With ``normalize=False``, the gene statistics of the values as given, and size factors 1.
        """
        X = _canonical_csr(X)
        sub = X if len(genes) == X.shape[1] else X[:, genes]
        if normalize:
            lib = library_sizes(sub)
            target = float(np.median(lib))
        else:
            lib, target = np.ones(X.shape[0]), 1.0
        s1 = np.zeros(len(genes))
        s2 = np.zeros(len(genes))
        for start in range(0, X.shape[0], INFER_BATCH):
            block = sub[start : start + INFER_BATCH]
            scale = target / lib[start : start + INFER_BATCH]
            if sparse.issparse(block):
                if normalize:
                    block = sparse.csr_matrix(block.multiply(scale[:, None]), dtype=np.float64)
                    block.data = np.log1p(block.data)
                else:
                    block = sparse.csr_matrix(block, dtype=np.float64)
                s1 += np.asarray(block.sum(0)).ravel()
                s2 += np.asarray(block.multiply(block).sum(0)).ravel()
            else:
                block = np.asarray(block, dtype=np.float64)
                if normalize:
                    block = np.log1p(block * scale[:, None])
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
            normalize=normalize,
        )

    def like(self, X, batch_codes: np.ndarray | None = None) -> CountData:
        """New cells normalised with this data's target sum and gene statistics (for prediction)."""
        X = _canonical_csr(X)
        if self.normalize:
            sub = X if len(self.genes) == X.shape[1] else X[:, self.genes]
            size_factors = (library_sizes(sub) / self.target_sum).astype(np.float32)
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
