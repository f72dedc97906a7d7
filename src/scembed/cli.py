"""The ``scembed`` command line: embed an .h5ad end to end and write the annotated data and a PNG.

Examples
--------
``scembed embed`` runs on scanpy's bundled ``pbmc68k_reduced`` and writes ``pbmc68k_scembed_neuralee.h5ad`` and
``pbmc68k_scembed_neuralee.png``; ``scembed embed cells.h5ad --method ee --color celltype`` writes
``cells_scembed_ee.h5ad`` and ``cells_scembed_ee.png`` in the current folder.

Every option is checked before any work. A problem with the input or the options prints one line,
``scembed: error: <message>``, on stderr and exits with status 2; an unexpected failure exits with status 1
(``--debug`` shows its traceback).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy import sparse

from ._utils._io import write_atomic
from ._utils._rep import pca_on_the_fly

#: embedding methods the command knows, best first; the first one installed is the default
EMBEDDING_METHODS = ("neuralee", "ee")
#: the smallest perplexity the command runs with, and so (the perplexity being at most (cells - 1) / 3) the
#: fewest cells
MIN_PERPLEXITY = 1.0
MIN_CELLS = math.ceil(3 * MIN_PERPLEXITY + 1)
#: options that only one method takes (option dest -> method)
METHOD_OPTIONS = {"max_epochs": "neuralee", "batch_size": "neuralee", "maxiter": "ee"}
#: name of the bundled example, the stem of its default outputs
EXAMPLE_NAME = "pbmc68k"


class CLIError(Exception):
    """A problem with the command's input or options: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), raised as :class:`CLIError`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------------------------------------- argument types
