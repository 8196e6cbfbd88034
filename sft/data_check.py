"""loradock data check FILE [--base-model M] [--max-length N] [--columns prompt=q,response=a]

The report a user reads before training, and the token ids training then uses: every row is
rendered with the chat template it will be trained with and tokenized once, here, so the lengths,
the dropped rows and the trained (unmasked) tokens shown are exactly what the trainer gets.

The rows stream through in chunks and the figures accumulate (token lengths as a histogram, at
most --max-length entries), so the check alone holds one chunk; only training keeps the kept rows.
A row whose text is longer than --max-length tokens could cover is dropped before tokenizing.
"""

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

from jinja2 import TemplateError

from loradock.errors import LoradockError
from sft.assistant_masks import Underivable, assistant_masks, has_generation_markers, render
from sft.data import FIXES, REASONS, Row, RowProblem, dataset_sha256, iter_rows, to_messages

SHOWN_ROW_NUMBERS = 5  # first few row numbers listed per drop reason
MARK_OPEN, MARK_CLOSE = "⟦", "⟧"  # around trained tokens in the rendered example
CHUNK_ROWS = 2000  # rows converted and tokenized together: memory is bounded by a chunk, not the file
# A row whose text holds more characters than max_length tokens of the longest vocabulary entry
# could cover, twice over for the normalizer, is over max length without being tokenized.
CHARS_MARGIN = 2


@dataclass
class Example:
    number: int
    messages: list[dict]
    input_ids: list[int]
    assistant_masks: list[int]  # 1 where the token is trained on


@dataclass
class DataReport:
    """The check's figures, accumulated a chunk at a time; `kept` holds the kept rows only when asked."""

    path: str
    sha256: str
    max_length: int
    rows_read: int = 0
    rows_kept: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    lengths: Counter = field(default_factory=Counter)  # tokens per kept row -> rows (at most max_length keys)
    kept: list[Example] = field(default_factory=list)
    dropped: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # reason -> [(row, detail)]
    example: str = ""
    example_row: int = 0

    @property
    def n_dropped(self) -> int:
        return sum(len(rows) for rows in self.dropped.values())

    @property
    def bad_fraction(self) -> float:
        return self.n_dropped / self.rows_read if self.rows_read else 1.0

    def drop(self, reason: str, number: int, detail: str) -> None:
        self.dropped.setdefault(reason, []).append((number, detail))

    def keep(self, example: Example, store: bool) -> None:
        self.rows_kept += 1
        self.tokens += len(example.input_ids)
        self.trained_tokens += sum(example.assistant_masks)
        self.lengths[len(example.input_ids)] += 1
        if store:
            self.kept.append(example)

    def length_at(self, rank: int) -> int:
        """The token length of the kept row at this 0-based rank in length order."""
        seen = 0
        for length in sorted(self.lengths):
            seen += self.lengths[length]
            if seen > rank:
                return length
        raise IndexError(rank)

    def summary(self) -> dict:
        """The figures that go into metrics.json."""
        return {
            "path": self.path, "sha256": self.sha256, "rows_read": self.rows_read, "rows_kept": self.rows_kept,
            "rows_dropped": {reason: len(rows) for reason, rows in self.dropped.items()},
            "tokens": self.tokens, "trained_tokens": self.trained_tokens,
        }

    def render(self) -> str:
        lines = [f"data check: {self.path}  (sha256 {self.sha256[:12]})",
                 f"  rows read      {self.rows_read}",
                 f"  rows kept      {self.rows_kept}",
                 f"  rows dropped   {self.n_dropped} ({self.bad_fraction:.1%})"]
        for reason, rows in self.dropped.items():
            shown = ", ".join(str(n) for n, _ in rows[:SHOWN_ROW_NUMBERS]) + (", ..." if len(rows) > SHOWN_ROW_NUMBERS else "")
            lines.append(f"    {REASONS[reason]:<16} {len(rows):>5}  rows {shown}  (row {rows[0][0]}: {rows[0][1]})")
            lines.append(f"      fix: {FIXES[reason]}")
        if self.rows_kept:
            n = self.rows_kept
            lines.append(f"  tokens per row min {min(self.lengths)}  mean {self.tokens / n:.1f}  "
                         f"p50 {self.length_at((n - 1) // 2)}  p95 {self.length_at(min(n - 1, int(0.95 * n)))}  "
                         f"max {max(self.lengths)}  (max length {self.max_length})")
            lines.append(f"  trained tokens {self.trained_tokens} of {self.tokens} "
                         f"({self.trained_tokens / max(self.tokens, 1):.1%})")
        if self.example:
            lines += [f"  example (row {self.example_row}), trained tokens between {MARK_OPEN} {MARK_CLOSE}:",
                      "    " + self.example.replace("\n", "\n    ")]
        return "\n".join(lines)


