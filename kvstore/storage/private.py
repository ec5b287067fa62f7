"""A store is private to its owner: folders 0700, files 0600 whatever the umask, and a warning otherwise.

Blobs hold token ids (the text decodes back from them) and the embedded Redis holds document texts
and source paths, so nothing in a store home may be readable by other local users. Everything the
store creates goes through these helpers; a store opened with looser permissions (made by an older
version, or shared on purpose) is used as it is, with a warning naming what others can read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600
log = logging.getLogger("kvstore.storage")


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) as owner-only folders; an existing folder is left as it is."""
    path = Path(path)
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it first
            folder.mkdir(mode=DIR_MODE)
            os.chmod(folder, DIR_MODE)  # mkdir's mode is filtered by the umask; chmod is not
    return path


def write_private(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist) owner-only, write `data` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Files created meanwhile (also by child processes started meanwhile, e.g. redis-server) are owner-only."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def make_private(paths: list[Path]) -> None:
    """chmod existing files 0600 and folders 0700 (what a started server created before we could)."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode):
                os.chmod(path, DIR_MODE if stat.S_ISDIR(mode) else FILE_MODE)


def readable_by_others(home: Path) -> list[Path]:
    """The home and the entries in it (one level into folders) that group or others may read or enter."""
    home = Path(home)
    found = []
    candidates = [home]
    with contextlib.suppress(OSError):
        for entry in home.iterdir():
            candidates.append(entry)
            if entry.is_dir() and not entry.is_symlink():
                candidates.extend(entry.iterdir())
    for path in candidates:
        with contextlib.suppress(OSError):
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode) and mode & 0o077:
                found.append(path)
    return found


def warn_if_shared(home: Path) -> list[Path]:
    """Log a warning when others can read parts of the store; the paths found."""
    found = readable_by_others(home)
    if found:
        shown = ", ".join(f"{p} ({stat.filemode(p.lstat().st_mode)})" for p in found[:3])
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        log.warning(
            "warning: other users can read this store: %s%s; make it private with: chmod -R go-rwx %s",
            shown,
            more,
            home,
        )
    return found
