"""Reading (prompt, response) data in every format loradock accepts, and turning it into chats.

Files: JSONL, JSON (a list of objects), CSV, Parquet, or a folder saved with `datasets`'
`save_to_disk`. Rows: `{"prompt", "response"}`, `{"prompt", "completion"}`, Alpaca's
`{"instruction", "input", "output"}` or `{"messages": [{"role", "content"}, ...]}`; an optional
`system` field adds a system turn. `columns` renames fields first (`{"q": "prompt", "a": "response"}`).

A row that cannot become a chat is not an exception: it is a `RowProblem` with a typed reason and
its row number (the line number for JSONL and CSV, 1-based), which the data check reports. That
holds for rows broken in their bytes too (not UTF-8, JSON nested deeper than Python parses, a
lone surrogate), while a file that is not text at all, or not Parquet, is one `LoradockError`.
Files are read as bytes and decoded line by line: a UTF-8 BOM and Windows line ends (CRLF) are
read as text. Rows are yielded one at a time (`iter_rows`), so a check can stream them; a .json
file is the exception, parsed whole.
"""

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loradock.errors import LoradockError
from sft.chat_format import ROLES

FORMATS = ".jsonl, .json, .csv, .parquet or a folder saved with datasets' save_to_disk"

# Typed reasons a row is dropped, in report order, with the words the report uses.
REASONS = {
    "malformed": "malformed JSON",
    "malformed_csv": "malformed CSV",
    "not_utf8": "not UTF-8",
    "too_deep": "nested too deep",
    "surrogate": "lone surrogate",
    "missing_field": "missing field",
    "wrong_type": "wrong type",
    "unknown_role": "unknown role",
    "empty_response": "empty response",
    "too_long": "over max length",
    "untokenizable": "tokenizer failed",
    "template_refused": "template refused",  # the chat template raises on the row's turns (its roles, mostly)
    "untrained": "no trained token",  # the template marks no token of the row for training
    # preference rows (`--objective dpo`, sft.preference_data)
    "empty_side": "empty side",
    "same_answers": "same answers",
    "no_prompt": "no shared prompt",
}

# What the user does about each reason, printed under it in the report.
FIXES = {
    "malformed": "write one JSON object per line",
    "malformed_csv": "quote fields that hold commas, quotes or line breaks (one record per line otherwise)",
    "not_utf8": "save the file as UTF-8 (from latin-1: iconv -f latin1 -t utf-8 FILE > FILE.utf8)",
    "too_deep": "flatten the row: a row is one object of text fields (prompt and response, or messages)",
    "surrogate": "a \\ud800-\\udfff escape is half of a surrogate pair: pair it or remove it",
    "missing_field": "add the field, or name yours with --columns prompt=...,response=...",
    "wrong_type": "write every prompt, response and message content as text",
    "unknown_role": f"use the roles {', '.join(ROLES)}",
    "empty_response": "write the answer, or remove the row",
    "too_long": "shorten the row, or raise --max-length",
    "untokenizable": "fix the text the tokenizer names, or remove the row",
    "template_refused": "merge or drop the turns the chat template refuses (a system turn, two turns of one role in "
                        "a row), or pass --chat-template FILE.jinja that accepts them",
    "untrained": "use a chat template whose {% generation %} markers cover the assistant answers",
    "empty_side": "write both answers, the preferred (chosen) and the other (rejected), or remove the row",
    "same_answers": "a pair teaches a preference only when its answers differ: fix or remove the row",
    "no_prompt": "give the row a prompt (\"prompt\": text or messages), or chosen and rejected conversations "
                 "that share their turns up to the answer",
}

