"""Neighbour search for large N: faiss HNSW (the package's approximate default), annoy and pynndescent.

The k = 90 nearest neighbours (perplexity 30 × 3, what ``pp.affinity`` asks for) of every cell of
``se.datasets.simulate_embedding(n, 50)``. Each search runs in its own subprocess with the same threads (time and
peak RSS of that process). Recall: the share of the exact k nearest neighbours found, on ``--sample`` random cells
whose exact neighbours are computed here by brute force. annoy, pynndescent and faiss run through the package's
one search (``scembed._engine.knn.nearest_neighbors``) with its settings (faiss: ``IndexHNSWFlat``, M = 32,
efConstruction 80, efSearch 128); ``faiss_hnsw`` is the same graph searched with each ``--ef`` value.

    python benchmarks/knn.py --sizes 100000 300000 --threads 2
    python benchmarks/knn.py --sizes 300000 --methods faiss_hnsw --ef 64 128 256 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import emit, run_child, script_command, write_json

K = 90
METHODS = ["annoy", "pynndescent", "faiss", "faiss_hnsw"]


def child(spec: dict) -> None:
    """Search all rows of ``spec['X']`` with one method; save the neighbours of the sample rows."""
    import torch

    from scembed._engine.knn import _drop_self, nearest_neighbors

    torch.set_num_threads(spec["threads"])
    X = np.load(spec["X"])
    sample = np.load(spec["sample"])
    start = time.perf_counter()
    if spec["method"] == "faiss_hnsw":
        import faiss

        faiss.omp_set_num_threads(spec["threads"])
        index = faiss.IndexHNSWFlat(X.shape[1], 32)
        index.hnsw.efConstruction = 80
        index.add(X)
        built = time.perf_counter()
        index.hnsw.efSearch = spec["ef"]
        d2, idx = index.search(X, K + 1)
        idx, _ = _drop_self(idx, d2, K)  # the package's rule: each row's own entry, or its farthest
    else:
        built = start
        idx, _, _ = nearest_neighbors(X, K, method=spec["method"], n_jobs=spec["threads"], random_state=0)
    elapsed = time.perf_counter() - start
    np.save(spec["out"], idx[sample])
    emit({"time": elapsed, "build": built - start})


def exact_neighbours(X: np.ndarray, sample: np.ndarray, threads: int) -> np.ndarray:
    import torch

    torch.set_num_threads(threads)
    Xt = torch.from_numpy(X)
    q = Xt[torch.from_numpy(sample)]
    best_d = torch.full((len(sample), K + 1), float("inf"))
    best_i = torch.zeros((len(sample), K + 1), dtype=torch.int64)
    # small blocks: this process forks the next size's children, whose peak RSS starts from its size
    for s in range(0, len(X), 20_000):
        d = torch.cdist(q.double(), Xt[s : s + 20_000].double())
        d_all = torch.cat([best_d, d.float()], 1)
        i_all = torch.cat([best_i, torch.arange(s, s + d.shape[1]).expand(len(sample), -1)], 1)
        best_d, pos = d_all.topk(K + 1, largest=False)
        best_i = i_all.gather(1, pos)
    from scembed._engine.knn import _drop_self

    return _drop_self(best_i.numpy(), best_d.numpy(), K, row_ids=sample)[0]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--make-data":
        import scembed as se

        spec = json.loads(sys.argv[2])
        X = se.datasets.simulate_embedding(spec["n"], 50, random_state=0).X
        np.save(spec["X"], np.ascontiguousarray(X, dtype=np.float32))
        emit({"n": spec["n"]})
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[300_000])
    p.add_argument("--methods", nargs="+", default=METHODS[:3], choices=METHODS)
    p.add_argument("--ef", type=int, nargs="+", default=[128, 256], help="faiss HNSW efSearch values")
    p.add_argument("--sample", type=int, default=1000, help="cells whose recall is measured")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    rows = []
    print(f"\nk = {K}, {args.threads} threads, recall on {args.sample} random cells against brute force\n")
    print("| cells | method | time (s) | of which index build (s) | peak RSS (GB) | recall |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            # the data are made in a child too: a child's peak RSS starts from this process's size when it forks
            make = {"X": str(folder / "X.npy"), "n": n}
            r = run_child(script_command(__file__, "--make-data", json.dumps(make)), args.threads)
            if not r["ok"]:
                raise RuntimeError(r["error"])
            sample = np.sort(np.random.default_rng(0).choice(n, args.sample, replace=False))
            np.save(folder / "sample.npy", sample)
            runs = [(m, None) for m in args.methods if m != "faiss_hnsw"]
            runs += [("faiss_hnsw", ef) for ef in args.ef] if "faiss_hnsw" in args.methods else []
            found = {}
            for method, ef in runs:
                label = method if ef is None else f"{method} (efSearch {ef})"
                spec = {"X": str(folder / "X.npy"), "sample": str(folder / "sample.npy"), "method": method,
                        "ef": ef, "threads": args.threads, "out": str(folder / f"idx_{len(found)}.npy")}  # fmt: skip
                r = run_child(script_command(__file__, "--child", json.dumps(spec)), args.threads, timeout=args.timeout)
                if not r["ok"]:
                    print(f"| {n} | {label} | {r['error'].splitlines()[-1]} | | | |", flush=True)
                    rows.append({"cells": n, "method": label, "error": r["error"].splitlines()[-1]})
                    continue
                found[label] = (spec["out"], method, {**r["result"], "rss_gb": r["peak_rss_mib"] / 1024})
            # the exact neighbours of the sample last, after every timed child
            truth = exact_neighbours(np.load(folder / "X.npy"), sample, args.threads)
            for label, (path, method, res) in found.items():
                idx = np.load(path)
                recall = float(np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(idx, truth, strict=True)]))
                rows.append({"cells": n, "method": label, **res, "recall": recall})
                build = f"{res['build']:.1f}" if method == "faiss_hnsw" else "–"
                cells = f"{res['time']:.1f} | {build} | {res['rss_gb']:.2f} | {recall:.3f}"
                print(f"| {n} | {label} | {cells} |", flush=True)
    write_json(args.json, rows, script="knn", threads=args.threads, load_average_end=os.getloadavg())


if __name__ == "__main__":
    main()
