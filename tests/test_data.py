"""Reading every accepted format, and the data check's report of every kind of bad row."""

import gzip
import json
import random

import pytest

from sft.data import dataset_sha256, parse_columns, read_rows, to_messages
from sft.data_check import MARK_CLOSE, MARK_OPEN, check_data
from tests.conftest import write_jsonl

GOOD = {"prompt": "Repeat the words: cat dog", "response": "cat dog"}
CHAT = [{"role": "user", "content": "Repeat the words: cat dog"}, {"role": "assistant", "content": "cat dog"}]


def check(path, tokenizer, max_length=128, columns=None):
    return check_data(path, tokenizer, tokenizer.chat_template, max_length, columns)


@pytest.mark.parametrize("record", [
    GOOD,
    {"prompt": GOOD["prompt"], "completion": "cat dog"},
    {"instruction": "Repeat the words:", "input": "cat dog", "output": "cat dog"},
    {"messages": CHAT},
], ids=["prompt-response", "prompt-completion", "alpaca", "messages"])
def test_every_record_shape_becomes_a_chat(record):
    messages = to_messages(record)
    assert messages[0]["role"] == "user" and messages[-1] == {"role": "assistant", "content": "cat dog"}
    assert "cat dog" in messages[0]["content"]


def test_system_field_and_column_mapping():
    messages = to_messages({"q": "hi", "a": "hello", "sys": "Be brief."}, parse_columns("prompt=q,response=a,system=sys"))
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}]


def test_every_file_format_reads_the_same_rows(tmp_path, tokenizer):
    import pandas as pd
    from datasets import Dataset

    rows = [{"prompt": f"Repeat the words: w{i}", "response": f"w{i}"} for i in range(5)]
    paths = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", rows),
        "json": tmp_path / "d.json", "csv": tmp_path / "d.csv", "parquet": tmp_path / "d.parquet",
        "datasets": tmp_path / "saved",
    }
    paths["json"].write_text(json.dumps(rows))
    pd.DataFrame(rows).to_csv(paths["csv"], index=False)
    pd.DataFrame(rows).to_parquet(paths["parquet"])
    Dataset.from_list(rows).save_to_disk(str(paths["datasets"]))
    for name, path in paths.items():
        report = check(path, tokenizer)
        assert report.rows_read == 5 and len(report.kept) == 5, name
        assert [e.messages[-1]["content"] for e in report.kept] == [r["response"] for r in rows], name
    assert [r.number for r in read_rows(paths["csv"])] == [2, 3, 4, 5, 6]  # line numbers, after the header


def test_report_names_every_bad_row_by_reason_and_line(tmp_path, tokenizer):
    lines = [
        GOOD,                                                     # 1 ok
        '{"prompt": "unterminated',                               # 2 malformed JSON
        {"response": "no prompt"},                                # 3 missing field
        {"prompt": "x", "response": 5},                           # 4 wrong type
        {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]},  # 5 unknown role
        {"prompt": "x", "response": "   "},                       # 6 empty response
        {"prompt": "Repeat the words: " + "cat " * 200, "response": "cat"},  # 7 over max length
        {"messages": CHAT},                                       # 8 ok
        {"prompt": "y", "response": ""},                          # 9 empty response
    ]
    report = check(write_jsonl(tmp_path / "bad.jsonl", lines), tokenizer, max_length=64)
    assert report.rows_read == 9 and [e.number for e in report.kept] == [1, 8]
    assert {reason: [n for n, _ in rows] for reason, rows in report.dropped.items()} == {
        "malformed": [2], "missing_field": [3], "wrong_type": [4], "unknown_role": [5],
        "empty_response": [6, 9], "too_long": [7]}
    text = report.render()
    for words in ["malformed JSON", "missing field", "wrong type", "unknown role", "empty response", "over max length"]:
        assert words in text
    assert "rows 6, 9" in text and "rows read      9" in text and "rows kept      2" in text
    assert "tokens per row min" in text and "trained tokens" in text


