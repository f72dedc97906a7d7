"""Peak memory of ``tl.imap_integrate`` alone, on the simulated sparse 200,000-cell set of ``benchmarks/imap.py``.

The method runs in this process on the prepared data (no scoring, no PCA); a thread samples the resident set size
every half second. Prints the RSS before the call, its peak, its size at the start of the correction (everything but
the corrected layer) and the seconds of every stage, and what the data themselves take.

    python benchmarks/imap_memory.py                      # sim200k_4b, one epoch per stage, batch_size (512, 200)
    python benchmarks/imap_memory.py --epochs 2 --threads 2 --json benchmarks/results/imap_memory_200k.json
    python benchmarks/imap_memory.py --block-times 50000 --threads 1   # the correction's time per block size
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _runner import drop_script_dir, load_imap_benchmark, own_peak_rss_mib, write_json

drop_script_dir()  # the script's folder off sys.path: ``import imap`` is the original package


GIB = 1024**3


def nbytes(m) -> int:
    """Bytes of a dense array or of a CSR matrix's three arrays."""
    return m.data.nbytes + m.indices.nbytes + m.indptr.nbytes if hasattr(m, "indptr") else m.nbytes


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="sim200k_4b", help="a simulated set of benchmarks/imap.py")
    p.add_argument("--epochs", type=int, default=1, help="epochs per stage")
    p.add_argument("--batch-size", type=int, nargs=2, default=(512, 200), metavar=("STAGE1", "STAGE2"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--block-times",
        type=int,
        default=0,
        metavar="N_CELLS",
        help="instead: on the first N_CELLS cells, time the correction into the layer in blocks of 2**23 and 2**22 "
        "entries, alternated three times in one process",
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--prepared", type=Path, default=None, help="folder of a set prepared before (by --prepare-into)")
    p.add_argument("--prepare-into", type=Path, default=None, help="prepare the set into this folder and stop")
    args = p.parse_args()
    if args.prepare_into is not None:
        load_imap_benchmark().prepare(args.dataset, args.prepare_into, 2000)
        return

    import torch

    torch.set_num_threads(args.threads)
    bench = load_imap_benchmark()

    import scembed as se
    from scembed.tl import _imap

    if args.prepared is not None:
        adata = bench.load(str(args.prepared / f"{args.dataset}.h5ad"))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            # prepared in a child process: the simulation's own memory must not count in this process's peak
            subprocess.run([sys.executable, __file__, "--prepare-into", tmp, "--dataset", args.dataset], check=True)
            adata = bench.load(str(Path(tmp) / f"{args.dataset}.h5ad"))
    if args.block_times:
        block_times(adata[: args.block_times].copy(), args)
        return
    X = adata.X
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    start = time.perf_counter()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter() - start, rss_bytes()))
            time.sleep(0.5)

    # the RSS when the correction begins: all but the corrected layer and the correction's working block
    at_correction: list[int] = []
    assemble = _imap._assemble

    def assemble_noting_rss(*a, **k):
        at_correction.append(rss_bytes())
        return assemble(*a, **k)

    _imap._assemble = assemble_noting_rss
    # the RSS after each step of the run (stage I, the release of freed memory, encoding, stage II), in order
    after_steps: list[tuple[str, float]] = []

    def noting_rss(name, function):
        def wrapped(*a, **k):
            out = function(*a, **k)
            after_steps.append((name, rss_bytes() / GIB))
            return out

        return wrapped

    engine = _imap.engine
    patched = {"train_stage1": engine, "apply_in_chunks": engine, "run_stage2": engine, "release_free_memory": _imap}
    originals = {name: getattr(module, name) for name, module in patched.items()}
    for name, module in patched.items():
        setattr(module, name, noting_rss(name, originals[name]))
    before = rss_bytes()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    se.tl.imap_integrate(
        adata,
        "batch",
        use_hvg=False,
        max_epochs=args.epochs,
        batch_size=tuple(args.batch_size),
        device="cpu",
        show_progress=False,
    )
    stop.set()
    thread.join()
    for name, module in patched.items():
        setattr(module, name, originals[name])
    peak = own_peak_rss_mib() * 2**20
    layer = adata.layers["imap"]
    row = {
        "data": args.dataset,
        "n_obs": adata.n_obs,
        "n_vars": adata.n_vars,
        "input_nonzero_share": float(X.nnz / (X.shape[0] * X.shape[1])) if hasattr(X, "nnz") else 1.0,
        "epochs": args.epochs,
        "batch_size": list(args.batch_size),
        "rss_before_gib": before / GIB,
        "rss_at_correction_gib": at_correction[0] / GIB if at_correction else float("nan"),
        "peak_gib": peak / GIB,
        "input_gib": nbytes(X) / GIB,
        "layer_gib": nbytes(layer) / GIB,
        "layer_format": "csr" if hasattr(layer, "indptr") else "dense",
        "codes_gib": adata.obsm["X_imap"].nbytes / GIB,
        "seconds": {k: float(v) for k, v in adata.uns["imap"]["seconds"].items()},
        "rss_after_gib": after_steps,
        "rss_timeline_gib": [(round(t, 1), round(r / GIB, 3)) for t, r in samples],
    }
    fmt = row["layer_format"]
    print(f"| data | epochs per stage | RSS before (GiB) | at the correction | peak | input | layer ({fmt}) | codes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {args.dataset} ({adata.n_obs:,} × {adata.n_vars:,}, {row['input_nonzero_share']:.0%} non-zero) | "
        f"{args.epochs} | {row['rss_before_gib']:.2f} | {row['rss_at_correction_gib']:.2f} | {row['peak_gib']:.2f} | "
        f"{row['input_gib']:.2f} | {row['layer_gib']:.2f} | {row['codes_gib']:.2f} |"
    )
    print("seconds:", {k: round(v, 1) for k, v in row["seconds"].items()})
    print("RSS (GiB) after:", ", ".join(f"{name} {gib:.2f}" for name, gib in after_steps))
    print(f"peak: {row['peak_gib']:.2f} GiB = {row['peak_gib'] * GIB / 1e9:.2f} GB")
    write_json(args.json, [row], script="imap_memory", threads=args.threads)


