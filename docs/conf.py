"""Sphinx configuration of the optax_shapley documentation.

Built by ``make docs`` into ``docs/_build/html`` with warnings as errors, so
a reference that does not resolve fails the build.
"""

import optax_shapley

project = "optax_shapley"
author = "The optax_shapley authors"
copyright = "The optax_shapley authors"  # pylint: disable=redefined-builtin
release = version = optax_shapley.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

# -- Markdown (the guides and report pages) ---------------------------------
myst_enable_extensions = ["dollarmath", "amsmath"]
# Anchors for "page.md#a-heading" links, down to ### headings.
myst_heading_anchors = 3

# -- API reference -----------------------------------------------------------
autodoc_member_order = "bysource"
# Signatures without type hints: the docstrings give shapes and dtypes
# (f32[B], int[B]), which say more than jax.Array, and third-party types
# could not be linked anyway (no other project's inventory is fetched).
autodoc_typehints = "none"
# Defaults as written in the source (jnp.float64, not <class ...>).
autodoc_preserve_defaults = True
autosummary_generate = False            # the API pages list their names
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Attributes as fields: a NamedTuple's fields are documented once, not
# also as the attribute entries that :members: adds.
napoleon_use_ivar = True

# Every reference must resolve (nitpicky), except these.  No inventory of
# another project can be fetched at build time, so third-party names that
# appear in signatures and docstrings stay plain text; and the internal
# modules a few docstrings point to for readers of the source are not part
# of the public API documented here.
nitpicky = True
nitpick_ignore = [
    # Third-party names.
    ("py:class", "jax.Array"),
    ("py:class", "optax.OptState"),
    ("py:func", "jax.value_and_grad"),
    ("py:func", "optax.apply_updates"),
    ("py:class", "flax.linen.module.Module"),
]

# -- HTML ----------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "optax_shapley"
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
}
