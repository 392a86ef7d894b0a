"""The one project error class that is not bad input. Bad input is a plain ``ValueError`` (or a subclass),
``FileNotFoundError``, ``FileExistsError``, ``NotADirectoryError``, ``IsADirectoryError`` or
``PermissionError`` whose message starts with the path or key at fault; `loramoe.cli` prints either kind as
one line (see its docstring)."""

from __future__ import annotations


class RunStopped(RuntimeError):
    """A run stopped on purpose for a reason its message states (e.g. a non-finite loss); nothing saved is
    lost. The CLI prints the message as one line and exits with 1."""
