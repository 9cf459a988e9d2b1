"""Sphinx configuration: the API reference (from the docstrings) and the pyverbs mapping page.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (the test suite does
this with warnings as errors, tests/test_docs.py). It documents the *installed* mlx5tlp.
"""

from __future__ import annotations

import mlx5tlp

project = "mlx5tlp"
release = version = mlx5tlp.__version__
author = "mlx5tlp developers"
copyright = "mlx5tlp developers"  # noqa: A001 (Sphinx's name)

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser"]
# Only the pages of this reference; the other docs/*.md are read on their own.
include_patterns = ["index.rst", "api/*.rst", "pyverbs.md"]
exclude_patterns = ["_build"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
master_doc = "index"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# The compiled module's names in signatures are not documented pages.
nitpicky = False
suppress_warnings = ["myst.xref_missing"]  # links to files outside the reference
myst_heading_anchors = 2
html_theme = "alabaster"
