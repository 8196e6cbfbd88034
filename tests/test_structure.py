"""The shape of the code: the package graph (import-linter), function length, and the config
story every command shares (`--config`, `--print-config`, `--help` defaults from one dataclass)."""

import ast
import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loradock.cli import main
from loradock.config import default_of, documented_fields, shown
from tests.conftest import vllm_server_args

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("hub", "sft", "serve", "ui", "loradock")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_the_package_graph_keeps_its_contracts():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout and "8 kept" in result.stdout


@pytest.mark.parametrize("module, sneaky_import, broken, chain", [
    ("serve/runtime.py", "from sft.config import TrainArgs", "serve imports none of sft, ui",
     "serve.runtime -> sft.config"),
    ("ui/app.py", "from huggingface_hub import HfApi", "only hub talks to huggingface_hub",
     "ui.app -> huggingface_hub"),
    ("sft/train.py", "from hub.storage import Storage", "only hub imports the registry server",
     "sft.train -> hub.storage"),
    ("ui/votes.py", "from loradock.demo import Demo", "the floors: the CLI and demo, then the stages",
     "ui.votes -> loradock.demo"),
    ("loradock/home.py", "from hub.client import Registry", "the floors: the CLI and demo, then the stages",
     "loradock.home -> hub.client"),
])
def test_a_forbidden_import_breaks_the_build(tmp_path, module, sneaky_import, broken, chain):
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    assert lint_imports(tmp_path).returncode == 0  # the copy keeps every contract until the import below
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n\ndef sneaky():\n    {sneaky_import}\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert broken in result.stdout.replace("\n", " ") and "BROKEN" in result.stdout
    assert chain in result.stdout


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_no_function_is_over_80_lines():
    long = [f"{path.relative_to(REPO)}:{name} ({length} lines)" for package in PACKAGES
            for path in (REPO / package).rglob("*.py") for name, length in functions(path) if length > 80]
    assert not long


