"""Sphinx configuration: API pages generated from the numpydoc docstrings, tutorials executed by myst-nb."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import scembed

HERE = Path(__file__).parent
# the tutorials live at the repository root (tutorials/) so users find them; sphinx needs them inside docs/.
# A fresh copy every build, so that a tutorial removed or renamed there does not linger here.
shutil.rmtree(HERE / "tutorials", ignore_errors=True)
shutil.copytree(HERE.parent / "tutorials", HERE / "tutorials")

project = "scembed"
author = "the scembed developers"
copyright = "2026, the scembed developers"
version = release = scembed.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
]
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
typehints_defaults = "braces"
always_document_param_types = False

myst_enable_extensions = ["colon_fence", "dollarmath"]
# Tutorials are executed in every build (cached by content between builds); a cell that raises, or runs longer
# than the timeout, fails the build, so CI catches a broken tutorial. The timeout catches a hang, not a slow
# machine: the longest cell (the iMAP tutorial's training) ran past 180 s on two CPU cores shared with another job.
# `-D nb_execution_mode=off` builds the pages without running them.
nb_execution_mode = "cache"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
# stderr (logging, third-party warnings with their file paths) is left out of the rendered pages
nb_output_stderr = "remove"
nb_merge_streams = True

intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "scipy": ("https://docs.scipy.org/doc/scipy/", None),
    "torch": ("https://pytorch.org/docs/stable/", None),
}
# Offline builds (SCEMBED_DOCS_OFFLINE=1, e.g. CI machines that only reach package registries): Sphinx reports
# unreachable inventories as untyped warnings that suppress_warnings cannot silence and -W turns into errors, so
# cross-references to other projects' docs are dropped instead.
if os.environ.get("SCEMBED_DOCS_OFFLINE"):
    intersphinx_mapping = {}
intersphinx_timeout = 5
suppress_warnings = ["intersphinx", "config.cache"]

templates_path = ["_templates"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "jupyter_execute"]
html_theme = "sphinx_book_theme"
html_title = "scembed"
html_theme_options = {"repository_url": "https://github.com/scembed/scembed", "use_repository_button": True}
