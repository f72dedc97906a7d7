"""The ``scembed`` command line: embed an .h5ad end to end and write the annotated data and a PNG.

Examples
--------
``scembed embed`` runs on scanpy's bundled ``pbmc68k_reduced``; ``scembed embed cells.h5ad --method ee
--out cells_ee.h5ad --plot cells_ee.png --color celltype`` on your own data.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import sparse

#: embedding methods the command knows, best first; the first one installed is the default
EMBEDDING_METHODS = ("neuralee", "ee")


def _available_methods() -> list[str]:
    from . import tl

    return [m for m in EMBEDDING_METHODS if hasattr(tl, m)]


def _looks_like_counts(X) -> bool:
    values = X.data if sparse.issparse(X) else np.asarray(X)
    sample = values.ravel()[:100_000]
    return sample.size > 0 and bool(np.all(sample >= 0)) and bool(np.all(np.mod(sample, 1) == 0))


def _prepare(adata, *, n_pcs: int, random_state: int) -> None:
    """Give ``adata`` a PCA: log-normalise raw counts first (on a copy of X), as scanpy's tutorials do."""
    import scanpy as sc

    from ._utils import get_logger

    if "X_pca" in adata.obsm:
        return
    X = adata.copy()
    if _looks_like_counts(X.X):
        get_logger().info("X holds raw counts: normalising to 10,000 per cell and log1p before PCA")
        sc.pp.normalize_total(X, target_sum=1e4)
        sc.pp.log1p(X)
    n_comps = min(n_pcs, adata.n_obs - 1, adata.n_vars - 1)
    sc.pp.pca(X, n_comps=n_comps, random_state=random_state)
    adata.obsm["X_pca"] = X.obsm["X_pca"]
    adata.uns["pca"] = X.uns["pca"]


def _default_color(adata) -> str | None:
    for key in ("celltype", "cell_type", "bulk_labels", "louvain", "leiden", "batch"):
        if key in adata.obs:
            return key
    return next((k for k in adata.obs if adata.obs[k].dtype == "category"), None)


def embed(
    input: str | None = None,
    *,
    method: str | None = None,
    out: str = "scembed_embedding.h5ad",
    plot: str | None = "scembed_embedding.png",
    color: str | None = None,
    perplexity: float = 30.0,
    n_pcs: int = 50,
    device: str = "auto",
    random_state: int = 0,
) -> Path:
    """Read (or load the bundled example), compute affinities and an embedding, write .h5ad and PNG."""
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    from . import pp, tl

    available = _available_methods()
    method = method or (available[0] if available else None)
    if method not in available:
        raise SystemExit(f"scembed embed: unknown or unavailable method {method!r}; choose one of {available}.")
    if input is None:
        adata = sc.datasets.pbmc68k_reduced()
        print(f"no input given: using scanpy's bundled pbmc68k_reduced ({adata.n_obs} cells × {adata.n_vars} genes)")
    else:
        if not Path(input).exists():
            raise SystemExit(f"scembed embed: input file {input!r} does not exist.")
        adata = ad.read_h5ad(input)
        print(f"read {input}: {adata.n_obs} cells × {adata.n_vars} genes")
    if adata.n_obs < 3:
        raise SystemExit(f"scembed embed: {adata.n_obs} cells is too few to embed.")

    start = time.perf_counter()
    _prepare(adata, n_pcs=n_pcs, random_state=random_state)
    perplexity = min(perplexity, (adata.n_obs - 2) / 3)
    pp.affinity(adata, perplexity=perplexity, use_rep="X_pca", device=device, random_state=random_state)
    getattr(tl, method)(adata, device=device, random_state=random_state)
    elapsed = time.perf_counter() - start
    print(f"{method}: embedded {adata.n_obs} cells in {elapsed:.1f} s -> obsm['X_{method}']")

    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out_path)
    print(f"wrote {out_path}")
    if plot:
        color = color or _default_color(adata)
        ax = sc.pl.embedding(adata, basis=method, color=color, show=False, frameon=False, title=f"scembed {method}")
        fig = (ax[0] if isinstance(ax, list) else ax).figure
        plot_path = Path(plot)
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot_path, dpi=150, bbox_inches="tight")
        plt.close(fig)
        print(f"wrote {plot_path}")
    return out_path


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``scembed`` command."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="scembed", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"scembed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("embed", help="affinities + embedding of an .h5ad; writes .h5ad and PNG")
    p.add_argument("input", nargs="?", help=".h5ad to embed (default: scanpy's bundled pbmc68k_reduced)")
    p.add_argument("--method", choices=EMBEDDING_METHODS, help="embedding method (default: neuralee)")
    p.add_argument("--out", default="scembed_embedding.h5ad", help="annotated .h5ad to write")
    p.add_argument("--plot", default="scembed_embedding.png", help="PNG of the embedding ('' for none)")
    p.add_argument("--color", help="obs column to colour the plot by (default: a cell-type column)")
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--n-pcs", type=int, default=50, help="PCs computed when the input has no X_pca")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--random-state", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scembed`` command."""
    args = build_parser().parse_args(argv)
    if args.command == "embed":
        embed(
            args.input,
            method=args.method,
            out=args.out,
            plot=args.plot or None,
            color=args.color,
            perplexity=args.perplexity,
            n_pcs=args.n_pcs,
            device=args.device,
            random_state=args.random_state,
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
