"""Sphinx configuration: MyST pages, API reference from the docstrings (autodoc, autosummary, napoleon).

Builds offline: no intersphinx, a theme installed from PyPI (furo). Run
``python -m sphinx -W --keep-going -b html docs docs/_build/html`` from the
repository root (``tests/test_docs.py`` does, with warnings as errors).
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's package, installed or not

project = "arrayloaders"
author = "arrayloaders contributors"
copyright = "arrayloaders contributors"
try:
    release = importlib.metadata.version("arrayloaders")
except importlib.metadata.PackageNotFoundError:  # a checkout that is not installed
    release = "0.0.0"
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# MyST: headings get anchors (links such as loading.md#faults), ```{directive} fences.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

# API reference: one page per public name, generated at build time into docs/generated/ (not in git).
autosummary_generate = True
autosummary_imported_members = True
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
napoleon_use_param = False  # "batch_key, labels_key" stay one entry with one description

html_theme = "furo"
html_title = f"arrayloaders {release}"
html_static_path = ["_static"]
html_css_files = ["wrap.css"]


# napoleon reads a property's first line "X: Y" as type X, description Y; our properties' docstrings are
# prose that uses colons ("The current epoch: the one the next loop runs."), so they bypass napoleon:
# kept before it runs (priority 400 < its 500) and put back after (600).
_property_docstrings: dict[str, list[str]] = {}


def _keep_property_docstring(app, what, name, obj, options, lines):
    if what == "property":
        _property_docstrings[name] = list(lines)


def _restore_property_docstring(app, what, name, obj, options, lines):
    if what == "property" and name in _property_docstrings:
        lines[:] = _property_docstrings.pop(name)


def setup(app):
    app.connect("autodoc-process-docstring", _keep_property_docstring, priority=400)
    app.connect("autodoc-process-docstring", _restore_property_docstring, priority=600)
