from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from anndata import AnnData
from scipy import sparse

from .._engine import autoencoder as engine
from .._engine.counts import (
    CountData,
    CountScan,
    check_scale,
    library_sizes,
    scan,
    select_genes_by_variance,
    select_genes_by_zero_rate,
)
from .._engine.distributed import check_inputs, world
from .._engine.models.autoencoder import AutoencoderModel
from .._engine.zinb import DISPERSIONS, LIKELIHOODS
from .._utils import (
    check_adata,
    check_bool,
    check_in_range,
    check_int_sequence,
    check_optional_bool,
    check_positive_int,
    copy_adata,
    get_logger,
    output_keys,
    resolve_device,
    seeded_torch,
    shared_docs,
)
from .._utils._model_data import batch_codes, counts_of, raise_for_expression
from .._utils._random import seed_int
from .._utils._validation import check_real_dtype

AUTOENCODER = "autoencoder"


def _check_settings(n_latent, likelihood, dispersion, hidden, noise, batch_size, lr, fraction, patience):
    n_latent = check_positive_int(n_latent, "n_latent")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"`likelihood` must be one of {LIKELIHOODS}, got {likelihood!r}.")
    if dispersion not in DISPERSIONS:
        raise ValueError(f"`dispersion` must be one of {DISPERSIONS}, got {dispersion!r}.")
    hidden = tuple(check_int_sequence(hidden, "hidden"))
    noise = check_in_range(noise, "noise", low=0)
    batch_size = check_positive_int(batch_size, "batch_size")
    lr = check_in_range(lr, "lr", low=0, low_inclusive=False)
    if fraction is not None:
        fraction = check_in_range(fraction, "validation_fraction", low=0, high=1, high_inclusive=False)
    patience = None if patience is None else check_positive_int(patience, "patience")
    return n_latent, hidden, noise, batch_size, lr, fraction, patience


def _genes(
    adata: AnnData, X: Any, where: str, *, counts: bool, n_top_genes: int | None
) -> tuple[Any, np.ndarray, np.ndarray | None]:
    """Check the values and pick the columns used, in one pass over ``X``; for counts, the library sizes too.

    ``X`` (``adata``'s matrix named ``where``, in memory or on disk) is read in row slices; under ``torchrun`` each
    rank reads its own rows, after the ranks' cell and gene names have been compared (each rank sees only its
    rows, so differing data would otherwise go unnoticed). The columns: the ``n_top_genes`` selected (zero rate for
    counts, variance otherwise) that have data. Returns ``X`` (sparse as CSR), the genes and, for counts, every
    cell's library size over them (another pass when genes were selected).
    """
    if sparse.issparse(X) and X.format != "csr":
        X = sparse.csr_matrix(X)
    if world().distributed:
        names = {f"adata.{k}": np.asarray(getattr(adata, k), dtype=str) for k in ("obs_names", "var_names")}
        check_inputs(names)  # fingerprints of the names (a pandas Index's repr would be shortened)
    values: CountScan = scan(X, log2=counts and n_top_genes is not None, moments=not counts and n_top_genes is not None)
    raise_for_expression(values.facts, where, counts=counts)
    genes = np.arange(X.shape[1])
    if n_top_genes is not None:
        genes = (
            select_genes_by_zero_rate(values, n_top_genes) if counts else select_genes_by_variance(values, n_top_genes)
        )
    genes = genes[values.detected[genes] > 0]  # genes without counts carry no information
    if len(genes) == 0:
        raise ValueError(f"{where} has no gene with {'counts' if counts else 'non-zero values'}.")
    if not counts:
        return X, genes, None
    # over every gene with counts, the library is the one of all genes; a selection needs its own pass
    lib = values.library if n_top_genes is None else library_sizes(X, genes, across_ranks=True)
    if (lib <= 0).any():
        raise ValueError(
            f"{where} has {int((lib <= 0).sum())} cell(s) without counts"
            f"{' in the selected genes' if n_top_genes is not None else ''}; remove them first, e.g. with "
            "sc.pp.filter_cells(adata, min_counts=1)."
        )
    return X, genes, lib


