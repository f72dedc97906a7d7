"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s docs``.

The sessions' virtual environments see the packages already installed (``--system-site-packages``), so a torch
that is already there is reused and never downloaded again. Only when ``import torch`` finds none does a session
install one: ``SCEMBED_TORCH`` (e.g. ``torch==2.13.0``) if set, exactly as given, otherwise ``torch==2.13.0`` from
the PyTorch CPU index (``SCEMBED_TORCH_INDEX``), never the CUDA build by surprise.

``nox -s docs`` builds with warnings as errors and executes every tutorial; ``SCEMBED_DOCS_OFFLINE=1 nox -s docs``
turns the links to other projects' documentation (intersphinx) off, for machines without internet.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True
VENV = {"venv_params": ["--system-site-packages"]}
DEFAULT_TORCH = "torch==2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _ensure_torch(session: nox.Session) -> None:
    """Reuse the torch the session can import; install one only if there is none."""
    found = session.run(
        "python", "-c", "import importlib.util as u; print(u.find_spec('torch') is not None)", silent=True
    )
    if isinstance(found, str) and found.strip().endswith("True"):
        session.log("using the torch already installed")
        return
    if "SCEMBED_TORCH" in os.environ:
        session.install(os.environ["SCEMBED_TORCH"])
    else:
        session.log(f"no torch found: installing {DEFAULT_TORCH}, CPU build (set SCEMBED_TORCH to choose another)")
        session.install(DEFAULT_TORCH, "--index-url", os.environ.get("SCEMBED_TORCH_INDEX", CPU_INDEX))


def _install(session: nox.Session, extras: str) -> None:
    _ensure_torch(session)
    session.install("-e", f".[{extras}]")


@nox.session(**VENV)
def tests(session: nox.Session) -> None:
    """Run the test suite (CUDA tests run only where a GPU is present)."""
    _install(session, "test")
    session.run("pytest", *session.posargs)


@nox.session(**VENV)
def lint(session: nox.Session) -> None:
    """Ruff lint and format check."""
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py", "docs")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "noxfile.py", "docs")


@nox.session(**VENV)
def docs(session: nox.Session) -> None:
    """Build the HTML documentation (API pages from the docstrings, tutorials executed) into docs/_build/html.

    Extra arguments go to sphinx-build, e.g. ``nox -s docs -- -D nb_execution_mode=off`` to skip running the
    tutorials.
    """
    _install(session, "doc")
    session.run(
        "python", "-m", "sphinx", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html", *session.posargs
    )