def check_data(path, tokenizer, chat_template: str, max_length: int, columns: dict | None = None,
               keep: bool = True, chunk_rows: int = CHUNK_ROWS) -> DataReport:
    """Read, convert, render and tokenize every row, a chunk of rows at a time; nothing is raised
    for bad rows.

    Args:
        keep: hold every kept row's tokens in `report.kept` (training needs them; the check alone does not).
        chunk_rows: rows tokenized together; memory grows with a chunk, not with the file.
    """
    def check_chunk(chunk: list[Row], report: DataReport, max_chars: int) -> None:
        chats = []
        for row in chunk:
            try:
                messages = to_messages(row.data, columns)
            except RowProblem as problem:
                report.drop(problem.reason, row.number, problem.detail)
                continue
            chars = sum(len(m["content"].strip()) for m in messages)
            if chars > max_chars:
                report.drop("too_long", row.number, f"{chars:,} characters, more than --max-length {max_length} "
                                                    f"tokens can hold")
            else:
                chats.append((row.number, messages))
        for number, messages, ids, mask in _tokenize(tokenizer, chat_template, chats, report):
            if len(ids) > max_length:
                report.drop("too_long", number, f"{len(ids)} tokens > --max-length {max_length}")
            elif not any(mask):  # TRL would drop it silently; say so
                detail = "no assistant token is inside the template's {% generation %} markers"
                report.drop("untrained", number, detail)
            else:
                example = Example(number, messages, list(ids), list(mask))
                if not report.example:
                    report.example, report.example_row = mark_trained(tokenizer, chat_template, example), number
                report.keep(example, keep)

    return scan(path, tokenizer, max_length, chunk_rows, check_chunk)


def scan(path, tokenizer, max_length: int, chunk_rows: int,
         check_chunk: Callable[[list[Row], DataReport, int], None]) -> DataReport:
    """The report of `check_chunk(rows, report, max_chars)` run on each chunk of the file's rows;
    `max_chars` is the text length past which a row is over --max-length without tokenizing it."""
    rows = iter_rows(path)  # first: it names a missing or unreadable file
    report = DataReport(path=str(path), sha256=dataset_sha256(path), max_length=max_length)
    max_chars = max_length * longest_token_chars(tokenizer) * CHARS_MARGIN
    for chunk in _chunks(rows, chunk_rows):
        report.rows_read += len(chunk)
        check_chunk(chunk, report, max_chars)
    report.dropped = {reason: sorted(report.dropped[reason]) for reason in REASONS if reason in report.dropped}
    return report


def longest_token_chars(tokenizer) -> int:
    """The most characters one token of this tokenizer stands for (its longest vocabulary entry)."""
    return max(map(len, tokenizer.get_vocab()), default=1)