@shared_docs
def autoencoder(
    adata: AnnData,
    n_latent: int = 32,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    likelihood: str = "zinb",
    dispersion: str = "cell",
    hidden: Sequence[int] = (256, 64),
    batch_encoder: bool = False,
    noise: float = 1.0,
    scale: str = "global",
    max_epochs: int | None = None,
    batch_size: int = 256,
    lr: float = 1e-3,
    validation_fraction: float | None = None,
    patience: int | None = 20,
    n_top_genes: int | None = None,
    batch_penalty: float = 1.0,
    device: str = "auto",
    random_state: int | None = 0,
    show_progress: bool | None = None,
    key_added: str = AUTOENCODER,
    return_model: bool = False,
    copy: bool = False,
) -> AnnData | AutoencoderModel | tuple[AnnData, AutoencoderModel] | None:
    """Embed cells with a deep count autoencoder (ZINB, NB or MSE reconstruction loss).

    The denoising count autoencoder of DCA (Eraslan et al., Nature Communications 2019) and of scDeepCluster's
    pretraining (Tian et al., Nature Machine Intelligence 2019), on the same engine as
    :func:`scembed.tl.scdeepcluster`: the encoder reads the centred log1p of the counts normalised to the median
    library size, scaled as ``scale`` says, plus Gaussian noise ``noise`` in training; its linear bottleneck is
    the embedding. The decoder gives, for every gene, the mean (scaled by the cell's size factor), dispersion and
    dropout probability of a zero-inflated negative binomial (``"zinb"``), the mean and dispersion of a negative
    binomial (``"nb"``), or, for log-normalised data, the reconstruction under a squared error (``"mse"``, input
    centred and scaled likewise). With ``batch_key`` the encoder input is standardised within each batch (every
    gene centred and scaled with the statistics of the cell's batch) and the one-hot batch is given to the decoder
    only (and, with ``batch_encoder``, to the encoder too): a batch's shift and scale of each gene never reaches
    the encoder, so the embedding mixes the batches within a cell type, while the decoder, given the batch,
    reconstructs each batch's values (as :func:`scembed.tl.scdeepcluster`). What standardisation cannot remove (a
    protocol that changes the relations between genes) is aligned by ``batch_penalty``, a maximum mean
    discrepancy penalty between the batches' codes that acts only where a permutation test finds the batches
    more different than shuffled labels would be, between the cells that have mutual nearest neighbours in the
    other batch (a cell type present in one batch only is left apart). A non-linear alternative to PCA in front
    of neighbours, UMAP or any clustering; ``n_latent=2`` gives a direct 2-D view
    (``sc.pl.embedding(adata, basis="autoencoder")``).

    The matrix is read in contiguous row slices, never densified nor read whole: one pass checks the values and
    counts the genes (with ``n_top_genes``, a second sums the library sizes over the genes selected), one computes
    the input scaling, and training reads blocks of 512 rows, 16 at a time (more when ``batch_size`` needs
    more), in a new order every epoch, shuffling the rows of each read before cutting it into mini-batches. So
    ``X`` can stay on disk (see ``adata``), with the same result as in memory. A random ``validation_fraction``
    of the cells (at most 8,192) is held out, as in scvi-tools: training stops when their loss (with input noise
    as in training, one fixed draw) has not improved for ``patience`` epochs, and the weights of the best epoch
    are kept. The embedding of every cell, held-out ones included, comes from those weights.

    Parameters
    ----------
    adata
        Annotated data matrix: raw counts (non-negative integers) in ``X`` or ``layer`` for ``"zinb"`` and
        ``"nb"``; log-normalised expression (non-negative, finite) for ``"mse"``. ``X`` may be on disk
        (``anndata.read_h5ad(path, backed="r")``, CSR or dense): it is read in row slices only, so memory is set
        by reads of at most 8,192 rows × genes as stored (CSR stays sparse), dense mini-batches, dense encoding
        blocks of at most 2²⁴ entries (8,192 rows of up to 2,048 genes, fewer rows of more genes) and the network,
        and grows with the number of cells only by a few numbers per cell; the results go to the in-memory
        ``obsm`` and ``uns`` of ``adata``, and ``copy=True`` is refused (the copy would load ``X``).
    n_latent
        Dimension of the embedding.
    layer
        Layer to read instead of ``X``.
    batch_key
        Column of ``adata.obs`` with the batch of every cell (at least two batches); ``None`` for one batch.
    likelihood
        ``"zinb"`` (default), ``"nb"`` or ``"mse"``. ``"nb"`` has no dropout output, so the decoder has one of
        its G-wide layers fewer and an epoch takes less time (on a set of 15,073 genes with a batch key, less
        than scVI's), at about the same quality on average; but on the two 10x PBMC sets measured its latent
        space separated the cell types less well than the ZINB's, and with early stopping it trains for more
        epochs (``benchmarks/README.md``, ``tl.autoencoder``, "Likelihood: NB instead of ZINB").
    dispersion
        For ``"zinb"`` and ``"nb"``: ``"cell"`` (default), the dispersion is a decoder output for every cell and
        gene, as in DCA and scDeepCluster; ``"gene"``, one learnt dispersion per gene shared by all cells, as
        scVI's default, which spares the decoder one of its G-wide output layers: less time per epoch at about
        the same quality of the embedding, and with ``batch_key`` somewhat less batch mixing on the two-batch set
        measured (``benchmarks/README.md``, ``tl.autoencoder``, "One dispersion per gene"). Ignored for
        ``"mse"``.
    hidden
        Widths of the encoder's hidden layers; the decoder mirrors them.
    batch_encoder
        Also give the batch one-hot to the encoder (the original scDeepCluster's batch model did); it lets the
        encoder put the batch back into the embedding, so it is off by default.
    batch_penalty
        With ``batch_key``: weight of the batch-alignment penalty relative to the reconstruction loss, as in
        :func:`scembed.tl.scdeepcluster` (the squared MMD between the batches' codes, beyond the mean plus two
        standard deviations of its value under shuffled batch labels, times the step's loss, between the cells
        with mutual nearest neighbours in the other batch). The default 1 lets the two terms count alike; 0
        turns it off.
    noise
        Standard deviation of the Gaussian noise on the scaled encoder input in training. The default 1 is the
        root mean square spread of the genes under ``scale="global"``: genes more variable than the average stay
        above the corruption, the others are masked by it. scDeepCluster's 2.5 was set for z-scored genes (every
        gene of spread 1); on the globally scaled input it exceeds the spread of 97 % or more of the genes on
        every count set of the benchmarks (``python benchmarks/autoencoder.py --gene-spread``; 1 leaves 20–45 %
        above it), and the latent space then rests on the few most variable genes. Measured against 0.5 and 2.5
        in ``benchmarks/README.md`` (``tl.autoencoder``, "Input noise at the defaults").
    scale
        Scaling of the centred log-normalised encoder input. ``"global"`` (default): every gene divided by the
        same number, the root mean gene variance, so that genes keep their relative variances, as in PCA of
        log-normalised counts, while the input has unit variance per gene on average and ``noise`` keeps its
        size relative to a typical gene. ``"gene"``: every gene to unit variance (z-score, scDeepCluster's
        input, which :func:`scembed.tl.scdeepcluster` keeps). A z-score gives a gene seen in a handful of cells
        the weight of a broadly expressed marker: one count of a rare gene becomes a value of ten or more, so
        in sparse (low-UMI) data the encoder input is dominated by sampling noise of rare genes, and the
        latent space with it. ``"floor"``: every gene divided by its standard deviation or by the root mean gene
        variance, whichever is larger (genes more variable than the typical gene are z-scored, the others are
        not scaled up). Measurements: the ``tl.autoencoder`` section of ``benchmarks/README.md``.
    max_epochs
        Maximum training epochs. ``None``: about 20,000 gradient steps, clip(round(20,000 · ``batch_size`` /
        N_train), 5, 400) epochs. What a network learns depends on the number of parameter updates rather than
        of passes over the data: a fixed epoch count under-trains small data sets and spends hours on large
        ones (one epoch of a million cells is ~3,900 steps). 400 epochs bound small sets (early stopping ends
        them sooner), 5 make every cell of a large set seen several times. With a batch penalty acting, at most
        300 (see ``validation_fraction``).
    batch_size
        Cells per mini-batch (fewer cells than this: one batch of all).
    lr
        Learning rate of Adam (amsgrad).
    validation_fraction
        Share of cells held out for early stopping, in [0, 1), at most 8,192 cells (read into memory once); 0
        trains on every cell for ``max_epochs`` (``patience`` then watches the training loss). ``None``
        (default): 0.1, or, with a batch penalty acting (``batch_key`` and ``batch_penalty`` > 0), 0 with no
        early stop and at most 300 epochs: the held-out loss measures the reconstruction only, and the penalty
        goes on aligning the batches after it stops improving (stopped there, cellbench_3cl_2batches' protocols
        mixed less than Harmony's, see ``benchmarks/README.md``).
    patience
        Epochs without improvement of the validation loss before training stops; ``None``: never early.
    n_top_genes
        Use only about this many genes: for counts those with more zeros than their mean expression explains
        (Kobak & Berens 2019, as scDeepCluster's gene selection), for ``"mse"`` those of largest variance.
        ``None`` (default): every gene with data.
    {doc_trainer_tail}

    Returns
    -------
    With ``copy=False`` and ``return_model=False``, `None`; with ``copy=True`` the new `AnnData`; with
    ``return_model=True`` the model (or ``(adata, model)`` when ``copy=True`` too). Sets the following fields:

    `adata.obsm['X_autoencoder' | 'X_' + key_added]` : :class:`numpy.ndarray` (dtype `float32`)
        The embedding, cells × ``n_latent``.
    `adata.uns['autoencoder' | key_added]` : `dict`
        `params` (the call's settings; `max_epochs` resolved, `patience` and `n_top_genes` 0 for `None`);
        `history` with `loss` (training) and `validation_loss` per epoch (empty without held-out cells), and
        with ``batch_key`` and the penalty on, `batch_mmd` (the batch discrepancy statistic per epoch);
        `n_epochs` run, `best_epoch` (0-based; whose weights were kept) and `n_genes_used`.

    Examples
    --------
    >>> import scanpy as sc, scembed as se
    >>> adata = se.datasets.simulate(1000, 500, n_celltypes=4)
    >>> se.tl.autoencoder(adata, n_latent=2, max_epochs=20)
    >>> sc.pl.embedding(adata, basis="autoencoder", color="celltype")  # doctest: +SKIP
    """
    check_adata(adata, min_obs=2)
    check_bool(copy, "copy")
    if copy and adata.isbacked:
        raise ValueError(
            "`adata` is backed (read_h5ad(..., backed='r')) and `copy=True`: a copy would load adata.X into "
            "memory. Pass `copy=False` (the embedding is written to adata.obsm and adata.uns, in memory), or call "
            "adata = adata.to_memory() first."
        )
    check_bool(return_model, "return_model")
    check_bool(batch_encoder, "batch_encoder")
    check_optional_bool(show_progress, "show_progress")
    keys = output_keys(key_added)
    n_latent, hidden, noise, batch_size, lr, validation_fraction, patience = _check_settings(
        n_latent, likelihood, dispersion, hidden, noise, batch_size, lr, validation_fraction, patience
    )
    batch_penalty = check_in_range(batch_penalty, "batch_penalty", low=0)
    counts = likelihood != "mse"
    X, where = counts_of(adata, layer, backed=True)  # a backed X stays on disk: read in row slices
    check_real_dtype(getattr(X, "dtype", np.dtype(object)), where)  # X may be None
    if n_top_genes is not None:
        if check_positive_int(n_top_genes, "n_top_genes") > adata.n_vars:
            raise ValueError(f"`n_top_genes={n_top_genes}` is larger than the number of genes ({adata.n_vars}).")
    check_scale(scale)
    if max_epochs is not None:
        max_epochs = check_positive_int(max_epochs, "max_epochs", minimum=0)
    codes, categories = None, []
    if batch_key is not None:
        codes, categories = batch_codes(adata, batch_key)
        if len(categories) < 2:
            raise ValueError(f"adata.obs[{batch_key!r}] has one batch ({categories[0]!r}); pass `batch_key=None`.")
    dev, seed = resolve_device(device), seed_int(random_state)
    X, genes, lib = _genes(adata, X, where, counts=counts, n_top_genes=n_top_genes)

    penalised = len(categories) > 1 and batch_penalty > 0
    validation_fraction, patience = engine.default_holdout(validation_fraction, patience, penalised)
    train_rows, val_rows = engine.split_validation(adata.n_obs, validation_fraction, seed)
    if max_epochs is None:
        max_epochs = engine.default_max_epochs(len(train_rows), batch_size)
        if penalised and validation_fraction == 0:
            max_epochs = min(max_epochs, engine.PENALISED_EPOCHS)
    data = CountData.fit(
        X, genes, codes, len(categories), normalize=counts, scale=scale, standardize_per_batch=True, library=lib
    )
    get_logger().info(f"autoencoder ({likelihood}): {adata.n_obs} cells × {len(genes)} genes, {dev.type}")
    with seeded_torch(seed, dev) as noise_gen:
        net = engine.Autoencoder(
            len(genes), n_latent, hidden, len(categories), likelihood=likelihood, batch_encoder=batch_encoder,
            dispersion=dispersion,
        ).to(dev)  # fmt: skip
        history, n_run = engine.train_autoencoder(
            net, data, max_epochs=max_epochs, batch_size=batch_size, noise=noise, lr=lr, device=dev,
            generator=torch.Generator().manual_seed(seed), noise_generator=noise_gen, train_rows=train_rows,
            validation_rows=val_rows, patience=patience, validation_seed=seed, show_progress=show_progress,
            batch_penalty=batch_penalty,
        )  # fmt: skip
        z = engine.embed(net.eval(), data, dev)  # under torchrun: each rank encodes its own rows, then gathered
    record = _record(locals_=dict(
        n_latent=n_latent, layer=layer, batch_key=batch_key, likelihood=likelihood, dispersion=net.dispersion,
        hidden=hidden, batch_encoder=batch_encoder, noise=noise, scale=scale, max_epochs=max_epochs,
        batch_size=batch_size, lr=lr, validation_fraction=validation_fraction, patience=patience,
        n_top_genes=n_top_genes, batch_penalty=batch_penalty, random_state=seed,
    ), history=history, n_run=n_run, has_validation=bool(val_rows.size), n_genes=len(genes))  # fmt: skip
    adata = copy_adata(adata) if copy else adata
    adata.obsm[keys.obsm] = z
    adata.uns[keys.uns] = record
    if not return_model:
        return adata if copy else None
    model = AutoencoderModel(net, _model_metadata(record["params"], adata, layer, batch_key, categories, data, genes))
    return (adata, model) if copy else model


