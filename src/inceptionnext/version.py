"""The package version: one definition, read by the root package, the export metadata and ``pyproject.toml``.

A module of its own (layer 0, importing nothing) so that code inside the package can stamp the version without
importing the root facade ``inceptionnext/__init__.py``.
"""

__version__ = "0.1.0"
