"""`make demo`'s pipeline end to end on the real base model, with DEMO_UI=0 and a fraction of the
training steps: base model, registry, two task adapters trained and pushed, one vLLM server
hot-loading them, eval through the OpenAI endpoint, the report; then a second run that reuses
everything, its evaluations included."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # trains two adapters and starts vLLM

BASE = "loradock/smollm2-135m-instruct-q4_1"
TASKS = ("commas", "json")
# Every line the demo prints: a stage's, the results table's, a target's, or an empty one.
OUTPUT_LINE = re.compile(r"\[[1-6]/6\] .* \.\.\. .*|\|.*\||  (PASS|MISS)  .*|")


def run_demo(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loradock.demo"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1800)


def assert_only_stage_output(run: subprocess.CompletedProcess) -> None:
    """One line per stage and the results; what the libraries print went to the logs."""
    assert run.stderr == "", run.stderr[-3000:]
    assert all(OUTPUT_LINE.fullmatch(line) for line in run.stdout.splitlines()), run.stdout
    assert all("logs/" in line for line in re.findall(r"^\[[2-5]/6\] .*", run.stdout, flags=re.M)), run.stdout


def test_demo_trains_publishes_serves_and_reports(tmp_path, real_base_dir):
    home = tmp_path / "home"
    shutil.copytree(real_base_dir, home / "models" / real_base_dir.name)  # the session's install, not a second one
    env = {**os.environ, "LORADOCK_HOME": str(home), "DEMO_UI": "0", "DEMO_STEPS_SCALE": "0.5"}
    first = run_demo(env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    stages = re.findall(r"^\[(\d)/6\] .*", first.stdout, flags=re.M)
    assert stages == ["1", "2", "3", "4", "5", "6"], first.stdout
    assert all(re.search(r"\(\d+\.\d s\)$", line) for line in re.findall(r"^\[[2-5]/6\] .*", first.stdout, flags=re.M))
    assert_only_stage_output(first)
    logs = home / "logs"
    for name in ("demo-registry", "demo-train-commas", "demo-train-json", "demo-serve", "demo-eval-commas",
                 "demo-eval-json"):
        assert (logs / f"{name}.log").stat().st_size > 0, name
    assert re.search(r"[\r\n] *\d+%\|[^|\r\n]*\| *\d+/\d+ \[", (logs / "demo-train-json.log").read_text())  # its bar

    report = json.loads((home / "demo" / "report.json").read_text())
    table, adapters = report["exact_match"], report["adapters"]
    assert set(adapters) == set(TASKS) and all(name.endswith("@v1") for name in adapters.values())
    assert set(table) == {BASE, *adapters.values()}
    for task, name in adapters.items():  # each adapter beats the base on its own task
        assert table[name][task] >= table[BASE][task] + 0.3, table
    markdown = (home / "demo-report.md").read_text()
    for name, scores in table.items():
        row = f"| `{name}` | " + " | ".join(f"{scores[task]:.0%}" for task in TASKS) + " |"
        assert row in markdown
    assert "## Targets" in markdown and "demo-report.png" in markdown
    assert (home / "demo-report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (home / "logs" / "demo-serve.log").exists() and not list(home.glob("adapters/.*loradock-run"))

    second = run_demo(env)  # idempotent: nothing retrained, nothing pushed again
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert_only_stage_output(second)
    assert "commas: reused" in second.stdout and "json: reused" in second.stdout
    assert "the same models as last time: their reports reused" in second.stdout
    assert second.stdout.count("(already there)") == 3  # the base and both adapters
    assert json.loads((home / "demo" / "report.json").read_text())["adapters"] == adapters
