"""The one error class for a user's mistakes.

Every check of a user's input (an unknown criterion, an amount out of range, a
malformed plan or checkpoint) raises :class:`PrunekitError`, naming what was
wrong and the allowed values. It subclasses ``ValueError`` so code written as
``except ValueError`` keeps working. The CLI prints these as one line; any
other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class PrunekitError(ValueError):
    """A request prunekit refuses: bad input, named with the allowed values."""


class UnknownNameError(PrunekitError, KeyError):
    """A name not found in a registry or a model (also a ``KeyError`` for ``except KeyError`` code)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidTypeError(PrunekitError, TypeError):
    """An argument of the wrong type (also a ``TypeError`` for ``except TypeError`` code)."""
