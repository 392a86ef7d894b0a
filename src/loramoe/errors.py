"""The one project error class that is not bad input, and how to tell a full disk. Bad input is a plain
``ValueError`` (or a subclass), ``FileNotFoundError``, ``FileExistsError``, ``NotADirectoryError``,
``IsADirectoryError`` or ``PermissionError`` whose message starts with the path or key at fault; `loramoe.cli`
prints either kind as one line (see its docstring)."""

from __future__ import annotations


class RunStopped(RuntimeError):
    """A run stopped on purpose for a reason its message states (e.g. a non-finite loss); nothing saved is
    lost. The CLI prints the message as one line and exits with 1."""


def out_of_space(error: BaseException) -> bool:
    """Whether ``error`` is a write that failed for want of disk space (or quota): an ``OSError`` with that errno,
    or a library's own error that carries the OS's words (safetensors: "No space left on device (os error 28)")."""
    import errno

    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(error) or "Disk quota exceeded" in str(error)
