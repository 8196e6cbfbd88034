"""The registry's file contents: a content-addressed folder, `blobs/ab/<sha256>`.

A blob is written to `tmp/`, hashed on the way, and renamed into place only when its sha256 and
size are what was announced, so a file under `blobs/` is always complete and correct. `tmp/` is
emptied when the store opens: whatever a killed server was receiving is gone.
"""

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from hub.errors import BadRequest, TooLarge
from hub.objects import SHA256_HEX


class BlobStore:
    def __init__(self, root: Path, max_file_size: int):
        self.dir, self.tmp, self.max_file_size = Path(root) / "blobs", Path(root) / "tmp", max_file_size
        self.dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)  # half-written uploads of a killed server
        self.tmp.mkdir()

    def path(self, sha256: str) -> Path:
        if not SHA256_HEX.match(sha256):
            raise BadRequest(f"invalid sha256 {sha256!r}")
        return self.dir / sha256[:2] / sha256

    def has(self, sha256: str, size: int) -> bool:
        path = self.path(sha256)
        return path.exists() and path.stat().st_size == size

    def begin_upload(self, sha256: str, size: int) -> "Upload":
        """An object being received; it lands only if its sha256 and size match."""
        if size > self.max_file_size:
            raise TooLarge(f"{size} bytes is over this registry's file size limit of {self.max_file_size}")
        return Upload(self.path(sha256), self.tmp, sha256, size)

    def put(self, data: bytes) -> str:
        """Store bytes (once: same bytes, same blob); returns their sha256."""
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has(sha256, len(data)):
            upload = self.begin_upload(sha256, len(data))
            try:
                upload.write(data)
                upload.finish()
            except BaseException:
                upload.abort()
                raise
        return sha256


class Upload:
    """Bytes streamed into `tmp/`, hashed on the way, renamed into the blob folder when complete."""

    def __init__(self, target: Path, tmp: Path, sha256: str, size: int):
        self.target, self.sha256, self.size = target, sha256, size
        self.digest, self.written = hashlib.sha256(), 0
        self.file = tempfile.NamedTemporaryFile(dir=tmp, delete=False)

    def write(self, chunk: bytes) -> None:
        self.written += len(chunk)
        if self.written > self.size:
            raise BadRequest(f"upload of {self.sha256} is longer than the {self.size} bytes announced")
        self.digest.update(chunk)
        self.file.write(chunk)

    def finish(self) -> None:
        if self.written != self.size or self.digest.hexdigest() != self.sha256:
            raise BadRequest(f"upload of {self.sha256} does not match: got {self.written} bytes with sha256 "
                             f"{self.digest.hexdigest()}")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.target.parent.mkdir(exist_ok=True)
        os.replace(self.file.name, self.target)

    def abort(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.file.name)
