"""User-facing errors.

Every problem caused by the user's input (a recipe, a model name, a data folder, a file) is raised as
:class:`PktError` with a message naming the problem and a hint naming the fix. The CLI prints these as
one readable message without a traceback; anything else escaping is a bug in pktransfer.
"""

from __future__ import annotations


class PktError(Exception):
    """An error the user can fix: carries the problem and how to fix it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class RecipeError(PktError):
    """The recipe (YAML or overrides) is invalid."""


class ModelError(PktError):
    """A model cannot be found, loaded, or is not supported."""


class DataError(PktError):
    """Task data is missing or malformed."""


class IncompatiblePairError(PktError):
    """Teacher and student cannot be used together for the chosen method."""


class OutputError(PktError):
    """An output folder cannot be created, is not pktransfer's to replace, or a write failed."""
