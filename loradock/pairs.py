"""Blind pairs sampled from a canary's traffic: while a rollout splits a tag, `loradock serve` asks a
sample of its conversations of both commits (`--canary-pairs PERCENT`) and appends each pair here;
the comparison screen's Canary tab shows them blind, and each vote lands in the votes store with
both commits, where `loradock rollout status` reads the evidence.

One JSON line per pair, in `$LORADOCK_HOME/serve/canary-pairs-PORT.jsonl` (a file per server, so
that replicas sharing a home never write the same file); a line that is not a pair is skipped
where it is read. Shared by `serve` (which writes) and `ui` (which reads).
"""

import dataclasses
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from loradock.home import home

PATTERN = "canary-pairs-*.jsonl"


@dataclass(frozen=True)
class CanaryPair:
    """One conversation of a canary's traffic, answered by the tag's stable commit and by the candidate."""

    id: str
    created_at: float  # unix seconds
    repo_id: str
    tag: str
    stable: str  # commit sha
    candidate: str  # commit sha
    system: str  # the system prompt ('' when none)
    prompt: str  # the conversation's last user message
    answer_stable: str
    answer_candidate: str

    @classmethod
    def from_json(cls, line: str) -> "CanaryPair | None":
        """The pair a line holds; None for a line that is not one (cut short, or of another shape)."""
        try:
            data = json.loads(line)
            pair = cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})
        except (ValueError, KeyError, TypeError):
            return None
        texts = (pair.id, pair.repo_id, pair.tag, pair.stable, pair.candidate, pair.system, pair.prompt,
                 pair.answer_stable, pair.answer_candidate)
        if not all(isinstance(t, str) for t in texts) or not isinstance(pair.created_at, (int, float)):
            return None
        return pair


def folder() -> Path:
    return home() / "serve"


def path_for(port: int) -> Path:
    return folder() / f"canary-pairs-{port}.jsonl"


def append(path: Path, pair: CanaryPair) -> None:
    """Append one pair as one line, under an exclusive lock (a reader never sees half a line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(dataclasses.asdict(pair), ensure_ascii=False) + "\n").encode()
    with open(path, "ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read(where: Path | None = None) -> list[CanaryPair]:
    """Every pair in the files of `where` (a folder, or one file; default `folder()`), oldest first."""
    where = Path(where) if where is not None else folder()
    files = sorted(where.glob(PATTERN)) if where.is_dir() else [where] if where.exists() else []
    pairs = []
    for file in files:
        with open(file, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            text = f.read().decode("utf-8", errors="replace")
        pairs += [p for line in text.splitlines() if line.strip() and (p := CanaryPair.from_json(line))]
    return sorted(pairs, key=lambda p: p.created_at)
