"""loradock data check --objective dpo FILE: preference pairs, read, checked and tokenized once.

Rows (JSONL, JSON, CSV, Parquet or a saved datasets folder, as for instruction data), in TRL's
preference forms:

    {"prompt": "...", "chosen": "...", "rejected": "..."}                 (+ optional "system")
    {"prompt": [messages], "chosen": [one assistant message], "rejected": [one assistant message]}
    {"chosen": [messages], "rejected": [messages]}     the prompt is the turns both conversations share

Each pair becomes (prompt turns, chosen answer, rejected answer). A pair that cannot be trained
is a `RowProblem` with its row number and typed reason, as in `sft.data`: a missing side, an empty
side, identical answers, no prompt. Both conversations are rendered with the chat template
training uses and tokenized here in chunks, so the lengths shown are what DPOTrainer is given.
"""

from dataclasses import dataclass

from sft.data import RowProblem, check_turns, renamed
from sft.data_check import CHUNK_ROWS, DataReport, Example, _tokenize, mark_trained, scan


@dataclass
class PreferencePair:
    number: int
    prompt: list[dict]  # the turns before the answers, ending with a user turn
    chosen: str
    rejected: str


def to_preference(record: object, columns: dict[str, str] | None = None) -> tuple[list[dict], str, str]:
    """One record as (prompt turns, chosen answer, rejected answer).

    Raises:
        RowProblem: the record is not a usable preference pair, with the reason.
    """
    record = renamed(record, columns)
    chosen, rejected, prompt = record.get("chosen"), record.get("rejected"), record.get("prompt")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if side is None:
            raise RowProblem("missing_field", f"no {name!r} field")
    if prompt is None:
        turns, chosen_rest, rejected_rest = _split_shared_prompt(chosen, rejected)
    else:
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        turns = check_turns(turns, "prompt")
        chosen_rest, rejected_rest = (_completion(side, name) for name, side in (("chosen", chosen), ("rejected", rejected)))
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise RowProblem("wrong_type", f"'system' must be text, got {type(system).__name__}")
        if turns[0]["role"] != "system":
            turns = check_turns([{"role": "system", "content": system}, *turns], "prompt")
    if turns[-1]["role"] != "user":
        raise RowProblem("no_prompt", f"the prompt ends with a {turns[-1]['role']} turn; it must end with the user's")
    chosen_text, rejected_text = _answer(chosen_rest, "chosen"), _answer(rejected_rest, "rejected")
    if chosen_text.strip() == rejected_text.strip():
        raise RowProblem("same_answers", f"chosen and rejected are the same answer: {chosen_text.strip()[:60]!r}")
    return turns, chosen_text, rejected_text


def _completion(side: object, name: str) -> list[dict]:
    if isinstance(side, str):
        return check_turns([{"role": "assistant", "content": side}], name)
    return check_turns(side, name)


def _split_shared_prompt(chosen: object, rejected: object) -> tuple[list[dict], list[dict], list[dict]]:
    """TRL's implicit prompt: the turns both conversations begin with; the rest of each is its answer."""
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise RowProblem("no_prompt", "no 'prompt' field, and chosen and rejected are not conversations to take it from")
    chosen, rejected = check_turns(chosen, "chosen"), check_turns(rejected, "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise RowProblem("same_answers", "the chosen and rejected conversations are identical")
    if shared == 0:
        raise RowProblem("no_prompt", "chosen and rejected share no first turn, so there is no prompt to answer")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _answer(rest: list[dict], name: str) -> str:
    if len(rest) != 1 or rest[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in rest) or "none"
        raise RowProblem("wrong_type", f"{name!r} must be one assistant answer after the prompt, got turns: {roles}")
    if not rest[0]["content"].strip():
        raise RowProblem("empty_side", f"the {name} answer is empty")
    return rest[0]["content"]


def check_preferences(path, tokenizer, chat_template: str, max_length: int, columns: dict | None = None,
                      keep: bool = True, chunk_rows: int = CHUNK_ROWS) -> DataReport:
    """Read, convert, render and tokenize every pair, a chunk at a time; nothing is raised for bad rows.

    A pair's length is its longer side (prompt plus answer) in tokens, and is what --max-length
    limits; its trained tokens are both answers' (the tokens DPO scores).
    """
    def check_chunk(chunk, report: DataReport, max_chars: int) -> None:
        pairs = []
        for row in chunk:
            try:
                pair = PreferencePair(row.number, *to_preference(row.data, columns))
            except RowProblem as problem:
                report.drop(problem.reason, row.number, problem.detail)
                continue
            chars = sum(len(m["content"]) for m in pair.prompt) + max(len(pair.chosen), len(pair.rejected))
            if chars > max_chars:
                report.drop("too_long", row.number, f"{chars:,} characters, more than --max-length {max_length} "
                                                    "tokens can hold")
            else:
                pairs.append(pair)
        _tokenize_pairs(pairs, tokenizer, chat_template, report, keep)

    return scan(path, tokenizer, max_length, chunk_rows, check_chunk)


def _tokenize_pairs(pairs: list[PreferencePair], tokenizer, chat_template: str, report: DataReport, keep: bool):
    chats = []
    for pair in pairs:
        chats += [(pair.number, [*pair.prompt, {"role": "assistant", "content": answer}])
                  for answer in (pair.chosen, pair.rejected)]
    encoded = {}
    for number, messages, ids, mask in _tokenize(tokenizer, chat_template, chats, report):
        encoded.setdefault(number, []).append(Example(number, messages, list(ids), list(mask)))
    for pair in pairs:
        sides = encoded.get(pair.number, [])
        if len(sides) != 2:
            continue  # a side the tokenizer failed on: dropped by _tokenize
        longest = max(len(side.input_ids) for side in sides)
        if longest > report.max_length:
            report.drop("too_long", pair.number, f"{longest} tokens > --max-length {report.max_length}")
        elif not all(any(side.assistant_masks) for side in sides):
            report.drop("untrained", pair.number, "an answer has no token inside the template's {% generation %} markers")
        else:
            keep_pair(report, pair, sides, tokenizer, chat_template, keep)


def keep_pair(report: DataReport, pair: PreferencePair, sides: list[Example], tokenizer, chat_template, keep: bool):
    report.rows_kept += 1
    report.tokens += sum(len(side.input_ids) for side in sides)
    report.trained_tokens += sum(sum(side.assistant_masks) for side in sides)
    report.lengths[max(len(side.input_ids) for side in sides)] += 1
    if keep:
        report.kept.append(pair)
    if not report.example:
        chosen, rejected = (mark_trained(tokenizer, chat_template, side) for side in sides)
        report.example, report.example_row = f"chosen:   {chosen}\nrejected: {rejected}", pair.number


def to_preference_dataset(pairs: list[PreferencePair]):
    """The kept pairs in TRL's conversational preference form (explicit prompt); DPOTrainer renders
    them with the tokenizer's chat template, the one checked here."""
    from datasets import Dataset

    return Dataset.from_dict({
        "prompt": [p.prompt for p in pairs],
        "chosen": [[{"role": "assistant", "content": p.chosen}] for p in pairs],
        "rejected": [[{"role": "assistant", "content": p.rejected}] for p in pairs],
    })
