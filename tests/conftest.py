"""Shared fixtures: an isolated Hugging Face home, the tiny base model built once, CLI runners.

Everything is offline and on the CPU. The base model is built once per session into the session's
LORADOCK_HOME (a few minutes); `LORADOCK_TEST_HOME` points the session at a folder kept between
runs instead, where a build with the same recipe is reused.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "sft" / "assets"


@pytest.fixture(scope="session")
def loradock_home(tmp_path_factory) -> Path:
    home = Path(os.environ.get("LORADOCK_TEST_HOME") or tmp_path_factory.mktemp("loradock-home"))
    os.environ["LORADOCK_HOME"] = str(home)
    return home


@pytest.fixture(autouse=True)
def isolated_hf_home(tmp_path, monkeypatch, loradock_home):
    """No test reads or writes the user's Hugging Face cache or token, or reaches the network."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("LORADOCK_HOME", str(loradock_home))


@pytest.fixture(scope="session")
def base_model_dir(loradock_home) -> Path:
    """The default base model, built once for the session through the code path users take."""
    from loradock.home import DEFAULT_BASE_MODEL
    from sft.base_model import resolve_base_model

    return Path(resolve_base_model(DEFAULT_BASE_MODEL))


@pytest.fixture(scope="session")
def tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir)


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    @property
    def text(self) -> str:
        return self.out + self.err


@pytest.fixture
def cli(capsys, base_model_dir):
    """Run `loradock ARGS...` in-process through the real entry point; returns code and output."""
    from loradock.cli import main

    def run(*args: str) -> CliResult:
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's --help and usage errors
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def run_loradock(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    """`loradock ARGS...` as a separate process (for tests that kill it)."""
    return subprocess.run([sys.executable, "-m", "loradock.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, **kwargs)


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path
