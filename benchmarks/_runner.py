"""One way for every benchmark script to run a method: in a fresh subprocess, with a thread count, timed.

``run_child`` starts a command with the thread variables set (torch, OpenMP, MKL, OpenBLAS, numba), waits for it
with ``os.wait4`` and returns a dict with its wall time and its own peak resident memory (``ru_maxrss`` of that
process and the children it waited for), so that every method pays for its own imports and data and nothing else.
The child reports its result as one JSON object on the LAST line of its stdout (``emit`` prints it);
``run_child`` parses it into ``result``.

    from _runner import run_child, script_command
    r = run_child(script_command(__file__, "--worker", "scembed", path), threads=2)
    r["ok"], r["wall_s"], r["peak_rss_mib"], r["result"]   # result: the child's JSON (a dict) or None

Helpers shared by the scripts live here too: ``DATA`` (the shared .h5ad folder), ``lognorm_pca`` (the common
normalize_total → log1p → PCA preparation) and ``drop_script_dir`` (scripts named like the package they compare
with, e.g. ``neuralee.py`` and ``imap.py``, must not shadow it).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

#: key under which :func:`emit` reports the child's own peak RSS to :func:`run_child`
OWN_PEAK = "_own_peak_rss_mib"

HERE = Path(__file__).resolve().parent
#: the folder with the shared real data sets (<name>.h5ad); ``SCEMBED_BENCH_DATA`` overrides it
DATA = Path(os.environ.get("SCEMBED_BENCH_DATA", HERE.parents[1] / "shared" / "data"))
#: environment variables that set a thread count for the libraries a method may use
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


def thread_env(threads: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default: this process's environment) with every thread variable set to ``threads``."""
    out = dict(os.environ if env is None else env)
    out.update({name: str(threads) for name in THREAD_VARIABLES})
    return out


def script_command(script: str | Path, *args: Any, python: str | None = None) -> list[str]:
    """``[python, script, *args]`` as strings; ``python`` defaults to this interpreter."""
    return [python or sys.executable, str(script), *(str(a) for a in args)]


def run_child(
    command: list[str],
    threads: int,
    *,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    extra_pythonpath: str | Path | None = None,
) -> dict[str, Any]:
    """Run ``command`` in a fresh process with ``threads`` threads; return its time, peak RSS and JSON result.

    Parameters
    ----------
    command
        The command line (e.g. from ``script_command``).
    threads
        Thread count for every library (environment variables; the child should also call
        ``torch.set_num_threads(threads)`` itself).
    timeout
        Seconds after which the child is killed (``ok`` False, ``error`` says so). None: no limit.
    env
        Base environment (default: this process's).
    extra_pythonpath
        A folder put first on the child's ``PYTHONPATH`` (e.g. a folder with an original implementation's code).

    Returns
    -------
    dict
        ``ok`` (exit status 0 and a JSON last line), ``returncode``, ``wall_s`` (seconds from start to exit, imports
        included), ``peak_rss_mib`` (the child's own peak RSS where it reported one through :func:`emit`, else its
        ``ru_maxrss``, which includes the parent's RSS at the fork), ``result`` (the parsed JSON or None), ``error``
        (None or the last lines of stderr), ``stdout`` and ``stderr`` (text).
    """
    child_env = thread_env(threads, env)
    if extra_pythonpath is not None:
        rest = child_env.get("PYTHONPATH")
        child_env["PYTHONPATH"] = str(extra_pythonpath) + (os.pathsep + rest if rest else "")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=child_env)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout, kill) if timeout is not None else None
        if timer is not None:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (subprocess.wait would lose it)
        finally:
            if timer is not None:
                timer.cancel()
        returncode = os.waitstatus_to_exitcode(status)
        proc.returncode = returncode
        timed_out = killed.is_set()
        peak = usage.ru_maxrss / 1024  # Linux reports KiB
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    result = None
    lines = stdout.strip().splitlines()
    if lines:
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError:
            result = None
    own_peak = result.pop(OWN_PEAK, None) if isinstance(result, dict) else None
    if own_peak is not None:  # the child's own peak (see own_peak_rss_mib), where it reported one
        peak = own_peak
    error = None
    if timed_out:
        error = f"timed out after {timeout:g} s"
    elif returncode != 0:
        error = "\n".join(stderr.strip().splitlines()[-5:]) or f"exit status {returncode}"
    elif result is None:
        error = "no JSON result on the last line of stdout"
    return {
        "ok": error is None,
        "returncode": returncode,
        "wall_s": wall,
        "peak_rss_mib": peak,
        "result": result,
        "error": error,
        "stdout": stdout,
        "stderr": stderr,
    }


def own_peak_rss_mib() -> float | None:
    """This process's own peak RSS (``VmHWM`` of /proc/self/status), in MiB; None where /proc is absent.

    ``ru_maxrss`` of a child is not its own peak on Linux: it starts from the parent's RSS at the fork (with vfork,
    the parent's peak), which inflates the figure of a small child spawned by a large parent. ``VmHWM`` belongs to
    the address space that ``exec`` created, so it counts only the child's own pages.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def emit(result: dict[str, Any]) -> None:
    """Print a child's result as the one JSON line ``run_child`` reads (last line of stdout), with its own peak RSS."""
    print(json.dumps({**result, OWN_PEAK: own_peak_rss_mib()}), flush=True)


def lognorm_pca(adata, n_comps: int = 50, random_state: int = 0, target_sum: float | None = 1e4):
    """normalize_total → log1p → PCA on ``adata`` in place; return ``obsm["X_pca"]`` as float32.

    ``target_sum`` as in ``sc.pp.normalize_total`` (None: the median count; the EE scripts use that).
    """
    import numpy as np
    import scanpy as sc

    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=n_comps, random_state=random_state)
    return np.ascontiguousarray(adata.obsm["X_pca"][:, :n_comps], dtype=np.float32)


def drop_script_dir() -> None:
    """Remove this folder from ``sys.path`` so that ``import neuralee`` / ``import imap`` find the packages."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def load_imap_benchmark():
    """``benchmarks/imap.py`` (its data preparation and scores) as a module, loaded by path: ``import imap`` is the
    original package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("imap_benchmark", HERE / "imap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def patch_neuralee_for_today() -> None:
    """Let neuralee 0.1.6 import and run on today's numpy/torch (outside its method; see ALGORITHMS.md §3).

    ``np.str`` and ``torch.cholesky`` were removed upstream; ``loompy`` is imported by ``neuralee.dataset`` for its
    .loom readers only (stubbed). Also drops this folder from ``sys.path`` (``benchmarks/neuralee.py`` would shadow
    the package).
    """
    import types

    import numpy as np
    import torch

    drop_script_dir()
    np.str = str
    torch.cholesky = lambda A, upper=False: torch.linalg.cholesky(A, upper=upper)
    sys.modules.setdefault("loompy", types.ModuleType("loompy"))


def machine_description() -> str:
    """CPU model, widest vector extension and core count, e.g. "Intel(R) Xeon(R) Processor (AVX-512), 2 cores"."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:  # not Linux: the platform's own name
        pass
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    return f"{model}{f' ({vector})' if vector else ''}, {os.cpu_count()} cores"


def write_json(path: str | Path | None, rows: list[dict], **meta: Any) -> None:
    """Write raw results as ``{"meta": {...}, "rows": [...]}`` (``meta`` gets the command line and machine)."""
    if path is None:
        return
    info = {
        "command": shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),  # pastable
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        **meta,
    }
    Path(path).write_text(json.dumps({"meta": info, "rows": rows}, indent=1, default=float))
