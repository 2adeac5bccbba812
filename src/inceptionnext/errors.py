"""The package's error types: the lowest layer, imported by every other one and importing nothing of the package.

:class:`UserError` marks a problem with what the user gave (a model name, a file, a folder of images, a config
value) that one message can explain and the user can fix. The command line prints such an error as one
``error: ...`` line and exits with status 2. Any other exception is a bug or an environment failure and keeps
its traceback.

Each concrete error also derives from the builtin type that callers caught before it existed (``ValueError``,
``RuntimeError``, ``ImportError``), so ``except ValueError`` code keeps working.
"""

from __future__ import annotations

__all__ = ["ConfigError", "UserError"]


class UserError(Exception):
    """Bad input that a message can explain: the CLI prints it in one line and exits with status 2."""


class ConfigError(UserError, ValueError):
    """A run configuration (recipe file, flag values, their combination) that cannot be run as given."""