BOM = b"\xef\xbb\xbf"
SNIFF_BYTES = 8192  # how much of a text file is looked at to tell it is not text
BINARY_SHARE = 0.25  # more of those bytes not UTF-8 than this: the file is not text
# The first bytes of files that are often passed as text by mistake: what each is, and the fix.
MAGIC = {
    b"\x1f\x8b": ("gzip-compressed", "decompress it first (gunzip FILE) and pass the file inside"),
    b"\x28\xb5\x2f\xfd": ("zstd-compressed", "decompress it first (zstd -d FILE) and pass the file inside"),
    b"BZh": ("bzip2-compressed", "decompress it first (bunzip2 FILE) and pass the file inside"),
    b"\xfd7zXZ\x00": ("xz-compressed", "decompress it first (unxz FILE) and pass the file inside"),
    b"PK\x03\x04": ("a zip archive", "unzip it and pass the data file inside"),
    b"PAR1": ("a Parquet file", "name it .parquet"),
    b"\xff\xfe": ("UTF-16 text", "save it as UTF-8 (iconv -f utf-16 -t utf-8 FILE > FILE.utf8)"),
    b"\xfe\xff": ("UTF-16 text", "save it as UTF-8 (iconv -f utf-16 -t utf-8 FILE > FILE.utf8)"),
}
CSV_FIELD_LIMIT = 64 * 2**20  # characters; csv's default of 128 KiB refuses long but valid answers
PARQUET_BATCH_ROWS = 4096


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
    return list(iter_rows(path))


def iter_rows(path: str | Path) -> Iterator[Row]:
    """The records of a data file one at a time, numbered as a user would find them in the file.

    The file is opened and looked at before this returns, so a missing, binary or unreadable file
    is raised here, not halfway through the rows.

    Raises:
        LoradockError: the file is missing, of an unknown type, or not readable as its type at all.
    """
    path = Path(path)
    if not path.exists():
        raise LoradockError(f"data file {str(path)!r} does not exist", f"pass an existing file ({FORMATS})")
    if path.is_dir():
        return _read_saved_dataset(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".csv"):
        _refuse_binary(path, suffix)
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".json":
        return iter(_read_json(path))
    if suffix == ".csv":
        return _csv_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    raise LoradockError(f"cannot read {str(path)!r}: unknown file type {suffix or '(none)'!r}", f"use {FORMATS}")


def _refuse_binary(path: Path, suffix: str) -> None:
    """One error for a text-format file that is not text: compressed, an archive, or NUL bytes."""
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    for magic, (what, fix) in MAGIC.items():
        if head.startswith(magic):
            raise LoradockError(f"{path} is {what}, not {suffix} text", fix)
    if b"\0" in head:
        raise LoradockError(f"{path} is binary data, not text: byte offset {head.index(0)} is a NUL byte",
                            f"pass a UTF-8 text file ({FORMATS})")
    # A latin-1 file has a few bytes that are not UTF-8 (each its row's finding); garbage is mostly them.
    undecodable = head.decode("utf-8", "replace").count("\ufffd")
    if head and undecodable > BINARY_SHARE * len(head):
        raise LoradockError(f"{path} is binary data, not text: {undecodable} of its first {len(head)} bytes "
                            "are not UTF-8", f"pass a UTF-8 text file ({FORMATS})")


