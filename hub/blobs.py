"""The registry's file contents: a content-addressed folder, `blobs/ab/<sha256>`.

A blob is written to `tmp/`, hashed on the way, made durable, and renamed into place only when its
sha256 and size are what was announced, so a file under `blobs/` is always complete and correct,
also after a power cut: the bytes are synced before the rename and the folder after it.

Opening the store never touches `tmp/`: another process may be receiving uploads there. Only
`loradock hub serve` empties it, at start-up and only while no other server holds the same root
(`serve_lock`), so whatever a killed server was receiving goes, and nothing in flight does.
Unreferenced blobs stay until `loradock hub gc` (`hub.gc`) removes them.
"""

import contextlib
import ctypes
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hub.errors import BadRequest, TooLarge, refusing_a_full_disk
from hub.objects import SHA256_HEX


def _load_syncfs():
    """Linux's syncfs(2): one call makes a whole filesystem durable, and reports write errors
    (os.sync() does not). None where the C library lacks it."""
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        return None


_SYNCFS = _load_syncfs()


def sync(paths: list[Path]) -> None:
    """Make these files or folders durable: one fsync for one path; for several, one syncfs of
    their filesystem (on this disk 1,000 small files sync in about half the time of 1,000 fsyncs,
    and 10 already in 40%), else an fsync of each.

    All paths must lie on one filesystem (the registry's root). syncfs also flushes whatever else
    is waiting to be written on that filesystem.
    """
    if len(paths) > 1 and _SYNCFS:
        fd = os.open(paths[0], os.O_RDONLY)
        try:
            if _SYNCFS(fd) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"syncfs of the filesystem of {paths[0]} failed: {os.strerror(errno)}")
        finally:
            os.close(fd)
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tmp_dir(root: Path) -> Path:
    return Path(root) / "tmp"


@contextlib.contextmanager
def serve_lock(root: Path) -> Iterator[bool]:
    """Hold `<root>/serve.lock` while a registry server runs on `root`; yields whether `tmp/` was emptied.

    The first server on a root takes the lock exclusively, empties `tmp/` (the half-received uploads
    of a server that was killed), then keeps it shared until the block ends. A server started while
    another one holds the lock only shares it and leaves `tmp/` alone: the other's uploads in flight
    are there. The lock goes with the process, however it ends.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "serve.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            cleaned = False
        else:
            tmp = tmp_dir(root)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            cleaned = True
        # Downgrading is not atomic: another server may take the exclusive lock in between, and
        # empty a tmp/ this one has not started using yet.
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield cleaned


class BlobStore:
    def __init__(self, root: Path, max_file_size: int):
        self.dir, self.tmp, self.max_file_size = Path(root) / "blobs", tmp_dir(root), max_file_size
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not SHA256_HEX.match(sha256):
            raise BadRequest(f"invalid sha256 {sha256!r}")
        return self.dir / sha256[:2] / sha256

    def has(self, sha256: str, size: int) -> bool:
        path = self.path(sha256)
        return path.exists() and path.stat().st_size == size

    def begin_upload(self, sha256: str, size: int) -> "Upload":
        """An object being received; it lands only if its sha256 and size match."""
        self._check_size(size)
        return Upload(self, sha256, size)

    def put(self, data: bytes) -> str:
        """Store bytes (once: same bytes, same blob); returns their sha256. See `put_many`."""
        return self.put_many([data])[0]

    def put_many(self, datas: list[bytes]) -> list[str]:
        """Store each of `datas` as a blob (a commit's inline files); returns their sha256s, in order.

        When it returns, every blob is complete at its path and durable: its bytes and its folder
        entry survive a power cut. A blob already stored is not written again, but its modification
        time is set to now, as a new blob's is: `hub gc` keeps unreferenced blobs younger than its
        grace period, so these survive it until the commit that references them is recorded.
        Costs one sync of the new bytes for the whole batch, then one of the folders (`sync`).

        Raises:
            TooLarge: one of `datas` is over `max_file_size`.
            InsufficientStorage: the disk is full; none of the files written for this call is left in `tmp/`.
        """
        sha256s = [hashlib.sha256(data).hexdigest() for data in datas]
        new: dict[str, bytes] = {}
        for sha256, data in zip(sha256s, datas):
            self._check_size(len(data))
            if sha256 not in new and not self._refresh(sha256, len(data)):
                new[sha256] = data
        written: list[tuple[str, str]] = []  # (sha256, its file in tmp/)
        with refusing_a_full_disk():
            try:
                for sha256, data in new.items():
                    fd, name = tempfile.mkstemp(dir=self.tmp)
                    written.append((sha256, name))
                    with open(fd, "wb") as f:
                        f.write(data)
                sync([Path(name) for _, name in written])
                folders: set[Path] = set()
                for sha256, name in written:
                    folders.update(self.place(name, sha256))
                sync(sorted(folders))
            except BaseException:
                for _, name in written:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name)
                raise
        return sha256s

    def place(self, name: str, sha256: str) -> list[Path]:
        """Rename a complete, synced file of `tmp/` to the blob `sha256`; returns the folders whose
        entries changed (its shard, and `blobs/` when the shard is new), for the caller to sync."""
        target = self.path(sha256)
        for _ in range(5):
            try:
                target.parent.mkdir()
                changed = [target.parent, self.dir]
            except FileExistsError:
                changed = [target.parent]
            try:
                os.replace(name, target)
                return changed
            except FileNotFoundError:
                if not os.path.exists(name):
                    raise
                # `hub gc` removed the shard, empty, between the mkdir and the rename: make it again.
        raise OSError(f"the blob folder {target.parent} keeps disappearing; is another program deleting it?")

    def _refresh(self, sha256: str, size: int) -> bool:
        """Whether the blob is stored; if so, its modification time is set to now (see `put_many`)."""
        path = self.path(sha256)
        try:
            if path.stat().st_size != size:
                return False
            os.utime(path)
        except FileNotFoundError:  # `hub gc` took it since: it is written again
            return False
        return True

    def _check_size(self, size: int) -> None:
        if size > self.max_file_size:
            raise TooLarge(f"{size} bytes is over this registry's file size limit of {self.max_file_size}")


class Upload:
    """Bytes streamed into `tmp/`, hashed on the way, renamed into the blob folder when complete.

    Each step raises `InsufficientStorage` when the disk is full; whoever received the bytes then
    calls `abort`, which removes them.
    """

    def __init__(self, store: BlobStore, sha256: str, size: int):
        self.store, self.sha256, self.size = store, sha256, size
        self.target = store.path(sha256)
        self.digest, self.written = hashlib.sha256(), 0
        with refusing_a_full_disk():
            self.file = tempfile.NamedTemporaryFile(dir=store.tmp, delete=False)

    def write(self, chunk: bytes) -> None:
        self.written += len(chunk)
        if self.written > self.size:
            raise BadRequest(f"upload of {self.sha256} is longer than the {self.size} bytes announced")
        self.digest.update(chunk)
        with refusing_a_full_disk():
            self.file.write(chunk)

    def finish(self) -> None:
        """Check the bytes, make them durable, rename them into place, and make the rename durable."""
        if self.written != self.size or self.digest.hexdigest() != self.sha256:
            raise BadRequest(f"upload of {self.sha256} does not match: got {self.written} bytes with sha256 "
                             f"{self.digest.hexdigest()}")
        with refusing_a_full_disk():
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            sync(self.store.place(self.file.name, self.sha256))

    def abort(self) -> None:
        # On a full disk, closing fails too (it flushes what is buffered); the file is closed all the
        # same, and removed.
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.file.name)