def classes(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            yield node.name, node.end_lineno - node.lineno + 1


def test_no_class_in_serve_is_over_120_lines():
    """The serving layer stays one small piece per concern (`serve.middleware`), each class readable whole."""
    long = [f"{path.relative_to(REPO)}:{name} ({length} lines)" for path in sorted((REPO / "serve").rglob("*.py"))
            for name, length in classes(path) if length > 120]
    assert not long, f"classes over 120 lines in serve/: {', '.join(long)}; split them by concern"


def test_code_cites_no_tracker_numbers():
    cited = [f"{path.relative_to(REPO)}:{number}" for package in (*PACKAGES, "bench", "tests")
             for path in (REPO / package).rglob("*.py")
             for number, line in enumerate(path.read_text().splitlines(), start=1)
             if re.search(r"\b[Ii]ssue #?\d+", line)]
    assert not cited


# --- one config story -------------------------------------------------------------------------

def command_dataclasses():
    from hub.cli import (GcArgs, ListArgs, LoginArgs, LogoutArgs, OrgAddArgs, OrgMemberArgs, PullArgs, PushArgs,
                         RegistryConfig, RootArgs, TokenCreateArgs, UserArgs)
    from serve.balancer import BalancerConfig
    from serve.config import ServeConfig
    from sft.commands import BaseBuildArgs, BaseImportArgs, BaseInstallArgs, DataCheckArgs, EvalArgs
    from sft.config import TrainArgs
    from sft.merge import MergeArgs
    from ui.cli import ExportArgs, ReportArgs, UIConfig
    from ui.revisions import LineageArgs, PromoteArgs
    from ui.rollouts import RolloutAbortArgs, RolloutStatusArgs, RolloutWatchArgs

    return {("train",): TrainArgs, ("serve",): ServeConfig, ("ui",): UIConfig, ("hub", "serve"): RegistryConfig,
            ("eval",): EvalArgs, ("data", "check"): DataCheckArgs, ("base", "build"): BaseBuildArgs,
            ("base", "install"): BaseInstallArgs, ("base", "import"): BaseImportArgs, ("merge",): MergeArgs,
            ("balance",): BalancerConfig, ("push",): PushArgs, ("pull",): PullArgs, ("list",): ListArgs,
            ("hub", "login"): LoginArgs, ("hub", "logout"): LogoutArgs, ("hub", "token", "create"): TokenCreateArgs,
            ("hub", "user", "add"): UserArgs, ("hub", "user", "remove"): UserArgs, ("hub", "user", "list"): RootArgs,
            ("hub", "org", "add"): OrgAddArgs, ("hub", "org", "remove-member"): OrgMemberArgs,
            ("hub", "org", "list"): RootArgs, ("hub", "gc"): GcArgs, ("votes", "report"): ReportArgs,
            ("votes", "export"): ExportArgs, ("lineage",): LineageArgs, ("promote",): PromoteArgs,
            ("rollout", "status"): RolloutStatusArgs, ("rollout", "watch"): RolloutWatchArgs,
            ("rollout", "abort"): RolloutAbortArgs}


def leaf_commands(parser=None, words=()):
    """Every runnable command of the CLI, as its words."""
    import argparse

    from loradock.cli import make_parser

    parser = parser or make_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [words]
    return [leaf for name, sub in subs[0].choices.items() for leaf in leaf_commands(sub, (*words, name))]


def test_every_command_is_on_the_config_story():
    """Each command takes --config and --print-config from one dataclass (this list grows with them).
    `methods compare` alone keeps its own --config, the training config it compares methods on."""
    commands = set(leaf_commands())
    assert commands - set(command_dataclasses()) == {("methods", "compare")}


def help_entries(command, capsys) -> dict[str, str]:
    """{flag: its help text} from `loradock COMMAND --help`, lines unwrapped."""
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    entries, current = {}, None
    out = capsys.readouterr().out
    for line in out[out.index("\n\n"):].splitlines():  # after the usage block
        entry = re.match(r"  (--[\w-]+|[A-Z][A-Z_]*)\b", line)  # a flag or positional, indented two spaces
        if entry:
            current = entry.group(1)
            entries[current] = line
        elif current:  # argparse wraps after a hyphen too (loradock/tiny-|chat): no space there
            entries[current] += ("" if re.search(r"\w-$", entries[current]) else " ") + line.strip()
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


@pytest.mark.parametrize("command", list(command_dataclasses()), ids=" ".join)
def test_every_help_default_is_the_dataclass_default(command, capsys):
    cls = command_dataclasses()[command]
    entries = help_entries(command, capsys)
    assert "--config" in entries and "--print-config" in entries
    for f in documented_fields(cls):
        positional = re.match(r"[A-Z][A-Z_]*", f.metadata.get("metavar") or f.name.upper()).group(0)
        flag = positional if f.metadata.get("positional") else "--" + f.metadata.get("one", f.name).replace("_", "-")
        match = re.search(r"\(default: ([^)]*)\)", entries.get(flag, ""))
        assert match, f"{flag} has no default in `loradock {' '.join(command)} --help`"
        assert match.group(1) == shown(default_of(f)), flag


# Flags that make each command's settings valid, and a line the printed YAML must then hold.
ROUND_TRIP = {("train",): (["--data", "d.jsonl", "--output", "o", "--lr", "1e-3"], "learning_rate: 0.001"),
              ("eval",): (["--data", "h.jsonl", "--base-url", "http://x/v1", "--model", "a/b", "--model", "c/d"],
                          "- c/d"),
              ("data", "check"): (["d.jsonl", "--max-length", "64"], "max_length: 64"),
              ("base", "build"): (["--seed", "3"], "seed: 3"),
              ("base", "install"): (["--wheel", "w.whl"], "wheel: w.whl"),
              ("base", "import"): (["m.gguf", "--output", "o"], "gguf: m.gguf"),
              ("merge",): (["adapters/a", "--limit", "4"], "limit: 4"),
              ("balance",): (["--replica", "127.0.0.1:8001", "--replica", "127.0.0.1:8002"], "- 127.0.0.1:8002"),
              ("push",): (["adapters/a", "alice/a", "--tag", "v1"], "tag: v1"),
              ("pull",): (["alice/a@v1", "--to", "out"], "to: out"),
              ("list",): (["--limit", "7"], "limit: 7"),
              ("hub", "login"): (["--registry", "http://r.example"], "registry: http://r.example"),
              ("hub", "logout"): (["--registry", "http://r.example"], "registry: http://r.example"),
              ("hub", "token", "create"): (["--user", "bob", "--read-only"], "read_only: true"),
              ("hub", "user", "add"): (["bob"], "name: bob"),
              ("hub", "user", "remove"): (["bob"], "name: bob"),
              ("hub", "user", "list"): (["--root", "r"], "root: r"),
              ("hub", "org", "add"): (["lab", "--member", "bob:write"], "- bob:write"),
              ("hub", "org", "remove-member"): (["lab", "bob"], "user: bob"),
              ("hub", "org", "list"): (["--root", "r"], "root: r"),
              ("hub", "gc"): (["--grace", "60"], "grace: 60.0"),
              ("votes", "report"): (["--format", "json"], "format: json"),
              ("votes", "export"): (["--adapter", "alice/a"], "adapter: alice/a"),
              ("lineage",): (["alice/a@v2", "--format", "json"], "format: json"),
              ("promote",): (["alice/a@v2", "--tag", "prod", "--canary", "10"], "canary: 10"),
              ("rollout", "status"): (["alice/a", "--tag", "prod", "--advance"], "advance: true"),
              ("rollout", "watch"): (["alice/a", "--tag", "prod", "--every", "5"], "every: 5.0"),
              ("rollout", "abort"): (["alice/a", "--tag", "prod"], "tag: prod")}


@pytest.mark.parametrize("command", list(command_dataclasses()), ids=" ".join)
def test_print_config_round_trips_through_config(command, capsys, tmp_path):
    """What --print-config prints loads with --config and resolves to the same settings."""
    flags, expected = ROUND_TRIP.get(command, (["--port", "1234"], "port: 1234"))
    assert main([*command, "--print-config", *flags]) == 0
    first = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(first)
    assert main([*command, "--config", str(tmp_path / "c.yaml"), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(first)
    assert expected in first


def test_every_shipped_serve_config_loads(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    configs = sorted((REPO / "serve" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# loradock serve --config "), f"{path.name} must open with the command that runs it"
        assert main(["serve", "--config", str(path.relative_to(REPO)), "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["base_model"]


def test_the_vllm_section_reaches_vllms_own_parser(tmp_path, monkeypatch):
    """`vllm:` keys travel as vLLM's own --config file, read by the parser vLLM's server uses."""
    from serve.config import ServeConfig
    from serve.launcher import vllm_command, write_vllm_config

    monkeypatch.setenv("LORADOCK_HOME", str(tmp_path))
    config = ServeConfig(vllm={"max_cpu_loras": 12, "enforce_eager": True}, base_path="some/model", port=8123)
    command = vllm_command(config, on_gpu=False, vllm_config=write_vllm_config(config))
    parsed = vllm_server_args(command)
    assert parsed.max_cpu_loras == 12 and parsed.enforce_eager is True
    assert parsed.model == "some/model" and parsed.port == 8123 and parsed.enable_lora


def test_every_start_up_adapter_reaches_vllms_parser(tmp_path, monkeypatch):
    """Several --adapter LoRAs are one --lora-modules list: vLLM's parser keeps only the last of
    repeated flags (with a "Found duplicate keys" warning)."""
    import json

    from serve.config import ServeConfig
    from serve.launcher import vllm_command

    monkeypatch.setenv("LORADOCK_HOME", str(tmp_path))
    folders = {}
    for name in ("a/one", "a/two@v1", "three"):
        folders[name] = tmp_path / name.replace("/", "-")
        folders[name].mkdir()
        (folders[name] / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    config = ServeConfig(base_path="some/model", startup_adapters={k: str(v) for k, v in folders.items()})
    parsed = vllm_server_args(vllm_command(config, False, None))
    assert {(m.name, m.path) for m in parsed.lora_modules} == {(k, str(v)) for k, v in folders.items()}


def test_every_kind_of_vllm_setting_reaches_vllms_parser_as_the_user_wrote_it(tmp_path, monkeypatch):
    """Nested config objects, lists, enums, false booleans and mappings in `vllm:`: checked against
    EngineArgs, written to vLLM's --config file, carried in the environment, read by vLLM's parser."""
    from vllm.engine.arg_utils import EngineArgs

    from loradock.cli import make_parser
    from serve.cli import resolve
    from serve.config import ServeConfig
    from serve.launcher import vllm_command, write_vllm_config

    monkeypatch.setenv("LORADOCK_HOME", str(tmp_path))
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump({"vllm": {
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        "allowed_media_domains": ["a.example", "b.example"], "mamba_backend": "cpu",
        "enable_prefix_caching": False, "custom_histogram_buckets": {"e2e": [0.5, 1.0]}}}))
    config = resolve(make_parser().parse_args(["serve", "--config", str(tmp_path / "serve.yaml")]))
    assert config.vllm["structured_outputs_config"] == {"backend": "xgrammar", "disable_any_whitespace": True}
    for key, value in config.to_environment().items():  # vLLM's processes read it back from JSON
        monkeypatch.setenv(key, value)
    assert ServeConfig.from_environment().vllm == config.vllm
    config.base_path = "some/model"
    command = vllm_command(config, on_gpu=False, vllm_config=write_vllm_config(config))
    engine = EngineArgs.from_cli_args(vllm_server_args(command))
    assert engine.structured_outputs_config.backend == "xgrammar"
    assert engine.structured_outputs_config.disable_any_whitespace is True
    assert engine.allowed_media_domains == ["a.example", "b.example"]
    assert str(getattr(engine.mamba_backend, "value", engine.mamba_backend)) == "cpu"
    assert engine.enable_prefix_caching is False


def test_serve_settings_cross_into_vllms_processes_as_the_same_dataclass(monkeypatch):
    from serve.config import ServeConfig

    config = ServeConfig(adapter=["a/b@v1"], vllm={"max_cpu_loras": 8}, base_path="p", token="secret-token",
                         startup_adapters={"a/b@v1": "/x"})
    for key, value in config.to_environment().items():
        monkeypatch.setenv(key, value)
    assert ServeConfig.from_environment() == config
    assert dataclasses.asdict(ServeConfig.from_environment()) == dataclasses.asdict(config)


def test_secrets_are_not_printed(capsys):
    assert main(["serve", "--print-config", "--token", "hf_secret", "--api-key", "key-secret"]) == 0
    out = capsys.readouterr().out
    assert "hf_secret" not in out and "key-secret" not in out and "token" not in out


def test_serve_refuses_with_the_build_command_when_the_base_is_not_built(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORADOCK_HOME", str(tmp_path))
    assert main(["serve", "--port", "18123"]) == 2
    err = capsys.readouterr().err
    assert "the embedded base model loradock/tiny-chat is not in" in err and "`loradock base build`" in err
    assert not (tmp_path / "models").exists()  # nothing was built