def _chunks(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    rows = iter(rows)
    while chunk := list(islice(rows, size)):
        yield chunk


def _tokenize(tokenizer, chat_template: str, chats: list[tuple[int, list[dict]]], report: DataReport):
    """(number, messages, input_ids, assistant_masks) of each chat: the masks from the template's
    {% generation %} markers where it has them, else found by `sft.assistant_masks`.

    A chat the template refuses (raise_exception on its roles, mostly) is dropped with the
    template's words. A chat the tokenizer fails on is dropped with its error, unless every chat
    of the chunk fails: that error is not about the rows, and is raised.

    Raises:
        LoradockError: the template without markers renders answers that cannot be located.
    """
    if not chats:
        return []
    encode = _encode_marked if has_generation_markers(chat_template) else _encode_derived
    try:
        return [(n, m, i, k) for (n, m), (i, k) in zip(chats, encode(tokenizer, chat_template, chats))]
    except (TemplateError, RowFailed):  # a row the template or the tokenizer refuses: find which
        out, failed = [], []
        for number, messages in chats:
            try:
                ((ids, mask),) = encode(tokenizer, chat_template, [(number, messages)])
                out.append((number, messages, ids, mask))
            except TemplateError as e:
                report.drop("template_refused", number, f"turns {_roles(messages)}: {e}"[:200])
            except RowFailed as e:
                failed.append((number, e))
        if failed and not out:
            raise failed[0][1].__cause__ from None
        for number, error in failed:
            report.drop("untokenizable", number, str(error))
        return out


class RowFailed(Exception):
    """The tokenizer, or the template's own code (not its raise_exception), failed on a chunk of chats."""


def _encode_marked(tokenizer, chat_template: str, chats) -> list[tuple[list[int], list[int]]]:
    try:
        encoded = tokenizer.apply_chat_template([messages for _, messages in chats], chat_template=chat_template,
                                                tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    except TemplateError:
        raise
    except Exception as e:  # noqa: BLE001 (tokenizers and templates raise many types)
        raise RowFailed(f"{type(e).__name__}: {e}"[:200]) from e
    return list(zip(encoded["input_ids"], encoded["assistant_masks"]))


def _encode_derived(tokenizer, chat_template: str, chats) -> list[tuple[list[int], list[int]]]:
    """Render each chat, tokenize the chunk at once, then locate each chat's answers in its tokens."""
    out, problems = [], []
    try:
        texts = [render(tokenizer, chat_template, messages) for _, messages in chats]
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for (number, messages), text, ids, offsets in zip(chats, texts, encoded["input_ids"],
                                                          encoded["offset_mapping"]):
            try:
                out.append((ids, assistant_masks(tokenizer, chat_template, messages, text, offsets)))
            except Underivable as e:
                problems.append((number, e))
    except TemplateError:
        raise
    except Exception as e:  # noqa: BLE001
        raise RowFailed(f"{type(e).__name__}: {e}"[:200]) from e
    if problems:
        raise _underivable(problems)
    return out


def _underivable(problems: list[tuple[int, Underivable]]) -> LoradockError:
    (number, first), others = problems[0], [f"row {n} turn {e.turn + 1}" for n, e in problems[1:SHOWN_ROW_NUMBERS]]
    return LoradockError(
        f"row {number}, turn {first.turn + 1}: {first.problem}. The chat template has no {{% generation %}} markers, "
        "so the answers are found by rendering the conversation turn by turn, and here that does not add up"
        + (f" (nor in {', '.join(others)}{', ...' if len(problems) > SHOWN_ROW_NUMBERS else ''})" if others else ""),
        "pass --chat-template FILE.jinja: the model's template with {% generation %}...{% endgeneration %} around "
        "each assistant answer and the token that ends its turn",
        f"row {number} rendered, around the place it goes wrong (⟂):\n{first.shown}")


def _roles(messages: list[dict]) -> str:
    return ", ".join(m["role"] for m in messages)


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
            f"fix the rows listed below (or raise --max-bad-fraction to train on the {report.rows_kept} good rows)",
            report.render(),
        )
    if report.trained_tokens == 0:
        raise LoradockError(
            f"no trainable token remains in {report.path} ({flag}): "
            + ("every row was dropped" if not report.rows_kept else "no assistant token is inside {% generation %}"),
            "check the rows listed below" if not report.rows_kept else
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

