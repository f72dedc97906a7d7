"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s docs``.

The sessions' virtual environments see the packages already installed (``--system-site-packages``), so torch is
not downloaded again; set ``SCEMBED_TORCH`` (e.g. ``torch==2.13.0``) to choose the torch build they install when
it is missing.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True
VENV = {"venv_params": ["--system-site-packages"]}


def _install(session: nox.Session, extras: str) -> None:
    session.install(os.environ.get("SCEMBED_TORCH", "torch"))
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
    """Build the HTML documentation (API pages from the docstrings, tutorials executed) into docs/_build/html."""
    _install(session, "doc")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html", *session.posargs)
