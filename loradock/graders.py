"""Graders: how one answer is scored, named the same way wherever a figure is made (`loradock eval
--grader NAME[:ARG]`, a `graders:` list in YAML, the held-out figures of a training run).

    exact_match              1 when the answer is the reference, character for character
    rouge_l                  ROUGE-L F-measure against the reference
    regex:PATTERN            1 when PATTERN (Python's re) matches the answer; anchor it with ^ and $ to match all of it
    json_schema:FILE         1 when the answer is JSON (alone, or alone in one ``` fence) that validates
                             against FILE's JSON Schema
    python:MODULE:FUNCTION   FUNCTION's score in [0, 1]; MODULE is an importable module or a .py file. It is
                             called with the keywords it names among answer, reference and prompt.

One row never stops a run: an answer a grader cannot score (a Python grader that raises, or returns
something other than a number in [0, 1]) scores 0 and is counted in `Scores.failures`, with the first
such error kept for the report. Every figure carries its grader's `settings`, which pin what made it
(a schema's or a module's sha256 among them).
"""

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from loradock.errors import LoradockError

BUILT_IN = ("exact_match", "rouge_l")
KINDS = (*BUILT_IN, "regex", "json_schema", "python")
FORMS = ("exact_match", "rouge_l", "regex:PATTERN", "json_schema:FILE", "python:MODULE:FUNCTION")
ARGUMENTS = ("answer", "reference", "prompt")  # what a Python grader may ask for, by name


@dataclass(frozen=True)
class Sample:
    """One answer to grade: the prompt's text (the last user turn), the answer, and the reference
    answer when the data has one."""

    prompt: str
    answer: str
    reference: str | None = None


@dataclass
class Scores:
    """A grader's scores over a list of samples: one per sample, failures scored 0 and counted."""

    grader: str
    values: list[float] = field(default_factory=list)
    failures: int = 0
    first_failure: str | None = None

    @property
    def mean(self) -> float:
        return round(sum(self.values) / len(self.values), 4) if self.values else 0.0

    def failed(self, problem: str) -> float:
        self.failures += 1
        self.first_failure = self.first_failure or problem
        return 0.0


class Unscorable(Exception):
    """This answer cannot be scored by this grader (it scores 0, and is counted)."""


@dataclass(frozen=True)
class Grader:
    """A grader parsed from its name (`spec`, as the user wrote it). `settings` pin what it scores
    with, for the record of every figure it makes."""

    spec: str
    kind: str
    settings: dict
    needs_reference: bool
    score_one: Callable[[Sample], float] = field(repr=False, compare=False)

    def grade(self, samples: list[Sample]) -> Scores:
        scores = Scores(self.spec)
        for sample in samples:
            if self.needs_reference and sample.reference is None:
                scores.values.append(scores.failed(f"{self.spec} needs a reference answer, and the row has none"))
                continue
            try:
                value = self.score_one(sample)
            except Unscorable as e:
                value = scores.failed(str(e))
            scores.values.append(value)
        return scores


def parse(spec: str) -> Grader:
    """The grader `spec` names.

    Raises:
        LoradockError: an unknown grader (with the closest name), a pattern that does not compile,
            a schema file that is missing or not a JSON Schema, a Python grader that cannot be imported.
    """
    spec = spec.strip()
    kind, _, arg = spec.partition(":")
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, KINDS, n=1)
        raise LoradockError(f"unknown grader {spec!r}" + (f": did you mean {close[0]}?" if close else ""),
                            f"name one of {', '.join(FORMS)}")
    if kind in BUILT_IN:
        if arg:
            raise LoradockError(f"grader {spec!r}: {kind} takes no argument", f"write it as {kind}")
        return Grader(spec, kind, {"grader": kind}, True, exact_match if kind == "exact_match" else rouge_l())
    if not arg:
        form = next(f for f in FORMS if f.startswith(kind + ":"))
        raise LoradockError(f"grader {spec!r} has no argument", f"write it as {form}")
    return {"regex": regex, "json_schema": json_schema, "python": python}[kind](spec, arg)


def parse_all(specs: list[str]) -> list[Grader]:
    """Each grader once, in the order given."""
    graders = {}
    for spec in specs:
        grader = parse(spec)
        graders.setdefault(grader.spec, grader)
    if not graders:
        raise LoradockError("no grader named", f"name one or more of {', '.join(FORMS)}")
    return list(graders.values())


def grade_all(graders: list[Grader], samples: list[Sample]) -> dict[str, Scores]:
    return {grader.spec: grader.grade(samples) for grader in graders}


# --- the kinds ----------------------------------------------------------------------------------

def exact_match(sample: Sample) -> float:
    """The answer as a client receives it: a leading space or a trailing newline is a miss, as in any
    client's own comparison."""
    return float(sample.answer == sample.reference)


