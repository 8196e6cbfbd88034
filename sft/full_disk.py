"""`loradock train` onto a full disk: the problem and the fix instead of a traceback, and nothing
half-written left behind (`sft.train.main` runs the training inside `refusing_a_full_disk`).

The disk fills while a checkpoint or the adapter is being written, and each library says so its own
way: Python raises OSError with errno ENOSPC (EDQUOT for a quota); safetensors and tokenizers, in
Rust, raise their own error with the OS error's number in its text ("No space left on device (os
error 28)"); torch.save raises a RuntimeError ("file write failed") without the number, so that one
counts as a full disk only when the disk is indeed all but full.
"""

import contextlib
import errno
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from hub.pulled import size_of
from loradock.errors import LoradockError

if TYPE_CHECKING:
    from sft.train import RunPaths

FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error shows the errno
NEARLY_FULL = 1 << 20  # bytes free under which a write error that names no cause is taken for a full disk


@contextlib.contextmanager
def refusing_a_full_disk(paths: "RunPaths") -> Iterator[None]:
    """Turn a full disk during the run into a LoradockError naming the folder, the space free and the
    space the run had taken; keep the complete checkpoints (for --resume) and nothing else."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - only a full disk is caught; everything else is raised as it is
        if not out_of_space(error, paths.work):
            raise
        raise full_disk_error(error, paths) from None


def out_of_space(error: BaseException, folder: Path) -> bool:
    """Whether `error` (or one it was raised from) is a write the disk had no room for."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError):
            if error.errno in FULL_DISK_ERRNOS:
                return True
        elif (match := RUST_OS_ERROR.search(str(error))) and int(match[1]) in FULL_DISK_ERRNOS:
            return True
        elif type(error) is RuntimeError and free_bytes(folder) < NEARLY_FULL:  # torch.save's "file write failed"
            return True
        error = error.__cause__ or error.__context__
    return False


def full_disk_error(error: Exception, paths: "RunPaths") -> LoradockError:
    """The message, once what the run wrote is tidied up (`tidy`): the folder, the space that was
    left, and the least the run needs there (what it had written, plus the space that was too little)."""
    filename = getattr(error, "filename", None)
    where = Path(filename).parent if filename else paths.output.parent
    free, written = free_bytes(where), size_of(paths.work)
    kept = tidy(paths)
    problem = (f"the disk holding {where} is full while training into --output {paths.output}: {failure(error)}; "
               f"{shown(free)} were left there; no adapter was written")
    if kept:
        fix = (f"free space on that disk (a checkpoint of this run takes {shown(size_of(kept))}), then run the same "
               f"command with --resume to continue from {kept.name}, kept in {paths.work}; or start again with an "
               "--output on another disk")
    else:
        fix = (f"free space on that disk: this run needs more than {shown(written + free)} there (it had written "
               f"{shown(written)}, removed now), or pass an --output on another disk; checkpoints take space too: "
               "--training.save_total_limit 1 keeps one, --training.save_strategy no none")
    return LoradockError(problem, fix)


def tidy(paths: "RunPaths") -> Path | None:
    """Remove what a full disk left half-written: the adapter being assembled and the incomplete
    checkpoints, or the whole work folder when no complete checkpoint is left to resume from.
    Returns the checkpoint kept for --resume, if any."""
    kept = paths.last_complete_checkpoint() if paths.checkpoints.exists() else None
    if kept is None:
        shutil.rmtree(paths.work, ignore_errors=True)
        return None
    shutil.rmtree(paths.work / "adapter", ignore_errors=True)
    for entry in paths.checkpoints.iterdir():  # the checkpoint being written when the disk filled
        step = entry.name.removeprefix("checkpoint-")
        if entry.is_dir() and not (step.isdigit() and int(step) <= int(kept.name.removeprefix("checkpoint-"))):
            shutil.rmtree(entry, ignore_errors=True)
    return kept


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged write may still take on the disk of `folder` (or of its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def shown(size: int) -> str:
    """A size in bytes, for people: `0 B`, `412 KiB`, `1.3 GiB`."""
    if size < 1 << 10:
        return f"{size} B"
    if size < 1 << 20:
        return f"{size >> 10} KiB"
    return f"{size / (1 << 20):.1f} MiB" if size < 1 << 30 else f"{size / (1 << 30):.1f} GiB"


def failure(error: Exception) -> str:
    """What failed, in one line."""
    if isinstance(error, OSError) and error.strerror:
        return f"writing {error.filename or 'a file'} failed ({error.strerror})"
    text = str(error).strip().splitlines()
    return f"writing a file failed ({type(error).__name__}: {text[0][:300] if text else ''})"