def block_times(adata, args) -> None:
    """Seconds of ``_assemble`` (the correction written into the layer) per block size, after one epoch per stage."""
    import numpy as np

    import scembed as se
    from scembed.tl import _imap

    captured, assemble = {}, _imap._assemble

    def keep_arguments(*a):
        captured["args"] = a
        return assemble(*a)

    _imap._assemble = keep_arguments
    se.tl.imap_integrate(
        adata, "batch", use_hvg=False, max_epochs=args.epochs, batch_size=tuple(args.batch_size), device="cpu",
        show_progress=False,
    )  # fmt: skip
    _imap._assemble = assemble
    seconds: dict[int, list[float]] = {2**23: [], 2**22: []}
    for _ in range(3):
        for block in seconds:
            _imap.ASSEMBLE_BLOCK = block
            start = time.perf_counter()
            assemble(*captured["args"])
            seconds[block].append(time.perf_counter() - start)
    cells, genes = f"{adata.n_obs:,}", f"{adata.n_vars:,}"
    print(f"| block (entries) | cells of {genes} genes | correction of {cells} cells, median (s) | runs |")
    print("| --- | --- | --- | --- |")
    for block, runs in seconds.items():
        print(f"| 2**{block.bit_length() - 1} | {block // adata.n_vars:,} | {np.median(runs):.2f} | "
              f"{', '.join(f'{r:.2f}' for r in runs)} |")  # fmt: skip
    write_json(args.json, [{"n_obs": adata.n_obs, "seconds": {str(k): v for k, v in seconds.items()}}],
               script="imap_memory", threads=args.threads)  # fmt: skip


if __name__ == "__main__":
    main()