def _positive_int(minimum: int = 1, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"≥ {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def _perplexity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < MIN_PERPLEXITY:
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ {MIN_PERPLEXITY:g}, got {text}")
    return value


# ---------------------------------------------------------------------------------------------- helpers
def _available_methods() -> list[str]:
    from . import tl

    return [m for m in EMBEDDING_METHODS if hasattr(tl, m)]


def _one_line(error: BaseException) -> str:
    """The message of an exception on one line (a KeyError's without the quotes ``str`` adds)."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def _looks_like_counts(X) -> bool:
    values = X.data if sparse.issparse(X) else np.asarray(X)
    sample = values.ravel()[:100_000]
    return sample.size > 0 and bool(np.all(sample >= 0)) and bool(np.all(np.mod(sample, 1) == 0))


def _n_not_finite(X) -> int:
    values = X.data if sparse.issparse(X) else np.asarray(X)
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise CLIError(f"holds {values.dtype} values, not real numbers")
    return 0 if np.issubdtype(values.dtype, np.integer) else int(values.size - np.isfinite(values).sum())


def effective_perplexity(perplexity: float, n_cells: int) -> float:
    """The perplexity the command uses: ``min(perplexity, (n_cells - 1) / 3)``, as openTSNE does.

    Each cell then has 3 · perplexity ≤ n_cells − 1 neighbours to calibrate its affinities on.
    """
    return min(float(perplexity), (n_cells - 1) / 3)


def _default_color(adata) -> str | None:
    for key in ("celltype", "cell_type", "bulk_labels", "louvain", "leiden", "batch"):
        if key in adata.obs:
            return key
    return next((k for k in adata.obs if adata.obs[k].dtype == "category"), None)


def _color_source(adata, color: str) -> bool | None:
    """``use_raw`` for plotting ``color``: None for an obs column, True for a gene of ``raw``, False for X's."""
    if color in adata.obs.columns:
        return None
    if adata.raw is not None and color in adata.raw.var_names:
        return True
    if color in adata.var_names:
        return False
    raise KeyError(color)


def _check_output(path: Path, flag: str, overwrite: bool) -> None:
    """Check that a file can be written at ``path``, or raise a :class:`CLIError` saying why not.

    Not a folder, not an existing file (unless ``overwrite``), and its folder exists and is writable, or is
    missing below a writable folder (it is then created).
    """
    if path.is_dir():
        raise CLIError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise CLIError(f"{path} already exists; pass --overwrite to replace it, or choose another {flag}")
    parent = path.absolute().parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"cannot write {flag} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"cannot write {flag} {path}: no permission to write in {existing}")
    if existing == parent:
        try:  # also catches read-only file systems, which os.access does not see when run as root
            with tempfile.TemporaryFile(dir=parent):
                pass
        except OSError as e:
            reason = e.strerror or _one_line(e)
            raise CLIError(f"cannot write {flag} {path}: cannot create a file in {parent} ({reason})") from None


def compute_pca(adata, *, n_pcs: int, random_state: int) -> str:
    """Give ``adata`` ``obsm['X_pca']`` unless it has one; return one line saying what was done.

    Raw counts are log-normalised first (10,000 per cell, log1p, on a copy: ``X`` is left as it is), as scanpy's
    tutorials do. This is the command's only preprocessing.
    """
    if "X_pca" in adata.obsm:
        return f"using obsm['X_pca'] ({np.shape(adata.obsm['X_pca'])[1]} columns)"
    import anndata as ad
    import scanpy as sc

    shell = ad.AnnData(X=adata.X.astype(np.float32))  # a copy, normalised in place below
    counts = _looks_like_counts(adata.X)
    if counts:
        sc.pp.normalize_total(shell, target_sum=1e4)
        sc.pp.log1p(shell)
    rep, _, loadings, _ = pca_on_the_fly(shell.X, n_pcs, random_state=random_state)
    n_comps = rep.shape[1]
    adata.obsm["X_pca"] = rep
    if not counts:  # the loadings project X itself only when X was not normalised first
        adata.varm["PCs"] = loadings
    pcs = f"{n_comps} PCs" + (
        "" if n_comps == n_pcs else f" (fewer than --n-pcs {n_pcs}: at most cells − 1, genes − 1)"
    )
    if counts:
        return f"raw counts detected: normalised to 10,000 per cell, log1p, {pcs}"
    return f"X is not raw counts, taken as normalised: {pcs}"


# ---------------------------------------------------------------------------------------------- the command
def _read_input(input: str | None):
    import anndata as ad
    import scanpy as sc

    if input is None:
        adata = sc.datasets.pbmc68k_reduced()
        print(f"no input given: using scanpy's bundled pbmc68k_reduced ({adata.n_obs} cells × {adata.n_vars} genes)")
        return adata, "pbmc68k_reduced"
    path = Path(input)
    if not path.exists():
        raise CLIError(f"input file {input} does not exist")
    if path.is_dir():
        raise CLIError(f"input {input} is a folder, not an .h5ad file")
    try:
        adata = ad.read_h5ad(path)
    except Exception as e:  # h5py, anndata and zarr raise many kinds for a file that is not a complete .h5ad
        raise CLIError(f"cannot read {input} as an .h5ad file (AnnData's format): {_one_line(e)}") from None
    print(f"read {input}: {adata.n_obs} cells × {adata.n_vars} genes")
    return adata, input


def _check_data(adata, name: str) -> None:
    """The data can be embedded: enough cells, and a finite representation (obsm['X_pca'] or X)."""
    if adata.n_obs < MIN_CELLS:
        raise CLIError(
            f"{name} has {adata.n_obs} cells; at least {MIN_CELLS} are needed (the perplexity, at most "
            f"(cells − 1) / 3, must be ≥ {MIN_PERPLEXITY:g})"
        )
    if "X_pca" in adata.obsm:
        where, X = f"obsm['X_pca'] of {name}", adata.obsm["X_pca"]
        if np.ndim(X) != 2 or np.shape(X)[1] == 0:
            raise CLIError(f"{where} must be a 2-D array with at least one column, got shape {np.shape(X)}")
    else:
        where, X = f"X of {name}", adata.X
        if adata.n_vars == 0:
            raise CLIError(f"{name} has 0 genes: nothing to embed")
        if X is None:
            raise CLIError(f"{name} has no X (and no obsm['X_pca']): nothing to embed")
        if adata.n_vars < 2:
            raise CLIError(f"{name} has 1 gene; a PCA needs at least 2 (or give obsm['X_pca'])")
    try:
        bad = _n_not_finite(X)
    except CLIError as e:
        raise CLIError(f"{where} {e}") from None
    if bad:
        raise CLIError(f"{where} holds {bad} NaN or infinite value(s); remove or impute them first")


def _check_options(args: argparse.Namespace) -> None:
    """Everything that can be checked without the data: method, its options, device, output paths."""
    from ._utils import resolve_device

    available = _available_methods()
    args.method = args.method or (available[0] if available else None)
    if args.method not in available:
        raise CLIError(f"method {args.method!r} is not available; choose one of {', '.join(available)}")
    if args.input is not None and not Path(args.input).exists():
        raise CLIError(f"input file {args.input} does not exist")
    for dest, method in METHOD_OPTIONS.items():
        if getattr(args, dest) is not None and args.method != method:
            raise CLIError(f"--{dest.replace('_', '-')} applies to --method {method} only, not {args.method}")
    try:
        resolve_device(args.device)
    except ValueError as e:
        raise CLIError(f"--device {args.device}: {_one_line(e)}") from None

    stem = EXAMPLE_NAME if args.input is None else Path(args.input).name.removesuffix(".h5ad")
    args.out = Path(args.out) if args.out else Path(f"{stem}_scembed_{args.method}.h5ad")
    _check_output(args.out, "--out", args.overwrite)
    if args.out.suffix.lower() != ".h5ad":
        raise CLIError(f"--out {args.out} must end with .h5ad")
    if args.no_plot or args.plot == "":
        args.plot = None
    else:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        args.plot = Path(args.plot) if args.plot else args.out.with_suffix(".png")
        _check_output(args.plot, "--plot", args.overwrite)
        formats = FigureCanvasAgg.get_supported_filetypes()
        if args.plot.suffix.lower().lstrip(".") not in formats:
            raise CLIError(f"--plot {args.plot} must end with one of {', '.join('.' + f for f in sorted(formats))}")


def embed(args: argparse.Namespace) -> Path:
    """Check every option and the data, then compute affinities and an embedding; write the .h5ad and the plot."""
    _check_options(args)
    adata, name = _read_input(args.input)
    _check_data(adata, name)
    use_raw = None
    if args.color is not None:
        try:
            use_raw = _color_source(adata, args.color)
        except KeyError:
            columns = ", ".join(map(str, adata.obs.columns[:10])) or "none"
            raise CLIError(
                f"--color {args.color!r} is neither an obs column nor a gene (var_names) of {name}; "
                f"obs columns: {columns}"
            ) from None
    perplexity = effective_perplexity(args.perplexity, adata.n_obs)

    # ---- the work
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    from . import pp, tl

    if perplexity < args.perplexity:
        print(
            f"perplexity lowered from {args.perplexity:g} to {perplexity:.3g} for {adata.n_obs} cells "
            "(at most (cells − 1) / 3)"
        )
    start = time.perf_counter()
    print(compute_pca(adata, n_pcs=args.n_pcs, random_state=args.random_state))
    common = {"perplexity": perplexity, "use_rep": "X_pca", "device": args.device, "random_state": args.random_state}
    pp.affinity(adata, **common)
    options = {dest: getattr(args, dest) for dest in METHOD_OPTIONS if getattr(args, dest) is not None}
    getattr(tl, args.method)(adata, **common, **options)
    elapsed = time.perf_counter() - start
    print(f"{args.method}: embedded {adata.n_obs} cells in {elapsed:.1f} s -> obsm['X_{args.method}']")

    write_atomic(args.out, adata.write_h5ad)
    print(f"wrote {args.out}")
    if args.plot is not None:
        color = args.color or _default_color(adata)
        ax = sc.pl.embedding(
            adata,
            basis=args.method,
            color=color,
            use_raw=use_raw,
            show=False,
            frameon=False,
            title=f"scembed {args.method}",
        )
        fig = (ax[0] if isinstance(ax, list) else ax).figure
        write_atomic(args.plot, lambda p: fig.savefig(p, dpi=150, bbox_inches="tight"))
        plt.close(fig)
        print(f"wrote {args.plot}")
    return args.out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``scembed`` command."""
    from . import __version__

    parser = _Parser(prog="scembed", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"scembed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser(
        "embed",
        help="affinities + embedding of an .h5ad; writes .h5ad and PNG",
        description="Compute entropic affinities and an embedding of an .h5ad and write the annotated data and a "
        "plot. Raw counts are log-normalised and reduced by PCA first, unless obsm['X_pca'] is present.",
    )
    p.add_argument("input", nargs="?", help="the .h5ad to embed (default: scanpy's bundled pbmc68k_reduced)")
    p.add_argument(
        "--method",
        choices=EMBEDDING_METHODS,
        help="embedding method: neuralee (a network trained on the Elastic Embedding objective) or ee (exact "
        "Elastic Embedding) (default: neuralee)",
    )
    p.add_argument(
        "--out",
        metavar="H5AD",
        help="annotated .h5ad to write (default: <input name>_scembed_<method>.h5ad in the current folder, "
        f"{EXAMPLE_NAME}_scembed_<method>.h5ad for the bundled example)",
    )
    p.add_argument(
        "--plot", metavar="IMAGE", help="image of the embedding to write; '' for none (default: --out with .png)"
    )
    p.add_argument("--no-plot", action="store_true", help="write no image (default: write one)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out and --plot if they exist (default: refuse to)"
    )
    p.add_argument(
        "--color",
        metavar="KEY",
        help="obs column or gene to colour the plot by (default: a cell-type column such as celltype, "
        "cell_type, bulk_labels, louvain or leiden, else the first categorical obs column)",
    )
    p.add_argument(
        "--perplexity",
        type=_perplexity,
        default=30.0,
        help="perplexity of the entropic affinities, about the number of neighbours each cell attends to; "
        "lowered to (cells − 1) / 3 on small data, ≥ 1 (default: %(default)g)",
    )
    p.add_argument(
        "--n-pcs",
        type=_positive_int(1),
        default=50,
        help="principal components computed when the input has no obsm['X_pca'] (default: %(default)s)",
    )
    p.add_argument(
        "--max-epochs",
        type=_positive_int(1),
        help="neuralee only: maximum training epochs; training stops earlier once the loss stops improving "
        "(default: tl.neuralee's, 500 but at most 5,000 optimiser steps)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int(2),
        help="neuralee only: cells per mini-batch (default: all cells up to 10,000, batches of 1,024 beyond)",
    )
    p.add_argument(
        "--maxiter", type=_positive_int(1), help="ee only: maximum optimiser iterations (default: tl.ee's, 200)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, or cuda[:N] (default: %(default)s)")
    p.add_argument(
        "--random-state",
        type=_positive_int(0, 2**32 - 1),
        default=0,
        help="seed of the PCA, the neighbour search and the embedding; the same seed on the same device gives "
        "the same result (default: %(default)s)",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an unexpected error (default: one line on stderr)",
    )
    return parser


def _fail(message: str) -> None:
    print(f"scembed: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scembed`` command; returns the exit status (2 for a problem with input or options)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        with warnings.catch_warnings():
            if not debug:  # dependencies' deprecation notices are not the user's business
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
            args = build_parser().parse_args(argv)
            if args.command == "embed":
                embed(args)
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else 0
    except CLIError as e:
        _fail(_one_line(e))
        return 2
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except (ValueError, TypeError, KeyError, OSError) as e:  # the package's checks of its arguments, and I/O
        if debug:
            raise
        _fail(_one_line(e))
        return 2
    except Exception as e:
        if debug:
            raise
        _fail(f"unexpected {type(e).__name__}: {_one_line(e)} (rerun with --debug to see the traceback)")
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
