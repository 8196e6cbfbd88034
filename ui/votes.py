"""Blind A/B votes in SQLite (`$LORADOCK_HOME/ui/votes.sqlite` by default), and their export as
training data (`loradock votes export`, or the screen's Export button):

- a preference dataset, `preferences.jsonl`, one JSON line per decided vote: `prompt`, `chosen`,
  `rejected` (and `system` when the conversation had one): what DPO-style trainers read;
- an SFT dataset of the preferred answers, `sft.jsonl`: `prompt`, `response` (and `system`), which
  `loradock data check` and `loradock train` accept as they are.

A vote records both sides the same way: the name the endpoint served the model under, its repo
in the registry ('' for a model that is not from it, such as the base model) and its revision
(the commit sha, or the name when there is none). The win rates and the ranking over these
revisions are ui/ratings.py's.

A vote is keyed by (browser session, turn): voting again on the same turn replaces the vote, and
one session's votes never touch another's. A database written before votes recorded both sides
(base model against adapter) is migrated in place, once, in one transaction.
"""

import json
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from loradock.errors import LoradockError
from loradock.home import home

CHOICES = ("A", "B", "tie", "both_bad")
DECIDED = ("A", "B")
SCHEMA = """
CREATE TABLE IF NOT EXISTS votes (
    session_id TEXT NOT NULL,
    turn_id TEXT NOT NULL,
    created_at REAL NOT NULL,         -- unix time, seconds
    system TEXT NOT NULL,             -- the system prompt ('' when none)
    prompt TEXT NOT NULL,             -- the user's message of this turn
    answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('A', 'B', 'tie', 'both_bad')),
    model_a TEXT NOT NULL,            -- the name the endpoint served side A under, e.g. alice/reverse@v1
    repo_a TEXT NOT NULL,             -- its repo id in the registry ('' when it is not from the registry)
    revision_a TEXT NOT NULL,         -- its commit sha in the registry (the name when it has none)
    model_b TEXT NOT NULL,
    repo_b TEXT NOT NULL,
    revision_b TEXT NOT NULL,
    PRIMARY KEY (session_id, turn_id)
)"""
# The columns of the first schema (base model against one adapter), which `migrate` rewrites.
OLD_COLUMNS = {"base_model", "adapter", "adapter_revision", "adapter_side"}
# An old adapter's repo is its name up to any @revision: the first schema did not record it.
REPO_OF_ADAPTER = "CASE WHEN instr(adapter, '@') THEN substr(adapter, 1, instr(adapter, '@') - 1) ELSE adapter END"
MIGRATE = f"""
INSERT INTO votes_both_sides
SELECT session_id, turn_id, created_at, system, prompt, answer_a, answer_b, choice,
       CASE adapter_side WHEN 'A' THEN adapter ELSE base_model END,
       CASE adapter_side WHEN 'A' THEN {REPO_OF_ADAPTER} ELSE '' END,
       CASE adapter_side WHEN 'A' THEN adapter_revision ELSE base_model END,
       CASE adapter_side WHEN 'B' THEN adapter ELSE base_model END,
       CASE adapter_side WHEN 'B' THEN {REPO_OF_ADAPTER} ELSE '' END,
       CASE adapter_side WHEN 'B' THEN adapter_revision ELSE base_model END
FROM votes"""


def default_path() -> Path:
    return home() / "ui" / "votes.sqlite"


@dataclass
class Side:
    """One side of a blind comparison, as the vote records it."""
    model: str  # the name the endpoint served it under: a base model, alice/reverse, alice/reverse@v1
    repo: str = ""  # its repo id in the registry; '' when it is not from the registry (a base model, a local folder)
    revision: str = ""  # its commit sha in the registry; '' stores the name, for a model that has none

    def __post_init__(self):
        self.revision = self.revision or self.model


@dataclass
class Vote:
    session_id: str
    turn_id: str
    system: str
    prompt: str
    answer_a: str
    answer_b: str
    choice: str
    a: Side
    b: Side

    def __post_init__(self):
        if self.choice not in CHOICES:
            raise ValueError(f"vote {self.choice!r} is not one of {', '.join(CHOICES)}")

    def row(self) -> dict:
        sides = {f"{k}_{s}": v for s, side in (("a", self.a), ("b", self.b)) for k, v in vars(side).items()}
        return {k: v for k, v in vars(self).items() if k not in ("a", "b")} | sides


def connect(path: Path) -> sqlite3.Connection:
    """One connection per call: Streamlit runs each browser session in its own thread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=30)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    if not columns(db) >= {"model_a", "revision_b"}:
        migrate(db)
    return db


def columns(db: sqlite3.Connection) -> set[str]:
    return {row["name"] for row in db.execute("PRAGMA table_info(votes)")}


def migrate(db: sqlite3.Connection) -> None:
    """Create the table, or rewrite one of the first schema (old rows: the base side gets
    base_model and no repo, the adapter side gets adapter, its name up to any @ as the repo, and
    adapter_revision), in one write
    transaction: another process that got there first leaves nothing to do, and none sees half."""
    db.execute("BEGIN IMMEDIATE")  # the write lock first, then look again
    try:
        found = columns(db)
        if found >= OLD_COLUMNS:
            db.execute(SCHEMA.replace("IF NOT EXISTS votes", "votes_both_sides"))
            db.execute(MIGRATE)
            db.execute("DROP TABLE votes")
            db.execute("ALTER TABLE votes_both_sides RENAME TO votes")
        elif not found:
            db.execute(SCHEMA)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def record(path: Path, vote: Vote) -> None:
    fields = vote.row() | {"created_at": time.time()}
    with connect(path) as db:
        db.execute(f"INSERT OR REPLACE INTO votes ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))})",
                   list(fields.values()))


def session_votes(path: Path, session_id: str) -> list[dict]:
    with connect(path) as db:
        return [dict(r) for r in db.execute("SELECT * FROM votes WHERE session_id = ? ORDER BY created_at", (session_id,))]


def outcomes(path: Path) -> list[dict]:
    """Every vote's sides and choice, oldest first: what ui/ratings.py rates."""
    query = "SELECT model_a, repo_a, revision_a, model_b, repo_b, revision_b, choice FROM votes ORDER BY created_at"
    with connect(path) as db:
        return [dict(r) for r in db.execute(query)]


