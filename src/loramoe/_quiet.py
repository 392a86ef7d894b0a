"""Hold what third-party libraries print while the command line imports them.

The CLI promises one line on stderr per failure (`loramoe.cli`). Libraries print at import in ways no logger name
can predict: bitsandbytes' ``kernels`` hook warns through logging on some CPUs and not others, others use
``warnings``, ``print`` or C-level writes. So while ``loramoe`` runs as the command line, its imports run with file
descriptor 2 (which all of those reach) pointed at a temporary file; what was written there is kept in `HELD` and
shown by ``--debug``. Imported as a library, nothing is redirected: a library must not hide its neighbours' output.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

HELD: list[str] = []  # what libraries printed during the held imports, in order


def running_as_cli() -> bool:
    """Whether this process is ``loramoe ...`` or ``python -m loramoe.cli ...`` (also under torchrun)."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    for i, arg in enumerate(argv[:-1]):
        if arg == "-m" and argv[i + 1] in ("loramoe", "loramoe.cli"):
            return True
    return Path(sys.argv[0]).name == "loramoe"  # the console script


@contextlib.contextmanager
def held_output(active: bool | None = None) -> Iterator[None]:
    """Within the block, stderr (Python's and the C library's) goes to a temporary file, appended to `HELD`."""
    if not (running_as_cli() if active is None else active):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buffer:
        os.dup2(buffer.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            buffer.seek(0)
            text = buffer.read().decode("utf-8", errors="replace")
            if text:
                HELD.append(text)
