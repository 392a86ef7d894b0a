"""Folders loramoe writes into, and the rule that keeps it from destroying anything it did not write.

The rule: a command writes into a folder only when that folder is new, empty, or was written by loramoe,
which it proves by ``loramoe-manifest.json``, the list of the entries (files or folders) loramoe put there.
Each entry is listed *before* it is created, so a crash never leaves an unlisted file of ours. ``--overwrite``
deletes listed entries only; a file someone else put beside them is never touched, and a new output that would
replace such a file is refused. Nothing is ever written into a protected folder (the base model's, a source's).
Files are created with the permissions the user's umask gives (some writers, e.g. safetensors, use 0600).

The manifest also records which command wrote each entry (``owners``), and a command's ``--overwrite`` deletes
only its own entries: ``train --overwrite`` replaces the earlier training run, not an evaluation that ``eval
--out`` wrote into the same folder (it names what it kept). Entries listed before owners were recorded belong to
whichever command overwrites them. A command that must be alone in its folder (``train``, ``reproduce``) holds
`LOCK` in it while it runs (`OutputDir.lock`); a second one fails at once, naming the holder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MANIFEST = "loramoe-manifest.json"
STAGING = ".loramoe-staging"  # new outputs are written here, then moved into place
LOCK = ".loramoe-lock"  # flock()ed by the command running in the folder; names it


def write_text(path: Path, text: str) -> None:
    """Write a file atomically (a ``.tmp`` sibling renamed into place; removed again if the write fails, e.g.
    on a full disk, so no empty ``.tmp`` is left behind, and the failure names it: Python's does not)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            raise OSError(e.errno, e.strerror, str(tmp)) from None
        raise
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (see `write_text`)."""
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def respect_umask(path: Path) -> None:
    """Give ``path`` (recursively) the permissions a plain ``open``/``mkdir`` would have given it."""
    mask = _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def check_not_inside(path: str | Path, protected: Mapping[str, str | Path | None]) -> None:
    """Refuse a destination that is, or lies inside, a protected folder (``{"--model": folder, ...}``)."""
    dest = Path(path).resolve()
    for key, folder in protected.items():
        if folder is None or not Path(folder).exists():
            continue
        folder = Path(folder).resolve()
        folder = folder if folder.is_dir() else folder.parent  # a file (e.g. a .gguf): protect its folder
        if dest == folder or folder in dest.parents:
            raise FileExistsError(
                f"{path}: is {'' if dest == folder else 'inside '}the folder of {key} ({folder}); loramoe never "
                f"writes there (expected another output folder)"
            )


def _remove(path: Path) -> None:
    """Delete a file, a folder or a symlink: a symlink is unlinked, what it points to is never touched."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


class OutputDir:
    """An output folder of one command; ``key`` names the option it came from, for messages, and ``owner`` the
    command, recorded for each entry it writes (``None``: not recorded)."""

    def __init__(self, path: str | Path, key: str, protected: Mapping[str, str | Path | None] | None = None,
                 owner: str | None = None) -> None:  # fmt: skip
        self.path, self.key, self.owner = Path(path), key, owner
        self._lock: int | None = None
        check_not_inside(self.path, protected or {})
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"{self.path}: exists and is not a folder (expected a folder for {key})")
        foreign = self.foreign()
        if not (self.path / MANIFEST).is_file() and foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise FileExistsError(
                f"{self.path}: holds files loramoe did not write ({shown}); it is never written into, not even "
                f"with --overwrite (expected for {key} a new or empty folder, or one loramoe wrote: with {MANIFEST})"
            )

    # ---- what is ours ----
    def entries(self) -> list[str]:
        """Entries listed in the manifest."""
        path = self.path / MANIFEST
        listed = json.loads(path.read_text()).get("entries", []) if path.is_file() else []
        return list(dict.fromkeys(listed))  # a name listed twice (a manifest written by hand) is one entry

    def owners(self) -> dict[str, str]:
        """Entry -> the command that wrote it (entries listed before owners were recorded are missing)."""
        path = self.path / MANIFEST
        return dict(json.loads(path.read_text()).get("owners", {})) if path.is_file() else {}

    def owns(self, name: str, listed: list[str] | None = None) -> bool:
        listed = self.entries() if listed is None else listed
        return name in (MANIFEST, STAGING, LOCK, *listed) or (name.endswith(".tmp") and name[: -len(".tmp")] in listed)

    def foreign(self) -> list[str]:
        """Entries of the folder that loramoe did not write."""
        if not self.path.is_dir():
            return []
        listed = self.entries()
        return sorted(p.name for p in self.path.iterdir() if not self.owns(p.name, listed))

    def owned(self) -> list[str]:
        """Listed entries that exist (a symlink counts, even one whose target is gone)."""
        return [n for n in self.entries() if os.path.lexists(self.path / n)]

    def claim(self, names: Iterable[str]) -> OutputDir:
        """Refuse if one of ``names`` (what the command will write) exists and is not loramoe's. Checks only:
        `create` and `record` write, once the command's inputs have been read."""
        clashes = [n for n in names if os.path.lexists(self.path / n) and not self.owns(n)]
        if clashes:
            raise FileExistsError(f"{self.path / clashes[0]}: exists and was not written by loramoe, so it is not "
                                  "replaced (expected no such file)")  # fmt: skip
        return self

    # ---- writing ----
    def create(self) -> OutputDir:
        """Create the folder and its manifest (if new)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / MANIFEST).is_file():
            write_json(self.path / MANIFEST, {"written_by": "loramoe", "entries": []})
        return self

    def record(self, names: Iterable[str]) -> None:
        """List ``names`` as ours (before creating them)."""
        names, listed, owners = list(names), self.entries(), self.owners()
        new = list(dict.fromkeys(n for n in names if n not in listed))
        mine = {n: self.owner for n in names if self.owner and owners.get(n) != self.owner}
        if new or mine:
            owned = {"owners": {**owners, **mine}} if owners or mine else {}
            write_json(self.path / MANIFEST, {"written_by": "loramoe", "entries": listed + new, **owned})

    def remove_owned(self, keep: Iterable[str] = ()) -> list[str]:
        """``--overwrite``: delete what this command wrote here (except ``keep``); nothing else. Returns the
        entries kept because another command wrote them (see the module docstring)."""
        keep, owners, others = set(keep), self.owners(), []
        for name in self.owned():
            if owners.get(name, self.owner) != self.owner:
                others.append(name)
                continue
            if name in keep:
                continue
            _remove(self.path / name)
        shutil.rmtree(self.path / STAGING, ignore_errors=True)
        return others

    def lock(self, command: str) -> None:
        """Hold the (existing) folder until `unlock` or the end of this process, by ``flock`` on `LOCK` inside
        it: a second command that tries fails at once with the holder's pid, host and start time."""
        import fcntl
        import socket
        import time

        try:
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:  # e.g. a read-only file system: name the folder, not our lock file in it
            raise type(e)(e.errno, f"{e.strerror} (expected a folder that can be written, for {self.key})",
                          str(self.path)) from None  # fmt: skip
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 1024).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise FileExistsError(f"{self.path}: in use by {holder} (expected one run at a time in a folder: wait "
                                  f"for it to end, or another {self.key})") from None  # fmt: skip
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        with contextlib.suppress(OSError):  # the note is for messages only (a full disk may refuse it)
            os.ftruncate(fd, 0)
            os.write(fd, f"loramoe {command} (pid {os.getpid()} on {socket.gethostname()}, since {started})".encode())
        self._lock = fd

    @property
    def locked(self) -> bool:
        return self._lock is not None

    def unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

    def staging(self) -> Path:
        """An empty folder inside this one for new outputs, to be moved into place by `publish`."""
        staging = self.path / STAGING
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return staging

    def publish(self, staging: Path) -> list[str]:
        """Move every entry of ``staging`` into the folder, listing each first. A name that belongs to a file
        loramoe did not write is refused before anything moves, and the new outputs stay in ``staging``."""
        names = sorted(p.name for p in staging.iterdir())
        clashes = [n for n in names if os.path.lexists(self.path / n) and not self.owns(n)]
        if clashes:
            raise FileExistsError(
                f"{self.path / clashes[0]}: exists and was not written by loramoe, so it is not replaced (expected "
                f"no such file: move it away; the new outputs are in {staging})"
            )
        self.record(names)
        for name in names:
            target = self.path / name
            if target.is_symlink() or target.is_dir() or (staging / name).is_dir():  # a file is replaced atomically
                _remove(target)
            respect_umask(staging / name)
            os.replace(staging / name, target)
        staging.rmdir()
        return names