@dataclass
class Selection:
    """Which votes an export takes: those with either side from `repo`, and either side at `revision`
    (a commit sha, or a prefix of at least 7 characters of one; the name for a model without one)."""
    repo: str | None = None
    revision: str | None = None

    def where(self) -> tuple[str, list]:
        clauses, params = [], []
        if self.repo:
            clauses.append("(repo_a = ? OR repo_b = ?)")
            params += [self.repo, self.repo]
        if self.revision:
            if len(self.revision) >= 7:  # a full sha, or a prefix of one
                clauses.append("(substr(revision_a, 1, ?) = ? OR substr(revision_b, 1, ?) = ?)")
                params += [len(self.revision), self.revision] * 2
            else:
                clauses.append("(revision_a = ? OR revision_b = ?)")
                params += [self.revision] * 2
        return " AND ".join(clauses) or "1", params

    def words(self) -> str:
        named = [f"--adapter {self.repo}"] * bool(self.repo) + [f"--revision {self.revision}"] * bool(self.revision)
        return " ".join(named) or "all votes"


def training_rows(path: Path, selection: Selection | None = None) -> tuple[list[dict], list[dict]]:
    """(preference rows, SFT rows) from the selected votes that picked a side; ties and 'both bad'
    teach nothing, nor a preference between two equal answers."""
    where, params = (selection or Selection()).where()
    query = f"SELECT * FROM votes WHERE choice IN ('A', 'B') AND {where} ORDER BY created_at"
    with connect(path) as db:
        votes = [dict(r) for r in db.execute(query, params)]
    preferences, sft = [], []
    for v in votes:
        chosen, rejected = (v["answer_a"], v["answer_b"]) if v["choice"] == "A" else (v["answer_b"], v["answer_a"])
        system = {"system": v["system"]} if v["system"] else {}
        if chosen != rejected:  # a preference between equal answers teaches nothing (and data check refuses it)
            preferences.append({"prompt": v["prompt"], "chosen": chosen, "rejected": rejected, **system})
        sft.append({"prompt": v["prompt"], "response": chosen, **system})
    return preferences, sft


def decided_revisions(path: Path) -> list[str]:
    """'repo @ revision' of every side that has a decided vote: what an export could select."""
    query = """SELECT DISTINCT repo, revision FROM (
                   SELECT repo_a AS repo, revision_a AS revision, choice FROM votes
                   UNION ALL SELECT repo_b, revision_b, choice FROM votes)
               WHERE choice IN ('A', 'B') ORDER BY repo, revision"""
    with connect(path) as db:
        return [f"{r['repo'] or '(not from the registry)'} @ {r['revision']}" for r in db.execute(query)]


PREFERENCES, SFT = "preferences.jsonl", "sft.jsonl"


def export(path: Path, folder: Path, selection: Selection | None = None) -> tuple[Path, Path, int]:
    """Write preferences.jsonl and sft.jsonl into `folder` (each appears whole or not at all);
    returns both paths and the row count.

    Raises:
        LoradockError: no selected vote picked a side (nothing is written then).
    """
    selection = selection or Selection()
    preferences, sft = training_rows(path, selection)
    if not sft:
        known = decided_revisions(path)
        raise LoradockError(
            f"no decided votes (A or B is better) for {selection.words()} in {path}: there is nothing to export",
            ("pass the --adapter REPO or --revision SHA of a side that has some (REPO @ SHA): " + "; ".join(known))
            if known else
            "vote in `loradock ui` (Blind A/B), picking a side on some turns; ties and 'both bad' teach nothing")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in ((PREFERENCES, preferences), (SFT, sft)):
        written.append(write_atomically(folder / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)))
    return written[0], written[1], len(sft)


def write_atomically(target: Path, text: str) -> Path:
    """Write a hidden sibling, then rename it into place: a reader sees the old file or the new one."""
    fd, staged = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(staged, target)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise
    return target


def push(files: list[Path], repo_id: str, registry: str | None = None, token: str | None = None,
         message: str = "loradock votes export") -> str:
    """Commit `files` (at the repo's top level) to the registry's dataset repo `repo_id` in one
    commit, creating the repo when it is missing; returns the commit sha a training run can cite.

    Raises:
        LoradockError: a bad repo id; the registry's refusals and absence, as hub/'s typed errors.
    """
    from hub.client import registry as door

    return door(registry, token).push_dataset_files(repo_id, files, message)
