"""loradock hub gc [--root DIR] [--dry-run] [--grace SECONDS]

Removes the blobs no commit references: the files of deleted repos, and those of commits that were
refused after their files were stored (a push that lost a race on its parent commit, a killed one).

Safe while `loradock hub serve` runs on the same root:
- it decides and deletes inside one SQLite write transaction, so no commit can add a reference
  meanwhile (a commit checks, under the same lock, that the LFS objects it links are still there);
- it keeps blobs modified less than `grace` seconds ago: an LFS object uploaded but not committed
  yet (its upload URL lives an hour), or an inline file a commit has just stored;
- it never looks into `tmp/`, where uploads are received.
It deletes only unreferenced files, so it can be killed at any point and run again. Anything in
`blobs/` that is not a blob (`blobs/ab/<64 hex starting with ab>`) is reported and left alone.
"""

import os
import sqlite3
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from hub.objects import SHA256_HEX
from loradock.errors import LoradockError

GRACE = 7200  # seconds: twice the life of an LFS upload URL
SHARD = set("0123456789abcdef")


@dataclass
class GcReport:
    """What one run removed (with `dry_run`: would remove); sizes in bytes."""

    removed: int = 0  # unreferenced blobs older than the grace period
    reclaimed: int = 0  # their bytes
    recent: int = 0  # unreferenced blobs kept because they are younger than the grace period
    referenced: int = 0  # blobs some commit references
    empty_shards: int = 0  # shard folders removed because they were (left) empty
    foreign: list[str] = field(default_factory=list)  # entries of blobs/ that are not blobs, left alone
    dry_run: bool = False


def collect(root: Path, grace: float = GRACE, dry_run: bool = False) -> GcReport:
    """Remove the blobs of the registry at `root` that no commit references and that are older than
    `grace` seconds, and the shard folders left empty; with `dry_run`, only count them.

    Raises:
        LoradockError: `root` holds no registry, or its database stayed locked for 30 s.
    """
    root = Path(root)
    database = root / "registry.sqlite"
    if not database.is_file():
        raise LoradockError(f"there is no registry at {root}: {database} does not exist",
                            "pass the --root that `loradock hub serve` uses (default: $LORADOCK_HOME/registry)")
    report = GcReport(dry_run=dry_run)
    shards = scan(root / "blobs", report)
    db = sqlite3.connect(database, timeout=30, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        # The write lock although nothing is written to the database: commits wait while blobs go.
        # A dry run only reads, from one snapshot.
        db.execute("BEGIN" if dry_run else "BEGIN IMMEDIATE")
        referenced = {row[0] for row in db.execute("SELECT DISTINCT sha256 FROM tree_entries")}
        cutoff = time.time() - grace
        for shard, names in shards.items():
            sweep(root / "blobs" / shard, names, referenced, cutoff, report)
        db.execute("ROLLBACK")
    except sqlite3.OperationalError as e:
        raise LoradockError(f"could not read the registry database {database}: {e}",
                            "if it is busy, run `loradock hub gc` again; otherwise check that --root is a registry") from None
    finally:
        db.close()
    return report


def scan(blobs: Path, report: GcReport) -> dict[str, list[str]]:
    """The names in each shard folder of `blobs/`, in order; entries that are not shard folders go
    to `report.foreign`."""
    shards: dict[str, list[str]] = {}
    if not blobs.is_dir():
        return shards
    for entry in sorted(os.scandir(blobs), key=lambda e: e.name):
        if len(entry.name) == 2 and set(entry.name) <= SHARD and entry.is_dir(follow_symlinks=False):
            shards[entry.name] = sorted(os.listdir(entry.path))
        else:
            report.foreign.append(f"blobs/{entry.name}")
    return shards


def sweep(shard: Path, names: list[str], referenced: set[str], cutoff: float, report: GcReport) -> None:
    """Remove the unreferenced blobs of one shard modified before `cutoff`, then the shard if that
    leaves it empty."""
    left = 0
    for name in names:
        if name in referenced:
            report.referenced += 1
            left += 1
            continue
        try:
            info = os.lstat(shard / name)
        except FileNotFoundError:  # gone since the scan (another gc, or by hand)
            continue
        if not (SHA256_HEX.fullmatch(name) and name.startswith(shard.name) and stat.S_ISREG(info.st_mode)):
            report.foreign.append(f"blobs/{shard.name}/{name}")
            left += 1
        elif info.st_mtime > cutoff:
            report.recent += 1
            left += 1
        elif report.dry_run or _unlink(shard / name):
            report.removed += 1
            report.reclaimed += info.st_size
    if left == 0:
        if not report.dry_run:
            try:
                shard.rmdir()
            except OSError:  # a blob has just landed in it
                return
        report.empty_shards += 1


def _unlink(path: Path) -> bool:
    """Whether this call removed `path` (False: it was gone already)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def human(size: int) -> str:
    """A byte count the way people read it: 812 bytes, 12.3 MiB."""
    if size < 1024:
        return f"{size} bytes"
    value = size / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def describe(report: GcReport, grace: float) -> list[str]:
    """The lines `loradock hub gc` prints."""
    verb = "would remove" if report.dry_run else "removed"
    lines = [f"{verb} {report.removed} unreferenced blob{'s' * (report.removed != 1)}: "
             f"{human(report.reclaimed)} ({report.reclaimed:,} bytes) {'to reclaim' if report.dry_run else 'reclaimed'}",
             f"kept {report.referenced} referenced blob{'s' * (report.referenced != 1)}"]
    if report.recent:
        lines.append(f"kept {report.recent} unreferenced blob{'s' * (report.recent != 1)} younger than the grace period "
                     f"({grace:g} s): uploaded for a commit that may still come")
    if report.empty_shards:
        lines.append(f"{verb} {report.empty_shards} empty shard folder{'s' * (report.empty_shards != 1)}")
    if report.foreign:
        shown = ", ".join(report.foreign[:10]) + (f" and {len(report.foreign) - 10} more" if len(report.foreign) > 10 else "")
        lines.append(f"left alone {len(report.foreign)} entr{'ies' if len(report.foreign) != 1 else 'y'} "
                     f"of blobs/ that are not blobs: {shown}")
    if report.dry_run:
        lines.append("nothing was deleted (--dry-run)")
    return lines