def _lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, bytes) of each line, a UTF-8 BOM taken off the first."""
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if number == 1 and raw.startswith(BOM):
                raw, start = raw[len(BOM):], start + len(BOM)
            yield number, start, raw


def _not_utf8(number: int, start: int, raw: bytes, error: UnicodeDecodeError) -> RowProblem:
    return RowProblem("not_utf8", f"line {number}: byte 0x{raw[error.start]:02x} at byte offset "
                                  f"{start + error.start} is not UTF-8")


def _jsonl_rows(path: Path) -> Iterator[Row]:
    for number, start, raw in _lines(path):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield Row(number, _not_utf8(number, start, raw, e))
            continue
        if line.strip():
            yield Row(number, _parse_json_line(number, line))


def _parse_json_line(number: int, line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return RowProblem("malformed", f"line {number}: {e.msg}")
    except RecursionError:
        return RowProblem("too_deep", f"line {number}: JSON nested deeper than Python's parser goes")


def _csv_rows(path: Path) -> Iterator[Row]:
    """CSV records numbered by their last line (the header is line 1); a record with a line that is
    not UTF-8 is a bad row naming the first such byte."""
    bad_lines = {}  # line number -> the problem of its first byte that is not UTF-8

    def text_lines() -> Iterator[str]:
        for number, start, raw in _lines(path):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad_lines[number] = _not_utf8(number, start, raw, e)
                yield raw.decode("utf-8", "replace")

    previous_limit = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        reader = csv.DictReader(text_lines())
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                record = RowProblem("malformed_csv", f"line {reader.line_num}: {e}")
            # the lines this record was read from are the ones still in bad_lines up to line_num
            problems = [bad_lines.pop(n) for n in sorted(bad_lines) if n <= reader.line_num]
            yield Row(reader.line_num, problems[0] if problems else record)
    finally:
        csv.field_size_limit(previous_limit)


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fix = "pass the Parquet file whole (a copy cut short is unreadable), or export the data again"
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise LoradockError(f"{path} is not a readable Parquet file ({e})", fix) from None

    def rows() -> Iterator[Row]:
        number = 0
        try:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                for record in batch.to_pylist():
                    number += 1
                    yield Row(number, record)
        except (pa.ArrowException, OSError) as e:
            raise LoradockError(f"{path} is not a readable Parquet file: reading stopped after row {number} ({e})",
                                fix) from None

    return rows()


def _read_json(path: Path) -> list[Row]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LoradockError(f"{path} is not UTF-8: byte 0x{data[e.start]:02x} at byte offset {e.start}",
                            FIXES["not_utf8"]) from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise LoradockError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})",
                            "fix the file, or write one JSON object per line as .jsonl") from None
    except RecursionError:
        raise LoradockError(f"{path} holds JSON nested deeper than Python's parser goes",
                            FIXES["too_deep"]) from None
    if isinstance(records, dict) and len(records) == 1 and isinstance(next(iter(records.values())), list):
        records = next(iter(records.values()))  # {"train": [...]} or {"data": [...]}
    if not isinstance(records, list):
        raise LoradockError(f"{path} holds a JSON {type(records).__name__}, not a list of records",
                            'write a list: [{"prompt": ..., "response": ...}, ...]')
    return [Row(i, record) for i, record in enumerate(records, start=1)]


def _read_saved_dataset(path: Path) -> Iterator[Row]:
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
    return (Row(i, record) for i, record in enumerate(dataset, start=1))


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
        if ours not in ("prompt", "response", "completion", "instruction", "input", "output", "messages", "system",
                        "chosen", "rejected"):
            raise LoradockError(f"--columns names an unknown field {ours!r}",
                                "map to prompt, response, system, instruction, input, output, messages, "
                                "chosen or rejected")
        mapping[theirs] = ours
    return mapping


def renamed(record: object, columns: dict[str, str] | None) -> dict:
    """The record as an object with our field names.

    Raises:
        RowProblem: the line was unreadable, or the record is not an object.
    """
    if isinstance(record, RowProblem):
        raise record
    if not isinstance(record, dict):
        raise RowProblem("wrong_type", f"a row must be an object, got {type(record).__name__}")
    return {columns.get(key, key): value for key, value in record.items()} if columns else record


def to_messages(record: object, columns: dict[str, str] | None = None) -> list[dict]:
    """One record as a chat: a list of {"role", "content"} with at least one assistant answer.

    Raises:
        RowProblem: the record cannot be trained on, with the reason.
    """
    record = renamed(record, columns)
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
    clean = check_turns(messages)
    answers = [m for m in clean if m["role"] == "assistant"]
    if not answers:
        raise RowProblem("missing_field", "no assistant message to learn")
    if any(not m["content"].strip() for m in answers):
        raise RowProblem("empty_response", "an assistant answer is empty")
    return clean


def check_turns(messages: object, field: str = "messages") -> list[dict]:
    """A list of {"role", "content"} messages, each checked, as plain dicts."""
    if not isinstance(messages, list) or not messages:
        raise RowProblem("wrong_type", f"{field!r} must be a non-empty list")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowProblem("missing_field", f"message {i} needs 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise RowProblem("unknown_role", f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowProblem("wrong_type", f"message {i} content must be text, got {type(content).__name__}")
        if not content.isascii():
            _refuse_surrogates(i, content)
        clean.append({"role": role, "content": content})
    return clean


def _refuse_surrogates(i: int, content: str) -> None:
    """A lone surrogate (JSON's "\\ud800") is a str Python holds but no UTF-8 tokenizer can read."""
    try:
        content.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowProblem("surrogate", f"message {i} holds a lone surrogate \\u{ord(content[e.start]):04x} "
                                      f"at character {e.start}") from None


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
