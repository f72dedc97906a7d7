from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._utils import check_in_range, check_positive_int, check_random_state


def simulate(
    n_cells: int = 2000,
    n_genes: int = 1000,
    *,
    n_celltypes: int = 5,
    n_batches: int = 1,
    de_fraction: float = 0.1,
    de_scale: float = 1.0,
    batch_scale: float = 0.5,
    library_size: float = 2000.0,
    library_sd: float = 0.4,
    dispersion: float = 0.5,
    dropout: float = 0.0,
    chunk_size: int = 50_000,
    random_state: int | None = 0,
) -> AnnData:
    """Synthetic UMI counts with cell types, varied library sizes and optional batch effects.

    Counts are negative binomial (a gamma–Poisson mixture) around gene means that follow a log-normal base
    profile; each cell type up-regulates a random ``de_fraction`` of genes by log-normal fold changes; each batch
    multiplies every gene by a log-normal factor (``batch_scale`` is its log-sd); ``dropout`` zeroes counts at
    random. Cells are generated in chunks, so 1.3 million cells fit in a few GB.

    Parameters
    ----------
    n_cells
        Number of cells (rows).
    n_genes
        Number of genes (columns).
    n_celltypes
        Number of cell types (with unequal abundances).
    n_batches
        Number of batches; cells are assigned to batches at random.
    de_fraction
        Share of genes up-regulated in each cell type.
    de_scale
        Log-sd of the fold changes of up-regulated genes (their log-mean is ``de_scale``).
    batch_scale
        Log-sd of the per-gene multiplicative batch effect (0: no batch effect).
    library_size
        Median total counts per cell.
    library_sd
        Log-sd of the library sizes.
    dispersion
        Negative-binomial dispersion φ (variance = μ + φ μ²).
    dropout
        Probability that a count is set to zero on top of the negative-binomial zeros.
    chunk_size
        Cells generated at a time.
    random_state
        Seed.

    Returns
    -------
    AnnData with raw counts in ``X`` (CSR, float32), ``obs["celltype"]`` and ``obs["batch"]`` (categorical),
    ``obs["library_size"]`` and ``uns["simulation"]`` (the parameters).
    """
    n_cells = check_positive_int(n_cells, "n_cells")
    n_genes = check_positive_int(n_genes, "n_genes")
    n_celltypes = check_positive_int(n_celltypes, "n_celltypes")
    n_batches = check_positive_int(n_batches, "n_batches")
    check_in_range(de_fraction, "de_fraction", low=0, high=1)
    check_in_range(dropout, "dropout", low=0, high=1, high_inclusive=False)
    check_in_range(dispersion, "dispersion", low=0, low_inclusive=False)
    check_in_range(library_size, "library_size", low=0, low_inclusive=False)
    check_in_range(de_scale, "de_scale", low=0)
    check_in_range(batch_scale, "batch_scale", low=0)
    check_in_range(library_sd, "library_sd", low=0)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    rng = check_random_state(random_state)

    base = rng.lognormal(0.0, 1.0, n_genes)
    programs = np.ones((n_celltypes, n_genes))
    for t in range(n_celltypes):
        de = rng.random(n_genes) < de_fraction
        programs[t, de] = rng.lognormal(de_scale, de_scale / 2 + 1e-12, de.sum())
    batch_factors = (
        rng.lognormal(0.0, batch_scale, (n_batches, n_genes)) if batch_scale > 0 else np.ones((n_batches, n_genes))
    )
    type_weights = rng.dirichlet(np.full(n_celltypes, 5.0))
    celltype = rng.choice(n_celltypes, size=n_cells, p=type_weights)
    batch = rng.integers(n_batches, size=n_cells)
    libs = library_size * rng.lognormal(0.0, library_sd, n_cells)

    profiles = programs[:, None, :] * batch_factors[None, :, :] * base  # type × batch × gene
    profiles /= profiles.sum(-1, keepdims=True)
    shape = 1.0 / dispersion
    blocks = []
    for start in range(0, n_cells, chunk_size):
        stop = min(start + chunk_size, n_cells)
        mu = profiles[celltype[start:stop], batch[start:stop]] * libs[start:stop, None]
        lam = rng.gamma(shape, mu / shape).astype(np.float32)
        counts = rng.poisson(lam).astype(np.float32)
        if dropout > 0:
            counts[rng.random(counts.shape, dtype=np.float32) < dropout] = 0
        blocks.append(sparse.csr_matrix(counts))
        del mu, lam, counts
    X = sparse.vstack(blocks, format="csr", dtype=np.float32)

    obs = pd.DataFrame(
        {
            "celltype": pd.Categorical(
                [f"type{t}" for t in celltype], categories=[f"type{t}" for t in range(n_celltypes)]
            ),
            "batch": pd.Categorical([f"batch{b}" for b in batch], categories=[f"batch{b}" for b in range(n_batches)]),
            "library_size": np.asarray(X.sum(1)).ravel(),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)])
    params = dict(
        n_celltypes=n_celltypes,
        n_batches=n_batches,
        de_fraction=de_fraction,
        de_scale=de_scale,
        batch_scale=batch_scale,
        library_size=library_size,
        library_sd=library_sd,
        dispersion=dispersion,
        dropout=dropout,
        random_state=-1 if random_state is None else int(random_state),
    )
    return AnnData(X=X, obs=obs, var=var, uns={"simulation": params})


