"""A repository in a local folder: temp file, fsync, rename; private permissions."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import os
import secrets
import stat as statmod
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from pgvault.errors import AlreadyExists, Conflict, NotFound, StorageError, TransientStorageError
from pgvault.storage.base import TEMP_PREFIX, ObjectInfo, check_key

WRITEBACK_EVERY = 8 << 20
_CHUNK = 1 << 20
_DIR_MODE = 0o700
_FILE_MODE = 0o600
# open/stat of a key that names a folder, or runs through a file, means "no such object".
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _error(action: str, path: Path | str, exc: OSError) -> StorageError:
    """One line naming the path and the OS reason (ENOSPC, EACCES, ...)."""
    reason = exc.strerror or type(exc).__name__
    return StorageError(f"cannot {action} {path}: {reason}")


def _read_error(action: str, path: Path, exc: OSError) -> StorageError:
    """Like ``_error``, but a missing file is NotFound (only readers ask for a key)."""
    if isinstance(exc, _MISSING):
        return NotFound(f"cannot {action} {path}: no such object")
    return _error(action, path, exc)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    """Make renames, links and unlinks in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _info(key: str, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))


def _etag(data: bytes) -> str:
    """A local object's version: its content's digest (the bytes are the whole state)."""
    return hashlib.sha256(data).hexdigest()[:32]


_LOCK_WAIT = 10.0


def _flock(fd: int, path: Path) -> None:
    """An exclusive flock, polled so a stopped holder fails us after a bound, not forever."""
    deadline = time.monotonic() + _LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TransientStorageError(
                    f"cannot lock {path}: held for over {_LOCK_WAIT:g} s") from None
            time.sleep(0.005)
        except OSError as exc:
            raise _error("lock", path, exc) from exc


def _walk(folder: Path, base: str, prefix: str) -> Iterator[ObjectInfo]:
    """Objects under ``folder`` (keys start with ``base``) matching ``prefix``, in key order."""
    with os.scandir(folder) as it:
        # A folder sorts as "name/", so "a/b" comes after "a-c" exactly as the keys compare.
        entries = [
            (base + e.name + ("/" if e.is_dir(follow_symlinks=False) else ""), e)
            for e in it
            if not e.name.startswith(TEMP_PREFIX)
        ]
        entries.sort(key=lambda pair: pair[0])
    for name, entry in entries:
        if name.endswith("/"):
            if name.startswith(prefix) or prefix.startswith(name):
                try:
                    yield from _walk(Path(entry.path), name, prefix)
                except FileNotFoundError:
                    continue  # removed by a concurrent delete while we walked
        elif name.startswith(prefix):
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if statmod.S_ISREG(st.st_mode):
                yield _info(name, st)


