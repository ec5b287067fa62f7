"""Blobs in a local folder (the default: ``KVSTORE_HOME/blobs``): temp name, fsync, then publish.

A blob is written under a hidden temp name in its final folder, fsynced (file, tree and folder),
then published without ever replacing an existing blob: a hard link for a file (link fails if the
name exists, unlike rename), a rename for a directory (which never replaces a non-empty one). A
crash leaves at most a temp entry, which `kvstore gc` removes. Every path is derived from a checked
name under the resolved root, and no symbolic link inside the store is ever followed: a link where
a blob belongs is refused on read and only unlinked (never its target) on delete.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from kvstore.storage.backends import TREE_ROOT, WHOLE, Entry, check_name, check_total, temp_name
from kvstore.storage.blob import BlobMissingError, BlobPathError
from kvstore.storage.private import private_dir, write_private


def from_url(url: str) -> LocalBackend:
    """A folder given as a path or a file:// URL."""
    parts = urlsplit(url)
    return LocalBackend(Path(parts.path if parts.scheme == "file" else url).expanduser())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tree_size(path: Path) -> int:
    """Bytes of a file, or of every regular file under a directory (links not followed)."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    return sum((Path(root) / f).lstat().st_size for root, _, files in os.walk(path) for f in files)


def _refuse_links(path: Path) -> None:
    """A blob tree must hold only regular files and folders: a link inside could lead anywhere."""
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            if (Path(root) / name).is_symlink():
                raise BlobPathError(f"{Path(root) / name} is a symbolic link inside a blob: refused")


@dataclass(frozen=True)
class LocalSource:
    """A blob file or zarr directory on local disk."""

    name: str
    root: Path

    @property
    def path(self) -> Path:
        return self.root / self.name

    @property
    def location(self) -> str:
        return str(self.path)

    def _part(self, part: str) -> Path:
        return self.path if part == WHOLE else self.path / check_name(part)

    def read(self, part: str = WHOLE, start: int | None = None, end: int | None = None) -> bytes:
        try:
            with open(self._part(part), "rb") as handle:
                handle.seek(start or 0)
                return handle.read() if end is None else handle.read(max(0, end - (start or 0)))
        except FileNotFoundError as exc:
            raise BlobMissingError(f"blob {self.location} has no part {part!r}") from exc

    def read_parts(self, limit: int | None = None) -> dict[str, bytes]:
        paths = [Path(root) / leaf for root, _, files in os.walk(self.path) for leaf in files]
        check_total(sum(path.stat().st_size for path in paths), limit, self.location)
        return {path.relative_to(self.path).as_posix(): path.read_bytes() for path in paths}


class LocalBackend:
    """Blobs under `root/<shard>/<name>`; the root and everything made in it are owner-only."""

    def __init__(self, root: Path):
        self.root = private_dir(Path(root))
        self.real = self.root.resolve()  # the root itself may be a link (blobs on another disk): its target counts
        self.url = str(self.root)

    def _path(self, name: str) -> Path:
        """The path of a name: inside the root, through no symbolic link (the leaf may be one: checked by callers)."""
        check_name(name)
        current = self.real
        for part in name.split("/")[:-1]:
            current = current / part
            if current.is_symlink():
                raise BlobPathError(f"{current} is a symbolic link: kvstore does not follow links out of its store")
        return self.real / name

    def location(self, name: str) -> str:
        return str(self.root / check_name(name))

    def exists(self, name: str) -> bool:
        return os.path.lexists(self._path(name))

    def size(self, name: str) -> int:
        return _tree_size(self._path(name))

    def open(self, name: str) -> LocalSource:
        path = self._path(name)
        if path.is_symlink():
            raise BlobPathError(f"{path} is a symbolic link: kvstore does not follow links out of its store")
        if not path.exists():
            raise BlobMissingError(f"blob {path} does not exist")
        if path.is_dir():
            _refuse_links(path)
        return LocalSource(name, self.real)

    def put(self, name: str, parts: Mapping[str, bytes]) -> bool:
        final = self._path(name)
        private_dir(final.parent)
        if os.path.lexists(final):
            return False
        tmp = self._path(temp_name(name, f"{os.getpid()}x{uuid.uuid4().hex[:8]}"))
        try:
            if list(parts) == [WHOLE]:
                write_private(tmp, parts[WHOLE])
                return self._link(tmp, final)
            self._write_tree(tmp, parts)
            try:
                os.rename(tmp, final)  # a directory never replaces a non-empty one
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    return False
                raise
            _fsync(final.parent)
            return True
        finally:
            self._remove(tmp)

    @staticmethod
    def _write_tree(tmp: Path, parts: Mapping[str, bytes]) -> None:
        private_dir(tmp)
        for part, data in parts.items():
            path = tmp / check_name(part)
            private_dir(path.parent)
            write_private(path, data)
        for root, dirs, _ in os.walk(tmp, topdown=False):  # folders bottom-up: their entries are durable
            for folder in dirs:
                _fsync(Path(root) / folder)
        _fsync(tmp)

    @staticmethod
    def _link(tmp: Path, final: Path) -> bool:
        """Give a complete, fsynced temp file its final name unless one exists there; True if ours is it."""
        try:
            os.link(tmp, final)  # never replaces an existing file, unlike rename
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                return False
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            if os.path.lexists(final):  # no hard links on this filesystem: best effort
                return False
            os.replace(tmp, final)
        _fsync(final.parent)
        return True

    @staticmethod
    def _remove(path: Path) -> int:
        """Delete a file, a link (never its target) or a directory tree; the bytes it held."""
        try:
            size = _tree_size(path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)  # removes links inside without following them
            else:
                path.unlink()
            return size
        except FileNotFoundError:
            return 0

    def delete(self, name: str) -> int:
        return self._remove(self._path(name))

    def list(self) -> Iterator[Entry]:
        if not self.real.is_dir():
            return
        for shard in sorted(self.real.iterdir()):
            if len(shard.name) != 2 or shard.name.startswith("."):
                continue  # store.json and anything else that is not a shard
            if shard.is_symlink():
                yield Entry(shard.name, 0, shard.lstat().st_mtime, complete=False, link=True)
                continue
            if not shard.is_dir():
                continue
            for entry in sorted(shard.iterdir()):
                try:
                    info = entry.lstat()
                    link = stat.S_ISLNK(info.st_mode)
                    size = 0 if link else _tree_size(entry)
                except FileNotFoundError:  # removed while we looked
                    continue
                whole = not (entry.name.startswith(".") or link)
                complete = whole and (stat.S_ISREG(info.st_mode) or (entry / TREE_ROOT).is_file())
                yield Entry(f"{shard.name}/{entry.name}", size, info.st_mtime, complete=complete, link=link)

    def read_meta(self, name: str) -> bytes | None:
        path = self._path(name)
        if path.is_symlink() or not path.is_file():
            return None
        return path.read_bytes()

    def put_meta(self, name: str, data: bytes) -> bool:
        return self.put(name, {WHOLE: data})
