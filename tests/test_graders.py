"""The graders, one by one, and what each does with an answer it cannot score or a name it does not know."""

import json

import pytest

from loradock import graders
from loradock.errors import LoradockError
from loradock.graders import Sample
from tests.conftest import ASSETS

JSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
               "additionalProperties": {"type": "string"}}


def grade(spec: str, *answers: str, reference: str | None = "ref") -> graders.Scores:
    return graders.parse(spec).grade([Sample("the prompt", a, reference) for a in answers])


def test_built_in_graders_score_against_the_reference():
    assert grade("exact_match", "ref", " ref", "ref\n").values == [1.0, 0.0, 0.0]
    assert grade("rouge_l", "a b c", reference="a b d").values == [pytest.approx(2 / 3)]
    missing = grade("exact_match", "ref", reference=None)
    assert missing.values == [0.0] and missing.failures == 1 and "needs a reference" in missing.first_failure


def test_regex_matches_anywhere_unless_anchored():
    assert grade(r"regex:\d+", "abc 12", "none").values == [1.0, 0.0]
    assert grade(r"regex:^\d+$", "12", "12 apples").values == [1.0, 0.0]
    assert graders.parse("regex:a:b").settings == {"grader": "regex", "pattern": "a:b"}  # colons belong to it


def test_json_schema_validates_the_answer_alone_or_in_one_fence(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(JSON_SCHEMA))
    answers = ['{"name": "x", "color": "red"}', '```json\n{"name": "x"}\n```', '{"color": "red"}',
               '{"name": 3}', "not json", 'Sure! {"name": "x"}']
    scores = grade(f"json_schema:{schema}", *answers)
    assert scores.values == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0] and scores.failures == 0  # a wrong answer is no failure
    settings = graders.parse(f"json_schema:{schema}").settings
    assert settings["file"] == str(schema) and len(settings["sha256"]) == 64


def test_the_shipped_json_task_answers_validate(tmp_path):
    """The json task's references pass a schema of flat string objects: the grader scores real answers."""
    schema = tmp_path / "flat.json"
    schema.write_text(json.dumps({"type": "object", "additionalProperties": {"type": "string"}, "minProperties": 1}))
    rows = [json.loads(line) for line in (ASSETS / "tasks" / "json" / "heldout.jsonl").read_text().splitlines()]
    assert grade(f"json_schema:{schema}", *[r["response"] for r in rows]).mean == 1.0


PYTHON_GRADER = '''
def length_ok(answer, reference=None):
    return len(answer) <= len(reference or "")

def needs_prompt(prompt, answer):
    return 1.0 if prompt in answer else 0.5

def raises(answer):
    raise ValueError("boom on " + answer)

def returns(answer):
    return {"nan": float("nan"), "big": 1.5, "text": "0.9", "none": None}[answer]

def wants_more(answer, weights):
    return 1.0
'''


def test_a_python_grader_is_called_with_the_arguments_it_names(tmp_path):
    module = tmp_path / "my_graders.py"
    module.write_text(PYTHON_GRADER)
    assert grade(f"python:{module}:length_ok", "ab", "abcd").values == [1.0, 0.0]
    assert graders.parse(f"python:{module}:needs_prompt").grade([Sample("p", "a p", None)]).values == [1.0]
    settings = graders.parse(f"python:{module}:length_ok").settings
    assert settings["function"] == "length_ok" and len(settings["sha256"]) == 64


def test_a_python_grader_importable_by_module_name(tmp_path, monkeypatch):
    (tmp_path / "my_task_graders.py").write_text(PYTHON_GRADER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(tmp_path)
    assert grade("python:my_task_graders:length_ok", "a").values == [1.0]


def test_a_python_grader_that_raises_or_returns_no_score_counts_the_row_as_zero(tmp_path):
    module = tmp_path / "g.py"
    module.write_text(PYTHON_GRADER)
    raised = grade(f"python:{module}:raises", "x", "y")
    assert raised.values == [0.0, 0.0] and raised.failures == 2 and "ValueError: boom on x" in raised.first_failure
    odd = grade(f"python:{module}:returns", "nan", "big", "text", "none")
    assert odd.values == [0.0] * 4 and odd.failures == 4 and "not a number in [0, 1]" in odd.first_failure


@pytest.mark.parametrize("spec, problem, fix", [
    ("exact-match", "did you mean exact_match?", "regex:PATTERN"),
    ("rouge", "did you mean rouge_l?", "json_schema:FILE"),
    ("bleu", "unknown grader 'bleu'", "python:MODULE:FUNCTION"),
    ("regex:(", "does not compile", "regular expression"),
    ("regex", "has no argument", "regex:PATTERN"),
    ("exact_match:x", "takes no argument", "exact_match"),
    ("python:nosuchmodule_xyz:f", "cannot import nosuchmodule_xyz", "importable module"),
])
def test_a_bad_grader_name_is_refused_with_its_fix(spec, problem, fix):
    with pytest.raises(LoradockError) as refused:
        graders.parse(spec)
    assert problem in refused.value.problem and fix in refused.value.fix


def test_a_schema_that_is_not_a_json_schema_or_not_json_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": 12}))
    with pytest.raises(LoradockError, match="not a valid JSON Schema"):
        graders.parse(f"json_schema:{bad}")
    bad.write_text("{not json")
    with pytest.raises(LoradockError, match="is not JSON"):
        graders.parse(f"json_schema:{bad}")
    with pytest.raises(LoradockError, match="cannot read"):
        graders.parse(f"json_schema:{tmp_path / 'missing.json'}")


def test_a_python_grader_with_arguments_no_sample_has_is_refused(tmp_path):
    module = tmp_path / "g.py"
    module.write_text(PYTHON_GRADER)
    with pytest.raises(LoradockError, match="takes weights"):
        graders.parse(f"python:{module}:wants_more")
    with pytest.raises(LoradockError, match="has no function nothere"):
        graders.parse(f"python:{module}:nothere")


def test_eval_names_an_unknown_grader_before_loading_anything(run_cli):
    result = run_cli("eval", "--data", ASSETS / "tasks" / "json" / "heldout.jsonl", "--grader", "exact_match",
                     "--grader", "jsonschema:x.json")
    assert result.code == 2 and "did you mean json_schema?" in result.err


def test_train_refuses_a_bad_grader_with_the_other_problems(run_cli, tmp_path):
    result = run_cli("train", "--data", ASSETS / "tasks" / "json" / "train.jsonl", "--output", tmp_path / "out",
                     "--grader", "regex:(", "--print-config")
    assert result.code == 2 and "--grader" in result.err and "does not compile" in result.err
    assert not (tmp_path / "out").exists()


def test_a_schema_whose_reference_cannot_be_resolved_fails_the_row_not_the_run(tmp_path):
    schema = tmp_path / "remote.json"
    schema.write_text(json.dumps({"$ref": "https://example.invalid/order.schema.json"}))
    scores = grade(f"json_schema:{schema}", '{"id": 1}', "not json")
    assert scores.values == [0.0, 0.0] and scores.failures == 1 and "could not be applied" in scores.first_failure