class LocalStorage:
    """Keys are files under ``root``; folders are 0700 and files 0600 whatever the umask."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _make_dirs(self, folder: Path) -> None:
        """Create ``folder`` and missing parents as 0700, each made durable in its parent."""
        if folder.is_dir():
            return
        if folder != folder.parent:
            self._make_dirs(folder.parent)
        try:
            os.mkdir(folder, _DIR_MODE)
        except FileExistsError:
            return
        # mkdir's mode is filtered by the umask; the repository must stay private anyway.
        os.chmod(folder, _DIR_MODE)
        _fsync_dir(folder.parent)

    def _create_temp(self, tmp: Path) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for _ in range(3):
            try:
                self._make_dirs(tmp.parent)
                return os.open(tmp, flags, _FILE_MODE)
            except FileNotFoundError:
                continue  # a concurrent delete pruned the empty folder before our open
            except OSError as exc:
                raise _error("create", exc.filename or tmp, exc) from exc
        raise StorageError(f"cannot create {tmp}: its folder keeps being removed")

    def _write_temp(self, tmp: Path, stream: BinaryIO) -> os.stat_result:
        """Copy ``stream`` into the synced temp file ``tmp``.

        The stream's own exceptions propagate unchanged; ours become StorageError.
        The caller removes ``tmp`` on any failure, an interrupt included.
        """
        fd = self._create_temp(tmp)
        try:
            try:
                os.fchmod(fd, _FILE_MODE)
            except OSError as exc:
                raise _error("write", tmp, exc) from exc
            written = flushed = 0
            while chunk := stream.read(_CHUNK):
                try:
                    _write_all(fd, chunk)
                except OSError as exc:
                    raise _error("write", tmp, exc) from exc
                written += len(chunk)
                if written - flushed >= WRITEBACK_EVERY:
                    # Start writeback now, so the final fsync has little left to wait for;
                    # backups are written once and not read back, so their pages can go.
                    with contextlib.suppress(OSError, AttributeError):
                        os.posix_fadvise(fd, flushed, written - flushed,
                                         os.POSIX_FADV_DONTNEED)
                    flushed = written
            try:
                os.fsync(fd)
                return os.fstat(fd)
            except OSError as exc:
                raise _error("write", tmp, exc) from exc
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _temp_beside(self, path: Path) -> Iterator[Path]:
        """A temp file name beside ``path``, removed on leaving unless renamed away.

        Everything from its creation to its rename happens inside this block: a Ctrl-C that
        lands between open(2) returning and the next statement (seen in CI on a loaded host)
        must not leave the file behind.
        """
        tmp = path.with_name(f"{TEMP_PREFIX}{secrets.token_hex(8)}")
        try:
            yield tmp
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def put(self, key: str, stream: BinaryIO) -> ObjectInfo:
        """Write a temp file, fsync it, rename it over ``key`` and fsync the folder."""
        path = self._path(key)
        with self._temp_beside(path) as tmp:
            st = self._write_temp(tmp, stream)
            try:
                os.replace(tmp, path)
                _fsync_dir(path.parent)
            except OSError as exc:
                raise _error("write", path, exc) from exc
        return _info(key, st)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self.put(key, io.BytesIO(data))

    def create(self, key: str, data: bytes) -> ObjectInfo:
        """Hard-link a complete temp file to ``key``: link(2) refuses an existing name."""
        path = self._path(key)
        with self._temp_beside(path) as tmp:
            st = self._write_temp(tmp, io.BytesIO(data))
            try:
                os.link(tmp, path)
                _fsync_dir(path.parent)
            except FileExistsError:
                raise AlreadyExists(f"{path} already exists") from None
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.EOPNOTSUPP):
                    raise StorageError(
                        f"cannot create {path}: the file system does not support hard links"
                    ) from exc
                raise _error("create", path, exc) from exc
        return _info(key, st)

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.read_bytes(key)
        return data, _etag(data)

    def replace_if(self, key: str, data: bytes, etag: str | None) -> ObjectInfo:
        """Compare and rename under an flock on a hidden file beside the key.

        The lock serialises only conditional writers of this key; readers never take it
        (the rename is atomic), and the kernel drops it when its holder dies, so a killed
        process never leaves the key locked.
        """
        path = self._path(key)
        data = bytes(data)
        self._make_dirs(path.parent)
        guard = path.with_name(f"{TEMP_PREFIX}cas-{path.name}")
        try:
            fd = os.open(guard, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        except OSError as exc:
            raise _error("lock", guard, exc) from exc
        try:
            _flock(fd, guard)
            try:
                current: str | None = _etag(path.read_bytes())
            except _MISSING:
                current = None
            except OSError as exc:
                raise _read_error("read", path, exc) from exc
            if current != etag:
                raise Conflict(f"{path} is not at version {etag} (now {current})")
            info = self.put(key, io.BytesIO(data))
        finally:
            os.close(fd)  # releases the flock
        return ObjectInfo(key, info.size, info.modified, etag=_etag(data))

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except OSError as exc:
            raise _read_error("open", path, exc) from exc

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise _read_error("read", path, exc) from exc

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise _read_error("stat", path, exc) from exc
        if not statmod.S_ISREG(st.st_mode):
            raise NotFound(f"cannot stat {path}: not a file")
        return _info(key, st)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Walk only folders that can hold matching keys, yielding in key order.

        The walk starts in the folder the prefix's complete segments name, so listing
        one database's manifests reads that folder alone, not every database's name
        beside it (a status of every database listed every folder once per database).
        """
        folder, base = self._start(prefix)
        if folder is None:
            return
        try:
            yield from _walk(folder, base, prefix)
        except FileNotFoundError:
            return  # the repository folder does not exist yet: it is empty
        except OSError as exc:
            raise _error("list", exc.filename or self.root, exc) from exc

    def _start(self, prefix: str) -> tuple[Path | None, str]:
        """The deepest folder every key under ``prefix`` lies in, and its key prefix.

        None when that folder is missing, or is a file or a symlink (which the walk from
        the root would not enter either). Segments no key may have fall back to the root,
        whose walk compares them as strings.
        """
        segments = prefix.split("/")[:-1]
        if any(s in ("", ".", "..") or s.startswith(TEMP_PREFIX) or "\0" in s
               for s in segments):
            return self.root, ""
        folder = self.root
        for segment in segments:
            folder = folder / segment
            try:
                if not statmod.S_ISDIR(os.lstat(folder).st_mode):
                    return None, ""
            except _MISSING:
                return None, ""
            except OSError as exc:
                raise _error("list", folder, exc) from exc
        return folder, "".join(s + "/" for s in segments)

    def delete(self, keys: Iterable[str]) -> None:
        """Unlink each key, prune folders left empty, and make it all durable."""
        touched: set[Path] = set()
        for key in keys:
            path = self._path(key)
            try:
                os.unlink(path)
            except _MISSING:
                continue
            except OSError as exc:
                raise _error("delete", path, exc) from exc
            touched.add(path.parent)
        for folder in sorted(touched, key=lambda p: len(p.parts), reverse=True):
            try:
                _fsync_dir(folder)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _error("delete in", folder, exc) from exc
            self._prune(folder)

    def _prune(self, folder: Path) -> None:
        """Remove empty folders from ``folder`` up to (not including) the root."""
        while folder != self.root and self.root in folder.parents:
            try:
                os.rmdir(folder)
            except OSError:
                return  # not empty, already gone, or not ours to remove: all fine
            folder = folder.parent
