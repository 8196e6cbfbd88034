"""loradock data check FILE [--base-model M] [--max-length N] [--columns prompt=q,response=a]

The report a user reads before training, and the token ids training then uses: every row is
rendered with the chat template it will be trained with and tokenized once, here, so the lengths,
the dropped rows and the trained (unmasked) tokens shown are exactly what the trainer gets.
"""

import statistics
from dataclasses import dataclass, field

from loradock.errors import LoradockError
from sft.data import REASONS, RowProblem, dataset_sha256, read_rows, to_messages

SHOWN_ROW_NUMBERS = 5  # first few row numbers listed per drop reason
MARK_OPEN, MARK_CLOSE = "⟦", "⟧"  # around trained tokens in the rendered example


@dataclass
class Example:
    number: int
    messages: list[dict]
    input_ids: list[int]
    assistant_masks: list[int]  # 1 where the token is trained on


@dataclass
class DataReport:
    path: str
    sha256: str
    max_length: int
    rows_read: int = 0
    kept: list[Example] = field(default_factory=list)
    dropped: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # reason -> [(row, detail)]
    example: str = ""

    @property
    def n_dropped(self) -> int:
        return sum(len(rows) for rows in self.dropped.values())

    @property
    def bad_fraction(self) -> float:
        return self.n_dropped / self.rows_read if self.rows_read else 1.0

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.kept)

    @property
    def trained_tokens(self) -> int:
        return sum(sum(e.assistant_masks) for e in self.kept)

    def summary(self) -> dict:
        """The figures that go into metrics.json."""
        return {
            "path": self.path, "sha256": self.sha256, "rows_read": self.rows_read, "rows_kept": len(self.kept),
            "rows_dropped": {reason: len(rows) for reason, rows in self.dropped.items()},
            "tokens": self.tokens, "trained_tokens": self.trained_tokens,
        }

    def render(self) -> str:
        lines = [f"data check: {self.path}  (sha256 {self.sha256[:12]})",
                 f"  rows read      {self.rows_read}",
                 f"  rows kept      {len(self.kept)}",
                 f"  rows dropped   {self.n_dropped} ({self.bad_fraction:.1%})"]
        for reason, rows in self.dropped.items():
            shown = ", ".join(str(n) for n, _ in rows[:SHOWN_ROW_NUMBERS]) + (", ..." if len(rows) > SHOWN_ROW_NUMBERS else "")
            lines.append(f"    {REASONS[reason]:<16} {len(rows):>5}  rows {shown}  (row {rows[0][0]}: {rows[0][1]})")
        lengths = sorted(len(e.input_ids) for e in self.kept)
        if lengths:
            p95 = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]
            lines.append(f"  tokens per row min {lengths[0]}  mean {statistics.fmean(lengths):.1f}  "
                         f"p50 {statistics.median_low(lengths)}  p95 {p95}  max {lengths[-1]}  "
                         f"(max length {self.max_length})")
            lines.append(f"  trained tokens {self.trained_tokens} of {self.tokens} "
                         f"({self.trained_tokens / max(self.tokens, 1):.1%})")
        if self.example:
            lines += [f"  example (row {self.kept[0].number}), trained tokens between {MARK_OPEN} {MARK_CLOSE}:",
                      "    " + self.example.replace("\n", "\n    ")]
        return "\n".join(lines)


def check_data(path, tokenizer, chat_template: str, max_length: int, columns: dict | None = None) -> DataReport:
    """Read, convert, render and tokenize every row; nothing is raised for bad rows."""
    rows = read_rows(path)  # first: it names a missing or unreadable file
    report = DataReport(path=str(path), sha256=dataset_sha256(path), max_length=max_length, rows_read=len(rows))
    chats = []
    for row in rows:
        try:
            chats.append((row.number, to_messages(row.data, columns)))
        except RowProblem as problem:
            report.dropped.setdefault(problem.reason, []).append((row.number, problem.detail))
    if chats:
        encoded = tokenizer.apply_chat_template(
            [messages for _, messages in chats], chat_template=chat_template, tokenize=True,
            return_dict=True, return_assistant_tokens_mask=True,
        )
        for (number, messages), ids, mask in zip(chats, encoded["input_ids"], encoded["assistant_masks"]):
            if len(ids) > max_length:
                detail = f"{len(ids)} tokens > --max-length {max_length}"
                report.dropped.setdefault("too_long", []).append((number, detail))
            elif not any(mask):  # TRL would drop it silently; say so
                detail = "no assistant token is inside the template's {% generation %} markers"
                report.dropped.setdefault("untrained", []).append((number, detail))
            else:
                report.kept.append(Example(number, messages, list(ids), list(mask)))
    report.dropped = {reason: sorted(report.dropped[reason]) for reason in REASONS if reason in report.dropped}
    if report.kept:
        report.example = mark_trained(tokenizer, chat_template, report.kept[0])
    return report


def mark_trained(tokenizer, chat_template: str, example: Example) -> str:
    """The rendered conversation with each run of trained tokens wrapped in ⟦ ⟧."""
    text = tokenizer.apply_chat_template(example.messages, chat_template=chat_template, tokenize=False)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    out, cursor, inside = [], 0, False
    for (start, end), trained in zip(offsets, example.assistant_masks):
        if trained != inside:
            out += [text[cursor:start], MARK_OPEN if trained else MARK_CLOSE]
            cursor, inside = start, trained
    out += [text[cursor:], MARK_CLOSE if inside else ""]
    return "".join(out)


def enforce(report: DataReport, max_bad_fraction: float, flag: str = "--data") -> None:
    """Abort training, with the whole report, when too many rows are bad or nothing is trainable."""
    if report.rows_read and report.bad_fraction > max_bad_fraction:
        raise LoradockError(
            f"{report.n_dropped} of {report.rows_read} rows of {report.path} ({report.bad_fraction:.1%}) are bad, "
            f"more than --max-bad-fraction {max_bad_fraction}",
            f"fix the rows listed below (or raise --max-bad-fraction to train on the {len(report.kept)} good rows)",
            report.render(),
        )
    if report.trained_tokens == 0:
        raise LoradockError(
            f"no trainable token remains in {report.path} ({flag}): "
            + ("every row was dropped" if not report.kept else "no assistant token is inside {% generation %}"),
            "check the rows listed below" if not report.kept else
            "use a chat template whose {% generation %} markers cover the assistant answers",
            report.render(),
        )


def check_for_training(path, tokenizer, chat_template, max_length, columns, max_bad_fraction, flag="--data"):
    report = check_data(path, tokenizer, chat_template, max_length, columns)
    enforce(report, max_bad_fraction, flag)
    return report


def to_dataset(examples: list[Example]):
    """The kept rows as the tokenized dataset SFTTrainer trains on (it skips its own tokenization)."""
    from datasets import Dataset

    return Dataset.from_dict({
        "input_ids": [e.input_ids for e in examples],
        "assistant_masks": [e.assistant_masks for e in examples],
    })

