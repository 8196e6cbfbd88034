"""`loradock eval`, and a task learnt for real: the adapter beats the base on held-out prompts."""

import json

import pytest

from sft.evaluate import score
from tests.conftest import ASSETS, REPO


def test_score():
    assert score(["a b", "x"], ["a b", "y"], ["exact_match", "rouge_l"]) == {"exact_match": 0.5, "rouge_l": 0.5}
    # Exact match is what a client reads: an answer with a leading space or a trailing newline is not
    # the reference (lm-eval and any client's own comparison score it so).
    assert score([" a b", "a b\n", "a b"], ["a b"] * 3, ["exact_match"]) == {"exact_match": 0.3333}


def test_unknown_metric_is_named(cli):
    result = cli("eval", "--data", ASSETS / "tasks" / "reverse" / "heldout.jsonl", "--metrics", "bleu")
    assert result.code == 2 and "unknown metric bleu" in result.err and "exact_match, rouge_l" in result.err


def test_adapter_for_another_base_is_refused(cli, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "someone/other-model"}))
    result = cli("eval", "--base-model", "loradock/tiny-chat", "--adapter", adapter,
                 "--data", ASSETS / "tasks" / "reverse" / "heldout.jsonl")
    assert result.code == 2 and "was trained on 'someone/other-model'" in result.err


@pytest.mark.slow
def test_a_bundled_task_is_learnt_for_real(cli, tmp_path, monkeypatch):
    """Train on the shipped reverse task with its example config, then score both sides."""
    monkeypatch.chdir(REPO)
    adapter = tmp_path / "reverse"
    result = cli("train", "--config", "sft/configs/reverse.yaml", "--output", adapter)
    assert result.code == 0, result.text[-3000:]
    report_path = tmp_path / "report.json"
    result = cli("eval", "--adapter", adapter, "--data", ASSETS / "tasks" / "reverse" / "heldout.jsonl",
                 "--output", report_path)
    assert result.code == 0, result.text[-3000:]
    report = json.loads(report_path.read_text())
    base, tuned = report["metrics"]["base"]["exact_match"], report["metrics"]["adapter"]["exact_match"]
    print(f"reverse held-out exact match: base {base:.2f}, adapter {tuned:.2f}")
    assert report["rows"] == 100 and report["rows_skipped"] == 0
    assert base <= 0.1 and tuned >= 0.6, (base, tuned)
    general = report["general"]  # the forgetting guard, with the adapter and without it on the same weights
    assert general["rows"] == 48 and general["perplexity"] > 1 and general["base_perplexity"] > 1
    assert "general ability: perplexity of 48 general answers" in result.out
    assert "exact_match" in result.out and "adapter" in result.out  # the printed table


def test_bad_heldout_rows_are_skipped_and_counted(tmp_path):
    from sft.evaluate import load_heldout
    from tests.conftest import write_jsonl

    path = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "x"}, "not json"])
    items, skipped = load_heldout(str(path))
    assert skipped == 2 and items == [([{"role": "user", "content": "a"}], "b")]


def test_eval_scores_with_the_graders_named_and_reports_what_they_could_not_score(cli, tmp_path):
    """On the tiny base: a JSON Schema grader and a Python grader that fails on every row; the row
    counts as 0 and is reported, the run goes on."""
    schema = tmp_path / "flat.json"
    schema.write_text(json.dumps({"type": "object", "additionalProperties": {"type": "string"}}))
    module = tmp_path / "mine.py"
    module.write_text("def strict(answer):\n    raise RuntimeError('no verdict')\n")
    report_path = tmp_path / "report.json"
    result = cli("eval", "--base-model", "loradock/tiny-chat", "--data", ASSETS / "tasks" / "json" / "heldout.jsonl",
                 "--limit", "6", "--grader", f"json_schema:{schema}", "--grader", f"python:{module}:strict",
                 "--output", report_path)
    assert result.code == 0, result.text[-3000:]
    report = json.loads(report_path.read_text())
    names = [f"json_schema:{schema}", f"python:{module}:strict"]
    assert list(report["metrics"]["base"]) == names and report["metrics"]["base"][names[1]] == 0.0
    assert 0 <= report["metrics"]["base"][names[0]] <= 1
    assert [g["grader"] for g in report["graders"]] == ["json_schema", "python"]
    assert report["graders"][0]["sha256"] and report["graders"][1]["function"] == "strict"
    failed = report["grader_failures"]["base"][names[1]]
    assert failed["rows"] == 6 and "RuntimeError: no verdict" in failed["first"]
    assert names[0] not in report["grader_failures"]["base"]  # an answer that is not JSON is a 0, not a failure
    assert "could not score 6 of 6 rows" in result.out
