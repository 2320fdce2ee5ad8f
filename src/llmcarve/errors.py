"""Failures the user can fix (a wrong path, an incomplete model directory), told apart from bugs.

A stage prints an error of these types as one line, `error: <message>`, and keeps the traceback for a
log file: the message itself must say what to fix. Anything else is a bug and keeps its traceback.
Each type also derives from the built-in exception it refines, so `except FileNotFoundError` still works.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected failure whose message says what to fix."""


class UserInputError(UserError, ValueError):
    """A value the user gave (a params entry, a model source) cannot be used as given."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or directory the user named, or a part of it, does not exist."""