def simulate_embedding(
    n_cells: int = 10_000,
    n_dims: int = 50,
    *,
    n_celltypes: int = 10,
    n_lineages: int = 3,
    spread: float = 1.0,
    random_state: int | None = 0,
) -> AnnData:
    """A dense, low-dimensional stand-in for "50 PCs" of a large data set, for embedding scale tests.

    Cell types are Gaussian clusters whose centres sit around ``n_lineages`` lineage centres, so the data has
    both local (type) and global (lineage) structure. The PCs' variance decreases with the component index.

    Parameters
    ----------
    n_cells
        Number of cells.
    n_dims
        Number of dimensions ("PCs").
    n_celltypes
        Number of cell types (Gaussian clusters, unequal abundances).
    n_lineages
        Number of lineages grouping the cell types (the global structure).
    spread
        Within-type standard deviation relative to the default.
    random_state
        Seed.

    Returns
    -------
    AnnData whose ``X`` and ``obsm["X_pca"]`` hold the same ``(n_cells, n_dims)`` float32 array, with
    ``obs["celltype"]`` and ``obs["lineage"]`` (categorical).
    """
    n_cells = check_positive_int(n_cells, "n_cells")
    n_dims = check_positive_int(n_dims, "n_dims")
    n_celltypes = check_positive_int(n_celltypes, "n_celltypes")
    n_lineages = check_positive_int(n_lineages, "n_lineages")
    check_in_range(spread, "spread", low=0)
    rng = check_random_state(random_state)
    scale = 1.0 / np.sqrt(np.arange(1, n_dims + 1))  # decaying variance per component, like PCs
    lineage_centres = rng.normal(0, 12.0, (n_lineages, n_dims)) * scale
    lineage_of_type = np.arange(n_celltypes) % n_lineages
    type_centres = lineage_centres[lineage_of_type] + rng.normal(0, 5.0, (n_celltypes, n_dims)) * scale
    celltype = rng.choice(n_celltypes, size=n_cells, p=rng.dirichlet(np.full(n_celltypes, 5.0)))
    X = np.empty((n_cells, n_dims), dtype=np.float32)
    for start in range(0, n_cells, 200_000):
        stop = min(start + 200_000, n_cells)
        noise = rng.standard_normal((stop - start, n_dims), dtype=np.float32) * (spread * scale).astype(np.float32)
        X[start:stop] = type_centres[celltype[start:stop]] + noise
    obs = pd.DataFrame(
        {
            "celltype": pd.Categorical(
                [f"type{t}" for t in celltype], categories=[f"type{t}" for t in range(n_celltypes)]
            ),
            "lineage": pd.Categorical(
                [f"lineage{lineage_of_type[t]}" for t in celltype],
                categories=[f"lineage{i}" for i in range(n_lineages)],
            ),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    adata = AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"PC{i + 1}" for i in range(n_dims)]))
    adata.obsm["X_pca"] = X
    return adata
