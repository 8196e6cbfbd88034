"""Reading (prompt, response) data in every format loradock accepts, and turning it into chats.

Files: JSONL, JSON (a list of objects), CSV, Parquet, or a folder saved with `datasets`'
`save_to_disk`. Rows: `{"prompt", "response"}`, `{"prompt", "completion"}`, Alpaca's
`{"instruction", "input", "output"}` or `{"messages": [{"role", "content"}, ...]}`; an optional
`system` field adds a system turn. `columns` renames fields first (`{"q": "prompt", "a": "response"}`).

A row that cannot become a chat is not an exception: it is a `RowProblem` with a typed reason and
its row number (the line number for JSONL and CSV, 1-based), which the data check reports.
"""

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from loradock.errors import LoradockError
from sft.chat_format import ROLES

FORMATS = ".jsonl, .json, .csv, .parquet or a folder saved with datasets' save_to_disk"

# Typed reasons a row is dropped, in report order, with the words the report uses.
REASONS = {
    "malformed": "malformed JSON",
    "missing_field": "missing field",
    "wrong_type": "wrong type",
    "unknown_role": "unknown role",
    "empty_response": "empty response",
    "too_long": "over max length",
    "untrained": "no trained token",  # the template marks no token of the row for training
}


@dataclass
class RowProblem(Exception):
    reason: str  # a key of REASONS
    detail: str


@dataclass
class Row:
    number: int  # 1-based line (JSONL, CSV) or record (JSON, Parquet, datasets) number
    data: object  # the parsed record, or a RowProblem when the line itself is unreadable


def read_rows(path: str | Path) -> list[Row]:
    """Every record of a data file, numbered as a user would find it in the file."""
    path = Path(path)
    if not path.exists():
        raise LoradockError(f"data file {str(path)!r} does not exist", f"pass an existing file ({FORMATS})")
    if path.is_dir():
        return _read_saved_dataset(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return [Row(reader.line_num, record) for record in reader]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [Row(i, record) for i, record in enumerate(pq.read_table(path).to_pylist(), start=1)]
    raise LoradockError(f"cannot read {str(path)!r}: unknown file type {suffix or '(none)'!r}", f"use {FORMATS}")


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(Row(number, json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append(Row(number, RowProblem("malformed", f"line {number}: {e.msg}")))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LoradockError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})",
                            "fix the file, or write one JSON object per line as .jsonl") from None
    if isinstance(records, dict) and len(records) == 1 and isinstance(next(iter(records.values())), list):
        records = next(iter(records.values()))  # {"train": [...]} or {"data": [...]}
    if not isinstance(records, list):
        raise LoradockError(f"{path} holds a JSON {type(records).__name__}, not a list of records",
                            'write a list: [{"prompt": ..., "response": ...}, ...]')
    return [Row(i, record) for i, record in enumerate(records, start=1)]


def _read_saved_dataset(path: Path) -> list[Row]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except FileNotFoundError:
        raise LoradockError(f"{path} is a folder but not a dataset saved with datasets' save_to_disk",
                            f"pass a data file ({FORMATS})") from None
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise LoradockError(f"the dataset in {path} has splits {list(dataset)} but no 'train'",
                                "save the split to train on as 'train'")
        dataset = dataset["train"]
    assert isinstance(dataset, Dataset)
    return [Row(i, record) for i, record in enumerate(dataset, start=1)]


def parse_columns(spec: str | dict | None) -> dict[str, str]:
    """`prompt=q,response=a` (ours=theirs) as {theirs: ours}, the renaming to apply to each row."""
    if not spec:
        return {}
    pairs = spec.items() if isinstance(spec, dict) else (p.split("=", 1) for p in spec.split(",") if p.strip())
    mapping = {}
    for pair in pairs:
        if len(pair) != 2 or not pair[0].strip() or not pair[1].strip():
            raise LoradockError(f"--columns {spec!r} is not a list of ours=theirs pairs",
                                "write it as --columns prompt=question,response=answer")
        ours, theirs = (part.strip() for part in pair)
        if ours not in ("prompt", "response", "completion", "instruction", "input", "output", "messages", "system"):
            raise LoradockError(f"--columns names an unknown field {ours!r}",
                                "map to prompt, response, system, instruction, input, output or messages")
        mapping[theirs] = ours
    return mapping


def to_messages(record: object, columns: dict[str, str] | None = None) -> list[dict]:
    """One record as a chat: a list of {"role", "content"} with at least one assistant answer.

    Raises:
        RowProblem: the record cannot be trained on, with the reason.
    """
    if isinstance(record, RowProblem):
        raise record
    if not isinstance(record, dict):
        raise RowProblem("wrong_type", f"a row must be an object, got {type(record).__name__}")
    if columns:
        record = {columns.get(key, key): value for key, value in record.items()}
    if "messages" in record:
        return _check_messages(record["messages"])
    if "instruction" in record or "output" in record:
        instruction, extra, answer = (record.get(k) for k in ("instruction", "input", "output"))
        _require(("instruction", instruction), ("output", answer))
        if extra is not None and not isinstance(extra, str):
            raise RowProblem("wrong_type", f"'input' must be text, got {type(extra).__name__}")
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    else:
        answer_key = "completion" if "completion" in record and "response" not in record else "response"
        prompt, answer = record.get("prompt"), record.get(answer_key)
        _require(("prompt", prompt), (answer_key, answer))
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    system = record.get("system")
    if system is not None:
        _require(("system", system))
        messages.insert(0, {"role": "system", "content": system})
    return _check_messages(messages)


def _require(*fields: tuple[str, object]) -> None:
    for name, value in fields:
        if value is None:
            raise RowProblem("missing_field", f"no {name!r} field")
        if not isinstance(value, str):
            raise RowProblem("wrong_type", f"{name!r} must be text, got {type(value).__name__}")


def _check_messages(messages: object) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RowProblem("wrong_type", "'messages' must be a non-empty list")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowProblem("missing_field", f"message {i} needs 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise RowProblem("unknown_role", f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowProblem("wrong_type", f"message {i} content must be text, got {type(content).__name__}")
        clean.append({"role": role, "content": content})
    answers = [m for m in clean if m["role"] == "assistant"]
    if not answers:
        raise RowProblem("missing_field", "no assistant message to learn")
    if any(not m["content"].strip() for m in answers):
        raise RowProblem("empty_response", "an assistant answer is empty")
    return clean


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """The conversation up to the last answer, and that answer: what evaluation asks and expects."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def dataset_sha256(path: str | Path) -> str:
    """sha256 of the data file's bytes (of every file, in name order, for a saved dataset folder)."""
    path, digest = Path(path), hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
