"""Output paths checked before any work: a run that cannot write its results is told at once, in one
`error:` line, instead of a traceback after the workload was sent or the trace replayed.

Each check returns the error's text (the CLI prints `error: TEXT` and exits 2), or None when the path can
be written. They leave nothing behind: a command that stops on another error leaves no empty folder or file. A
run folder may be missing (the run creates it, and its parents); a file's folder must exist already, as a
shell's redirection wants.
"""
from __future__ import annotations

import os
from pathlib import Path


def output_dir_problem(path: Path, flag: str = "--output") -> str | None:
    """Why the run folder `path` cannot take the run's files, or None. A missing folder is not created here
    (the run creates it): its nearest existing parent must be a folder that takes a new entry."""
    if path.exists():
        if not path.is_dir():
            return f"{flag} {path}: exists and is not a directory (the run writes several files into a folder)"
        return _unwritable(path, flag)
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{flag} {path}: cannot create the directory: {parent} is not a directory"
    return _unwritable(parent, flag, path)


def output_file_problem(path: Path, flag: str = "--output") -> str | None:
    """Why the file `path` cannot be written (its folder missing, not writable, or the path a folder),
    or None. The file itself is left as it is."""
    if path.is_dir():
        return f"{flag} {path}: is a directory; name a file"
    folder = path.parent
    if not folder.is_dir():
        return f"{flag} {path}: no such directory: {folder}"
    if path.exists():
        try:
            with path.open("r+b"):  # opened for writing, not truncated: it keeps its content until the run ends
                pass
        except OSError as exc:
            return f"{flag} {path}: cannot write the file: {exc.strerror or exc}"
        return None
    return _unwritable(folder, flag, path)


def _unwritable(folder: Path, flag: str, named: Path | None = None) -> str | None:
    """Create and remove a file in `folder`: what the run will do there (os.access says yes to root even
    where the file system refuses, as /proc does)."""
    for attempt in range(100):  # a name of this process's own (tempfile's mkstemp would cost its import)
        probe = os.path.join(folder, f".write-check-{os.getpid()}-{attempt}")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            return f"{flag} {named or folder}: cannot write in {folder}: {exc.strerror or exc}"
        os.close(fd)
        os.unlink(probe)
        return None
    return f"{flag} {named or folder}: cannot write in {folder}: every probe name is taken"
