"""Which tokens of a conversation are trained: each assistant answer and the token that ends its turn.

Used by the data check (`loradock data check FILE [--chat-template T.jinja]`, and every `loradock
train`). A chat template with `{% generation %}` markers says so itself (transformers' assistant
masks). For any other template the answers are found by rendering the conversation again:

- with one answer swapped for a placeholder character, the two renderings differ exactly where
  the template wrote that answer, wherever the template puts it and whatever it does to the other
  turns (a system prompt moved to the last user turn, reasoning tags on the last answer only);
- the conversation up to that answer with the generation prompt must be the start of the
  conversation up to and including it: the text after the answer there is what ends its turn,
  and the token right after the answer in the whole rendering must be where that text begins.

The tokens are those of the rendered text (fast tokenizer offsets, no special tokens added: a
template writes its own BOS). A template the comparison cannot follow is refused (`Underivable`)
rather than trained on tokens nobody checked.
"""

import re
from bisect import bisect_right
from dataclasses import dataclass

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # the test transformers itself applies
PLACEHOLDERS = "\ue000\ue001\ue002"  # private-use characters, one of which an answer neither starts nor ends with
SHOWN_CHARS = 160  # of a rendering, either side of the place it goes wrong


def has_generation_markers(template: str) -> bool:
    return bool(GENERATION_TAG.search(template))


class Underivable(Exception):
    """The template's rendering does not show where an answer is, or what ends its turn.

    Args:
        turn: 0-based index of the assistant message in the conversation.
        problem: what does not add up.
        shown: the rendering around the place it goes wrong, clipped.
    """

    def __init__(self, turn: int, problem: str, shown: str):
        self.turn, self.problem, self.shown = turn, problem, shown
        super().__init__(f"turn {turn + 1}: {problem}")


@dataclass
class Answer:
    """Where an assistant answer is in the whole rendering, and the text that closes its turn."""

    start: int  # characters
    end: int
    closing: str


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_masks(tokenizer, template: str, messages: list[dict], text: str,
                    offsets: list[tuple[int, int]]) -> list[int]:
    """1 for each token of `text` (the conversation rendered, tokenized into `offsets`) that is part
    of an assistant answer or the token that ends its turn, 0 for every other token.

    Raises:
        Underivable: the renderings do not show an answer, or what ends its turn.
        jinja2.TemplateError: the template refuses the conversation (its roles, mostly).
    """
    mask = [0] * len(offsets)
    starts = [start for start, _ in offsets]
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            answer = locate(tokenizer, template, messages, i, text)
            for k in answer_tokens(text, offsets, starts, answer, i):
                mask[k] = 1
    return mask


def locate(tokenizer, template: str, messages: list[dict], i: int, text: str) -> Answer:
    """Where the answer of message `i` is in `text`, the whole conversation rendered."""
    start, end = _where_written(tokenizer, template, messages, i, text)
    prompt = render(tokenizer, template, messages[:i], add_generation_prompt=True) if i else ""
    turn = render(tokenizer, template, messages[:i + 1])
    if not turn.startswith(prompt):
        at = _common_prefix(prompt, turn)
        raise Underivable(i, "the conversation rendered up to this answer with the generation prompt is not the "
                             "start of it rendered with the answer, so the prompt the model answers is not what it "
                             "is trained after", f"with the generation prompt: {_clip(prompt, at)}\n"
                                                  f"with the answer:            {_clip(turn, at)}")
    if end <= len(turn) and text.startswith(turn):
        turn_start, turn_end = start, end  # the usual case: earlier turns render the same either way
    else:
        turn_start, turn_end = _where_written(tokenizer, template, messages[:i + 1], i, turn)
    if turn_start < len(prompt):
        raise Underivable(i, "the answer begins inside the generation prompt", _clip(turn, turn_start))
    if turn_end == len(turn):
        raise Underivable(i, "nothing follows the answer in its turn: the template writes no end-of-turn token "
                             "for the model to learn to stop with", _clip(turn, turn_end))
    return Answer(start, end, turn[turn_end:])


def _where_written(tokenizer, template: str, messages: list[dict], i: int, text: str) -> tuple[int, int]:
    """(start, end) characters of message `i`'s content in `text`, found by rendering it with a
    placeholder instead; the template may trim whitespace around it, and nothing else."""
    content = messages[i]["content"]
    placeholder = next(p for p in PLACEHOLDERS if p not in (content[:1], content[-1:]))
    swapped = [*messages[:i], {**messages[i], "content": placeholder}, *messages[i + 1:]]
    other = render(tokenizer, template, swapped)
    start = _common_prefix(text, other)
    end = len(text) - _common_suffix(text[start:], other[start:])
    written = text[start:end]
    at = content.find(written) if written else -1
    if at < 0 or content[:at].strip() or content[at + len(written):].strip():
        raise Underivable(i, f"the answer {_short(content)} is not in the rendering as it is: the template "
                             f"writes it as {_short(written)}", _clip(text, start))
    return start, end


def answer_tokens(text: str, offsets: list[tuple[int, int]], starts: list[int], answer: Answer, i: int) -> list[int]:
    """The indices of the tokens of the answer and of the one token after it, which must begin
    what closes its turn. A token may reach back over whitespace before the answer (" Hi" after
    Mistral's [/INST] is one token the model writes), never into other text."""
    tokens = []
    for k in range(max(bisect_right(starts, answer.start) - 1, 0), len(offsets)):
        start, end = offsets[k]
        if end <= answer.start and start < answer.start:
            continue  # before the answer
        if start < answer.start and text[start:answer.start].strip():
            raise Underivable(i, f"the token {text[start:end]!r} holds the answer's start and text before it",
                              _clip(text, answer.start))
        if start < answer.end < end:
            raise Underivable(i, f"the token {text[start:end]!r} holds the answer's end and what follows it",
                              _clip(text, answer.end))
        if start >= answer.end:
            if start == end:
                continue  # zero-width
            if start != answer.end or not answer.closing.startswith(text[start:end]):
                raise Underivable(i, f"the token after the answer, {text[start:end]!r}, is not the start of what "
                                     f"ends its turn, {_short(answer.closing)}", _clip(text, answer.end))
            return tokens + [k]
        tokens.append(k)
    raise Underivable(i, "no token follows the answer", _clip(text, answer.end))


def _common_prefix(a: str, b: str) -> int:
    """How many leading characters a and b share (binary search: string slices compare in C)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _common_suffix(a: str, b: str) -> int:
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[len(a) - middle:] == b[len(b) - middle:]:
            low = middle
        else:
            high = middle - 1
    return low


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _clip(text: str, at: int) -> str:
    """The rendering around character `at`, as a Python string literal so whitespace shows."""
    left, right = max(at - SHOWN_CHARS, 0), at + SHOWN_CHARS
    before, after = repr(text[left:at]), repr(text[at:right])
    return ("…" if left else "") + before + " ⟂ " + after + ("…" if right < len(text) else "")