def rouge_l() -> Callable[[Sample], float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return lambda sample: scorer.score(sample.reference, sample.answer)["rougeL"].fmeasure


def regex(spec: str, pattern: str) -> Grader:
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise LoradockError(f"grader {spec!r}: the pattern does not compile ({e})",
                            "fix the regular expression (Python's re syntax)") from None
    return Grader(spec, "regex", {"grader": "regex", "pattern": pattern}, False,
                  lambda sample: float(compiled.search(sample.answer) is not None))


FENCE = re.compile(r"^```[A-Za-z0-9_-]*\n(.*)\n```$", re.DOTALL)


def json_schema(spec: str, path: str) -> Grader:
    import jsonschema

    try:
        text = Path(path).read_text(encoding="utf-8")
        schema = json.loads(text)
    except OSError as e:
        raise LoradockError(f"grader {spec!r}: cannot read {path} ({e.strerror})",
                            "pass the path of a JSON Schema file") from None
    except ValueError as e:
        raise LoradockError(f"grader {spec!r}: {path} is not JSON ({e})", "pass a JSON Schema file") from None
    try:
        validator_class = jsonschema.validators.validator_for(schema)
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise LoradockError(f"grader {spec!r}: {path} is not a valid JSON Schema ({e.message})",
                            "fix the schema (https://json-schema.org)") from None
    validator = validator_class(schema)

    def score(sample: Sample) -> float:
        text = sample.answer.strip()
        fenced = FENCE.match(text)
        try:
            value = json.loads(fenced.group(1) if fenced else text)
        except ValueError:
            return 0.0
        try:
            return float(validator.is_valid(value))
        except Exception as e:  # e.g. a $ref the schema cannot resolve: jsonschema fetches nothing
            raise Unscorable(f"{spec}: the schema could not be applied ({type(e).__name__}: {e})") from None

    settings = {"grader": "json_schema", "file": path, "sha256": hashlib.sha256(text.encode()).hexdigest()}
    return Grader(spec, "json_schema", settings, False, score)


def python(spec: str, target: str) -> Grader:
    module_name, _, function_name = target.rpartition(":")
    if not module_name or not function_name:
        raise LoradockError(f"grader {spec!r} names no function", "write it as python:MODULE:FUNCTION")
    module = import_grader_module(spec, module_name)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise LoradockError(f"grader {spec!r}: {module_name} has no function {function_name}",
                            f"name a function defined in {module_name}")
    wanted = keywords_of(spec, function)
    source = inspect.getsourcefile(function)
    settings = {"grader": "python", "module": module_name, "function": function_name,
                "sha256": hashlib.sha256(Path(source).read_bytes()).hexdigest() if source else None}

    def score(sample: Sample) -> float:
        try:
            value = function(**{name: getattr(sample, name) for name in wanted})
        except Exception as e:  # the user's code: any error scores this row 0 and is counted
            raise Unscorable(f"{spec} raised {type(e).__name__}: {e}") from None
        if isinstance(value, bool):
            return float(value)
        if not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value <= 1:
            raise Unscorable(f"{spec} returned {value!r}, not a number in [0, 1]")
        return float(value)

    return Grader(spec, "python", settings, False, score)  # the function decides what a missing reference means


def import_grader_module(spec: str, name: str):
    """A module by its import name (looked for in the current folder too), or a .py file by its path."""
    try:
        if name.endswith(".py"):
            loaded = importlib.util.spec_from_file_location(f"loradock_grader_{Path(name).stem}", name)
            if loaded is None or not Path(name).is_file():
                raise FileNotFoundError(name)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
            return module
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.append(str(Path.cwd()))  # as `python -m` would find it
        return importlib.import_module(name)
    except (ImportError, FileNotFoundError) as e:
        raise LoradockError(f"grader {spec!r}: cannot import {name} ({e})",
                            "name an importable module (run from its folder) or the path of a .py file") from None
    except Exception as e:
        raise LoradockError(f"grader {spec!r}: importing {name} raised {type(e).__name__}: {e}",
                            f"fix {name}") from None


def keywords_of(spec: str, function) -> tuple[str, ...]:
    """The sample fields `function` asks for; refused when it needs an argument no sample has."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return ARGUMENTS[:1]
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return ARGUMENTS
    names = tuple(p.name for p in parameters if p.name in ARGUMENTS)
    required = [p.name for p in parameters if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                and p.name not in ARGUMENTS]
    if required or not names:
        raise LoradockError(f"grader {spec!r}: the function takes {', '.join(required) or 'none of the arguments'}",
                            f"define it as {spec.rsplit(':', 1)[1]}(answer, reference=None, prompt=None) -> float in "
                            "[0, 1] (any of those names, by keyword)")
    return names
