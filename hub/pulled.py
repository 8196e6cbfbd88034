"""The copies pulls keep under `$LORADOCK_HOME/pulled/ORG/NAME/SHA` (`hub.client.Registry.pull` without
`--to`): which are in use, and evicting the least recently used of the others once they outgrow a
size cap. Every copy is the registry's commit, so an evicted one is pulled again when next asked for.

In use means leased: a process serving a copy holds a shared `flock` on its pull marker
(`Lease`), which the kernel releases when the process ends, a crash included. An eviction takes
the exclusive lock without waiting, so a copy any process (this one, another replica sharing
`$LORADOCK_HOME`) has leased is never deleted; it moves a copy out of its place under that lock,
then deletes it, so a pull sees either the whole copy or none. Written by hand: no library keeps
a size-capped directory cache with cross-process leases.
"""

import contextlib
import fcntl
import os
import shutil
import time
from pathlib import Path

from hub.adapter import PULL_MARKER, AdapterRef
from loradock.errors import LoradockError
from loradock.home import home


def root() -> Path:
    return home() / "pulled"


class Lease:
    """A shared lock on a pulled copy: while held, no eviction removes it. Also marks the copy as
    used now (the marker's modification time is its last use).

    Raises:
        FileNotFoundError: the folder holds no pull marker, or an eviction moved it away meanwhile.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        marker = self.folder / PULL_MARKER
        fd = os.open(marker, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while an eviction moves this very copy
            if os.fstat(fd).st_ino != os.stat(marker).st_ino:
                raise FileNotFoundError(f"{self.folder} was evicted while it was being leased")
            touch(marker)
        except OSError:
            os.close(fd)
            raise
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                touch(self.folder / PULL_MARKER)  # its last use: now
            os.close(self._fd)
            self._fd = None


def pull_leased(spec: str | AdapterRef, endpoint: str | None = None, token: str | None = None):
    """`hub.client.Registry.pull` into this cache, and a lease on the copy taken before anyone can evict it:
    (PullResult, Lease).

    Raises:
        LoradockError: what `pull` raises, or the copy was evicted (by other processes) three
            times between its pull and its lease.
    """
    from hub.client import registry

    for _ in range(3):
        result = registry(endpoint, token).pull(spec)
        try:
            return result, Lease(result.path)
        except FileNotFoundError:
            continue
    raise LoradockError(f"the pulled copy of {spec} kept being evicted by other processes",
                        "raise --adapter-cache-mb on the servers sharing this LORADOCK_HOME")


def touch(path: Path) -> None:
    """Set the modification time to now, to the clock's precision (a bare utime takes the kernel's
    coarse clock, a few milliseconds, and two uses that close would tie)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def copies(under: Path | None = None) -> list[Path]:
    """Every complete pulled copy (staging folders of pulls in progress are not copies)."""
    base = under or root()
    return [folder for folder in base.glob("*/*/*")
            if not folder.name.startswith(".") and (folder / PULL_MARKER).is_file()]


def size_of(folder: Path) -> int:
    total = 0
    for parent, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(parent, name)).st_size
    return total


def last_used(folder: Path) -> float:
    try:
        return (folder / PULL_MARKER).stat().st_mtime
    except OSError:
        return 0.0


def evict(cap_bytes: int, under: Path | None = None) -> list[Path]:
    """Delete the least recently used copies that nobody leases until the rest fit in `cap_bytes`;
    the copies deleted. Leased copies count towards the cap but stay, even when they alone exceed it."""
    base = under or root()
    for leftover in base.glob("*/*/.*.evicting-*"):  # an eviction that stopped half-way
        shutil.rmtree(leftover, ignore_errors=True)
    found = {folder: size_of(folder) for folder in copies(base)}
    total, evicted = sum(found.values()), []
    for folder in sorted(found, key=last_used):
        if total <= cap_bytes:
            break
        if _remove_unless_leased(folder):
            total -= found[folder]
            evicted.append(folder)
    return evicted


def _remove_unless_leased(folder: Path) -> bool:
    try:
        fd = os.open(folder / PULL_MARKER, os.O_RDONLY)
    except OSError:
        return False  # gone already: another eviction took it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # leased
        doomed = folder.with_name(f".{folder.name}.evicting-{os.getpid()}")
        try:
            os.replace(folder, doomed)
        except OSError:
            return False
    finally:
        os.close(fd)
    shutil.rmtree(doomed, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()  # the repo's folder, when this was its last copy
    return True