def _record(locals_: dict, history: dict, n_run: int, has_validation: bool, n_genes: int) -> dict:
    """``uns[key_added]``: the call's settings (h5ad-writable: None → 0/""), the declared history, epochs."""
    params = dict(locals_)
    params.update(
        layer=params["layer"] or "", batch_key=params["batch_key"] or "", hidden=list(params["hidden"]),
        batch_encoder=bool(params["batch_encoder"]), patience=params["patience"] or 0,
        n_top_genes=params["n_top_genes"] or 0,
    )  # fmt: skip
    watched = history.get("validation_loss") or history.get("loss") or [np.nan]
    return {
        "params": params,
        "history": {
            "loss": history.get("loss", []),
            "validation_loss": history.get("validation_loss", []),
            **({"batch_mmd": history["batch_mmd"]} if "batch_mmd" in history else {}),  # only when the penalty ran
        },
        "n_epochs": int(n_run),
        "best_epoch": int(np.argmin(watched)) if has_validation and n_run else int(n_run) - 1,
        "n_genes_used": n_genes,
    }


def _model_metadata(params: dict, adata: AnnData, layer, batch_key, categories, data: CountData, genes) -> dict:
    """What :class:`AutoencoderModel` needs to embed new cells (JSON-serialisable)."""
    return {
        **{k: params[k] for k in ("n_latent", "likelihood", "dispersion", "hidden", "batch_encoder")},
        "layer": layer, "batch_key": batch_key, "batch_categories": categories,
        "normalize": params["likelihood"] != "mse", "var_names": list(map(str, adata.var_names)),
        "genes": genes.tolist(), "target_sum": data.target_sum, "gene_mean": data.gene_mean.tolist(),
        "gene_std": data.gene_std.tolist(),
    }  # fmt: skip