def test_rendered_example_marks_exactly_the_trained_tokens(tmp_path, tokenizer):
    report = check(write_jsonl(tmp_path / "d.jsonl", [GOOD]), tokenizer)
    assert report.example == (f"<|user|>Repeat the words: cat dog<|end|><|assistant|>{MARK_OPEN}cat dog<|end|>{MARK_CLOSE}")
    example = report.kept[0]
    trained = [t for t, m in zip(example.input_ids, example.assistant_masks) if m]
    assert tokenizer.decode(trained) == "cat dog<|end|>"  # the answer and its end-of-turn token, nothing else


def test_dataset_sha256_is_of_the_bytes(tmp_path):
    import hashlib

    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    assert dataset_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_data_check_command(cli, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD] * 20)
    result = cli("data", "check", good, "--max-length", "64")
    assert result.code == 0, result.text
    assert "rows kept      20" in result.out and "ok: training would accept this data" in result.out

    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD] * 8 + [{"prompt": "x"}] * 2)
    result = cli("data", "check", bad)
    assert result.code == 2
    assert "2 of 10 rows" in result.err and "more than --max-bad-fraction 0.05" in result.err
    assert "missing field" in result.err and "rows 9, 10" in result.err


@pytest.mark.parametrize("name,content,message", [
    ("missing.jsonl", None, "does not exist"),
    ("data.txt", "hello", "unknown file type '.txt'"),
    ("broken.json", "{not json", "is not valid JSON"),
    ("object.json", '{"a": 1}', "holds a JSON dict, not a list of records"),
])
def test_unreadable_files_are_named(cli, tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    result = cli("data", "check", path)
    assert result.code == 2 and message in result.err and "fix:" in result.err


def test_bad_columns_spec(cli, tmp_path):
    result = cli("data", "check", write_jsonl(tmp_path / "d.jsonl", [GOOD]), "--columns", "prompt")
    assert result.code == 2 and "--columns 'prompt' is not a list of ours=theirs pairs" in result.err


# --- files that are malformed in the bytes: a finding with the row and the fix, never a traceback ---

GOOD_LINE = json.dumps(GOOD).encode() + b"\n"
GOOD_CSV_LINE = b'"Repeat the words: cat dog",cat dog\r\n'
DEEP = b"[" * 100_000 + b"]" * 100_000  # RecursionError in Python's json
BIG_FIELD = b"Repeat the words: " + b"cat " * (200 * 1024 // 4)  # over csv's default 128 KiB field limit


@pytest.mark.parametrize("name,content,row,words,fix", [
    ("latin1.jsonl", GOOD_LINE * 19 + b'{"prompt": "caf\xe9", "response": "x"}\n', 20,
     f"byte 0xe9 at byte offset {len(GOOD_LINE) * 19 + 15} is not UTF-8", "iconv -f latin1 -t utf-8"),
    ("deep.jsonl", GOOD_LINE * 19 + DEEP + b"\n", 20, "nested too deep", "flatten"),
    ("surrogate.jsonl", GOOD_LINE * 19 + b'{"prompt": "\\ud800", "response": "x"}\n', 20,
     "lone surrogate", "pair it or remove it"),
    ("latin1.csv", b"prompt,response\r\n" + GOOD_CSV_LINE * 19 + b"caf\xe9,x\r\n", 21,
     "byte 0xe9 at byte offset", "iconv -f latin1 -t utf-8"),
    ("big-field.csv", b"prompt,response\r\n" + GOOD_CSV_LINE * 19 + BIG_FIELD + b",cat\r\n", 21,
     "over max length", "raise --max-length"),
], ids=["latin1-jsonl", "nested-100000-deep", "lone-surrogate", "latin1-csv", "csv-field-over-128KiB"])
def test_malformed_bytes_are_a_bad_row_with_its_number_and_fix(cli, tmp_path, name, content, row, words, fix):
    path = tmp_path / name
    path.write_bytes(content)
    result = cli("data", "check", path, "--max-length", "64")
    assert result.code == 0, result.text  # 1 bad row of 20 is within --max-bad-fraction 0.05
    assert "Traceback" not in result.text
    assert "rows read      20" in result.out and "rows kept      19" in result.out and "rows dropped   1 (5.0%)" in result.out
    assert f"rows {row}  (row {row}:" in result.out and words in result.out and fix in result.out


def test_malformed_bytes_count_against_max_bad_fraction(cli, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD_LINE * 8 + b'{"prompt": "caf\xe9", "response": "x"}\n' * 2)
    result = cli("data", "check", path)
    assert result.code == 2 and "Traceback" not in result.text
    assert "2 of 10 rows" in result.err and "not UTF-8" in result.err and "rows 9, 10" in result.err


@pytest.mark.parametrize("name,content,message", [
    ("random.jsonl", random.Random(0).randbytes(4096), "is binary data, not text"),
    ("no-nul.jsonl", b"\xc5" * 4096, "is binary data, not text"),
    ("gzipped.jsonl", gzip.compress(GOOD_LINE * 10), "is gzip-compressed"),
    ("random.csv", random.Random(1).randbytes(4096), "is binary data, not text"),
    ("corrupt.parquet", b"PAR1" + random.Random(2).randbytes(4096) + b"PAR1",
     "is not a readable Parquet file"),
    ("text.parquet", GOOD_LINE * 10, "is not a readable Parquet file"),
], ids=["binary-jsonl", "not-utf8-at-all", "gzip-jsonl", "binary-csv", "corrupt-parquet", "text-named-parquet"])
def test_unreadable_bytes_are_one_error_naming_the_file(cli, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    result = cli("data", "check", path)
    assert result.code == 2 and "Traceback" not in result.text
    assert str(path) in result.err and message in result.err and "fix:" in result.err


@pytest.mark.parametrize("name,content", [
    ("bom-crlf.jsonl", b"\xef\xbb\xbf" + (json.dumps(GOOD).encode() + b"\r\n") * 3),
    ("bom-crlf.csv", b"\xef\xbb\xbfprompt,response\r\n" + GOOD_CSV_LINE * 3),
    ("bom-crlf.json", b"\xef\xbb\xbf" + json.dumps([GOOD] * 3, indent=1).encode().replace(b"\n", b"\r\n")),
], ids=["jsonl", "csv", "json"])
def test_bom_and_crlf_are_read_as_text(tmp_path, tokenizer, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    report = check(path, tokenizer)
    assert report.rows_read == 3 and report.n_dropped == 0, report.render()
    assert [e.messages for e in report.kept] == [CHAT] * 3  # no BOM in the first key, no \r in the answers


def test_a_50_mb_line_is_over_max_length_without_being_tokenized(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [GOOD, {"prompt": "Repeat the words: " + "cat " * (50 * 2**18), "response": "cat"}])
    report = check(path, tokenizer, max_length=1024)
    assert [e.number for e in report.kept] == [1] and [n for n, _ in report.dropped["too_long"]] == [2]
    assert "52,428,820 characters" in report.dropped["too_long"][0][1]  # judged by its length, before tokenizing


def test_the_check_streams_in_chunks_with_the_same_report(tmp_path, tokenizer):
    rows = [GOOD, {"prompt": "x"}, {"messages": CHAT}] * 7
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    whole = check_data(path, tokenizer, tokenizer.chat_template, 128)
    chunked = check_data(path, tokenizer, tokenizer.chat_template, 128, chunk_rows=4)
    counted = check_data(path, tokenizer, tokenizer.chat_template, 128, keep=False, chunk_rows=4)
    assert chunked.render() == whole.render() == counted.render() and chunked.summary() == whole.summary()
    assert [e.input_ids for e in chunked.kept] == [e.input_ids for e in whole.kept] and counted.kept == []
    assert counted.summary() == whole.summary()
