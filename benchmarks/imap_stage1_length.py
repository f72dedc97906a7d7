"""How long iMAP's stage I must train: one stage-I run, stage II from snapshots taken along it.

Runs ``se.tl.imap_integrate`` at its default budget on one prepared set (the same preparation as ``imap.py``:
normalize_total + log1p, 2,000 HVGs per batch) with stage I lengthened to ``--max-stage1`` epochs and 10 % of every
batch held out (``--validation``), so that the held-out loss is recorded after every epoch. The stage-I networks are
copied after each epoch named in ``--epochs``; from every copy the codes of all cells are computed and stage II runs
at its defaults with the same seed, and the PCA of the corrected expression (and the codes themselves) are scored
with scib-metrics as in ``imap.py``. One line of JSON per snapshot, then the held-out loss per epoch.

    python benchmarks/imap_stage1_length.py --datasets cellbench_3cl_2batches --epochs 30 50 75 100 150 --seeds 0
    python benchmarks/imap_stage1_length.py --datasets kang_ifnb_2batches --epochs 50 75 100 150 --seeds 0
    python benchmarks/imap_stage1_length.py --datasets sim5k_3b --epochs 50 75 150 --seeds 0

The study reaches into the engine: it wraps the engine's training driver (to copy the networks) and its stage-II
function (to run it once per copy), nothing else. Stage I runs on 90 % of the cells here (the held-out 10 % give the
loss curve), so its figures differ from a default run's by that.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from _runner import drop_script_dir, load_imap_benchmark, write_json

drop_script_dir()


def study(name: str, seed: int, snapshot_epochs: list[int], validation: float, prep: Path) -> dict:
    import torch

    import scembed as se
    from scembed._engine import imap as engine

    bench = load_imap_benchmark()

    path = prep / f"{name}.h5ad"
    if not path.exists():
        bench.prepare(name, prep, 2000)
    adata = bench.load(str(path))
    batch, labels = adata.obs["batch"].to_numpy(), adata.obs["celltype"].to_numpy()
    snapshots, seconds, held_out, rows = {}, {}, [], []
    train, train_stage1, run_stage2 = engine.train, engine.train_stage1, engine.run_stage2
    started = [0.0]
    networks: list = []

    def train_with_snapshots(step, n_epochs, **kw):
        if not kw.get("desc", "").endswith("stage I"):
            return train(step, n_epochs, **kw)
        module = kw["module"]
        started[0] = time.perf_counter()

        def step_and_copy(epoch):
            out = step(epoch)
            held_out.append(out.get("val_loss", float("nan")))
            if epoch + 1 in snapshot_epochs:
                snapshots[epoch + 1] = copy.deepcopy(module.state_dict())
                seconds[epoch + 1] = time.perf_counter() - started[0]
            return out

        # every epoch runs: no stopping, no restoring of the best epoch
        kw.update(keep_best=False)
        kw.pop("stop", None)
        kw.pop("monitor", None)
        return train(step_and_copy, n_epochs, **kw)

    def stage1_held_out(*args, **kw):
        kw.update(validation=validation, n_epochs=max(snapshot_epochs))
        out = train_stage1(*args, **kw)
        networks[:] = out[:2]
        return out

    def stage2_per_snapshot(source, groups, codes, order, **kw):
        encoder = networks[0]
        for epoch in sorted(snapshots):
            state = snapshots[epoch]
            encoder.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("encoder.")})
            encoder.eval()
            codes = engine.apply_in_chunks(encoder, source, np.arange(source.shape[0]))
            t = time.perf_counter()
            kw["generator"] = torch.Generator().manual_seed(seed)
            out = run_stage2(source, groups, codes, order, **kw)
            stage2 = time.perf_counter() - t
            generators = out[0]
            rows = np.arange(source.shape[0])
            batch_of = np.empty(source.shape[0], dtype=np.int64)
            for b, g in enumerate(groups):
                batch_of[g] = b
            corrected = bench.scores(
                batch, labels, emb=bench.pca(engine.correct_rows(source, rows, batch_of, generators))
            )
            code_scores = bench.scores(batch, labels, emb=codes)
            row = dict(data=name, seed=seed, stage1_epochs=epoch, stage1_s=seconds[epoch], stage2_s=stage2)
            row.update({k: corrected[k] for k in ("total", "iLISI", "kBET", "cLISI")}, codes_total=code_scores["total"])
            print(json.dumps(row), flush=True)
            rows.append(row)
        return out

    engine.train, engine.train_stage1, engine.run_stage2 = train_with_snapshots, stage1_held_out, stage2_per_snapshot
    try:
        se.tl.imap_integrate(adata, batch_key="batch", random_state=seed, show_progress=False)
    finally:
        engine.train, engine.train_stage1, engine.run_stage2 = train, train_stage1, run_stage2
    print(json.dumps({"data": name, "seed": seed, "held_out_loss": [round(v, 5) for v in held_out]}), flush=True)
    return {"rows": rows, "held_out_loss": held_out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["cellbench_3cl_2batches"])
    p.add_argument("--epochs", nargs="+", type=int, default=[30, 50, 75, 100, 150], help="stage-I snapshot epochs")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--validation", type=float, default=0.1, help="share of every batch held out of stage I")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write every row and loss curve here")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            for seed in args.seeds:
                out[f"{name}/{seed}"] = study(name, seed, sorted(args.epochs), args.validation, Path(tmp))
    print("\n| data | seed | stage-I epochs | stage I (s) | stage II (s) | aggregate | iLISI | kBET | cLISI | codes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in (r for v in out.values() for r in v["rows"]):
        print(
            f"| {r['data']} | {r['seed']} | {r['stage1_epochs']} | {r['stage1_s']:.0f} | {r['stage2_s']:.0f} | "
            f"{r['total']:.3f} | {r['iLISI']:.3f} | {r['kBET']:.3f} | {r['cLISI']:.3f} | {r['codes_total']:.3f} |"
        )
    if args.json:
        rows = [r for v in out.values() for r in v["rows"]]
        curves = {k: v["held_out_loss"] for k, v in out.items()}
        write_json(args.json, rows, threads=args.threads, validation=args.validation, held_out_loss=curves)


if __name__ == "__main__":
    main()
