"""Blind A/B votes in SQLite (`$LORADOCK_HOME/ui/votes.sqlite` by default), the win rate of each
adapter revision against its base model, and the export of the votes as training data:

- a preference dataset, one JSON line per decided vote: `prompt`, `chosen`, `rejected` (and
  `system` when the conversation had one): what DPO-style trainers read;
- an SFT dataset of the preferred answers: `prompt`, `response` (and `system`), which
  `loradock data check` and `loradock train` accept as they are.

A vote is keyed by (browser session, turn): voting again on the same turn replaces the vote, and
one session's votes never touch another's.
"""

import json
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loradock.home import home

CHOICES = ("A", "B", "tie", "both_bad")
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
    base_model TEXT NOT NULL,
    adapter TEXT NOT NULL,            -- the name the endpoint served it under, e.g. alice/reverse@v1
    adapter_revision TEXT NOT NULL,   -- its commit sha in the registry (the name when it has none)
    adapter_side TEXT NOT NULL CHECK (adapter_side IN ('A', 'B')),
    PRIMARY KEY (session_id, turn_id)
)"""


def default_path() -> Path:
    return home() / "ui" / "votes.sqlite"


@dataclass
class Vote:
    session_id: str
    turn_id: str
    system: str
    prompt: str
    answer_a: str
    answer_b: str
    choice: str
    base_model: str
    adapter: str
    adapter_revision: str
    adapter_side: str

    def __post_init__(self):
        if self.choice not in CHOICES:
            raise ValueError(f"vote {self.choice!r} is not one of {', '.join(CHOICES)}")
        if self.adapter_side not in ("A", "B"):
            raise ValueError(f"adapter side {self.adapter_side!r} is not A or B")


def connect(path: Path) -> sqlite3.Connection:
    """One connection per call: Streamlit runs each browser session in its own thread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=10)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(SCHEMA)
    return db


def record(path: Path, vote: Vote) -> None:
    fields = asdict(vote) | {"created_at": time.time()}
    with connect(path) as db:
        db.execute(f"INSERT OR REPLACE INTO votes ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))})",
                   list(fields.values()))


def session_votes(path: Path, session_id: str) -> list[dict]:
    with connect(path) as db:
        return [dict(r) for r in db.execute("SELECT * FROM votes WHERE session_id = ? ORDER BY created_at", (session_id,))]


def win_rates(path: Path) -> list[dict]:
    """Per adapter revision: votes, wins and losses against the base, ties, both bad, and the
    win rate (wins / votes)."""
    query = """
        SELECT adapter, adapter_revision AS revision, base_model, COUNT(*) AS votes,
               SUM(choice = adapter_side) AS wins,
               SUM(choice IN ('A', 'B') AND choice != adapter_side) AS losses,
               SUM(choice = 'tie') AS ties, SUM(choice = 'both_bad') AS both_bad
        FROM votes GROUP BY adapter, adapter_revision, base_model ORDER BY adapter, revision"""
    with connect(path) as db:
        rows = [dict(r) for r in db.execute(query)]
    return [r | {"win_rate": round(r["wins"] / r["votes"], 3)} for r in rows]


def training_rows(path: Path) -> tuple[list[dict], list[dict]]:
    """(preference rows, SFT rows) from the votes that picked a side; ties and 'both bad' teach nothing."""
    with connect(path) as db:
        votes = [dict(r) for r in db.execute("SELECT * FROM votes WHERE choice IN ('A', 'B') ORDER BY created_at")]
    preferences, sft = [], []
    for v in votes:
        chosen, rejected = (v["answer_a"], v["answer_b"]) if v["choice"] == "A" else (v["answer_b"], v["answer_a"])
        system = {"system": v["system"]} if v["system"] else {}
        preferences.append({"prompt": v["prompt"], "chosen": chosen, "rejected": rejected, **system})
        sft.append({"prompt": v["prompt"], "response": chosen, **system})
    return preferences, sft


def export(path: Path, folder: Path) -> tuple[Path, Path, int]:
    """Write preferences-TIME.jsonl and sft-TIME.jsonl into `folder`; returns both paths and the row count."""
    preferences, sft = training_rows(path)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    written = []
    for name, rows in (("preferences", preferences), ("sft", sft)):
        target = folder / f"{name}-{stamp}.jsonl"
        target.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        written.append(target)
    return written[0], written[1], len(sft)
