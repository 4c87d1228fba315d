"""The exceptions a user can meet, under one base class.

``SelfmentUserError`` means "the user asked for something that cannot be done" (a bad setting, a
busy output, a cluster without the resources asked for, an unreadable input): the command line
prints it as one ``selfment: error: …`` line and exits 2. Every other exception is a bug or an
environment fault we did not foresee, and keeps its traceback (exit 1).

The concrete classes live beside the code that raises them and derive from this one; the old
built-in bases are kept (``SettingsError`` is still a ``ValueError``) so callers that catch
those keep working.
"""
from __future__ import annotations


class SelfmentUserError(Exception):
    """A user mistake or an environment the user must change; shown as one line, exit 2."""


class UserValueError(SelfmentUserError, ValueError):
    """A value the user gave (a setting, an input, a file's content) that cannot be used."""


class UserInputNotFoundError(SelfmentUserError, FileNotFoundError):
    """A path or URI the user gave that does not exist (an input, a config file, a model)."""


class UserPermissionError(SelfmentUserError, PermissionError):
    """A path the user gave that this process may not read or write."""


class FencedError(RuntimeError):
    """This run lost the output to another run: some of its writes were not published. Not a
    user mistake and not a bug: the command line prints it as one line and exits 1."""
