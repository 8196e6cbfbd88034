"""The training configuration: example configs, precedence, and every problem reported at once."""

import shlex
from pathlib import Path

import pytest

import yaml

from loradock.cli import main
from loradock.config import load_yaml
from loradock.errors import LoradockError
from sft.config import resolve

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "sft" / "configs").glob("*.yaml"))


def opening_command(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# loradock train --config "), f"{path.name} must open with the command that runs it"
    return shlex.split(first[2:])[2:]  # the arguments after `loradock train`


def resolved_train_command(argv: list[str], capsys) -> dict:
    """The configuration `loradock train ARGV` would train with, from the real entry point
    (`--print-config` resolves and prints it, and trains nothing)."""
    assert main(["train", *argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_config_parses_against_the_code(path, monkeypatch, capsys):
    from trl import SFTConfig

    from hub.adapter import METHODS

    monkeypatch.chdir(REPO)
    config = resolved_train_command(opening_command(path), capsys)
    settings = dict(config["peft"])
    METHODS[settings.pop("method")].peft_config(settings)
    SFTConfig(output_dir="unused", use_cpu=True, bf16=False, **config["training"])
    assert config["output"] and config["data"]
    assert resolve(config, {}).to_yaml_dict() == {**config, "resume": False, "overwrite": False}


def test_the_command_line_resolves_as_the_library_does(capsys, tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("data: a.jsonl\noutput: out\nlora:\n  r: 16\ntraining:\n  learning_rate: 1.0e-3\n")
    config = resolved_train_command(["--config", str(file), "--lora-r", "32", "--training.warmup_steps", "7",
                                     "--packing", "--resume"], capsys)
    assert config["peft"] == {"method": "lora", "r": 32, "lora_alpha": 16, "lora_dropout": 0.05,
                              "target_modules": "all-linear"}
    assert config["training"]["learning_rate"] == 1e-3
    assert config["training"]["warmup_steps"] == 7 and config["training"]["packing"] is True
    assert main(["train", "--config", str(file), "--lora-r", "12", "--max-steps", "many", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "--lora-r 12 is a rank vLLM cannot serve" in err and "--training.max_steps 'many' is not a valid int" in err


def test_there_are_example_configs():
    assert {p.name for p in CONFIGS} >= {"reverse.yaml", "qwen2.5-0.5b-gpu.yaml"}


def test_command_line_overrides_yaml_which_overrides_defaults():
    file = {"data": "a.jsonl", "output": "out", "lora": {"r": 16, "lora_alpha": 64}, "training": {"learning_rate": "1e-3"}}
    config = resolve(file, {"lora_r": "32", "lr": "5e-4", "training.warmup_steps": "7", "packing": True})
    assert config.peft["r"] == 32 and config.peft["lora_alpha"] == 64 and config.peft["lora_dropout"] == 0.05
    assert config.training["learning_rate"] == 5e-4 and config.training["warmup_steps"] == 7
    assert config.training["packing"] is True


def test_every_problem_is_reported_at_once_with_the_flag_to_change():
    with pytest.raises(LoradockError) as e:
        resolve({"lora": {"rr": 8}, "training": {"learning_rat": 1}}, {"lora_r": "12", "max_steps": "many", "eval_split": "1.5"})
    message = e.value.message
    assert "no training data: pass --data" in message
    assert "no output folder: pass --output" in message
    assert "unknown option 'rr'; did you mean 'r'?" in message
    assert "unknown option 'learning_rat'; did you mean 'learning_rate'?" in message
    assert "--lora-r 12 is a rank vLLM cannot serve" in message and "use --lora-r 16" in message
    assert "--training.max_steps 'many' is not a valid int" in message
    assert "--eval-split 1.5 must be in [0, 1)" in message


@pytest.mark.parametrize("rank,nearest", [(4, 8), (12, 16), (100, 128), (300, 320), (1000, 512)])
def test_unservable_rank_suggests_the_nearest(rank, nearest):
    with pytest.raises(LoradockError, match=f"use --lora-r {nearest}$|use --lora-r {nearest}\\n"):
        resolve({"data": "d", "output": "o"}, {"lora_r": str(rank)})


def test_fields_loradock_manages_are_refused():
    with pytest.raises(LoradockError, match="--training.output_dir is set by loradock; use --output"):
        resolve({"data": "d", "output": "o", "training": {"output_dir": "x"}}, {})


def test_yaml_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora: [unclosed\n")
    with pytest.raises(LoradockError, match="is not valid YAML"):
        load_yaml(str(bad))
    with pytest.raises(LoradockError, match="does not exist"):
        load_yaml(str(tmp_path / "missing.yaml"))


def test_overrides_parse_both_spellings():
    from loradock.config import section_overrides

    assert section_overrides(["--lora.r", "16", "--training.warmup_steps=3", "--training.packing"], "train",
                             "--peft.KEY") == {"lora.r": "16", "training.warmup_steps": "3", "training.packing": "true"}
    with pytest.raises(LoradockError, match="unrecognized argument '--bogus'"):
        section_overrides(["--bogus", "1"], "train", "--peft.KEY")


@pytest.mark.parametrize("value,expected", [("all-linear", "all-linear"), ("q_proj,v_proj", ["q_proj", "v_proj"]),
                                            (["q_proj"], ["q_proj"])])
def test_target_modules_keep_their_shape(value, expected):
    config = resolve({"data": "d", "output": "o"}, {"target_modules": value})
    assert config.peft["target_modules"] == expected


@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "ia3", "prompt-tuning", "p-tuning", "prefix-tuning",
                                    "llama-adapter"])
def test_every_method_resolves_to_its_peft_config(method):
    from hub.adapter import METHODS, method_of

    config = resolve({"data": "d", "output": "o"}, {"peft": method})
    built = config.method.peft_config(config.peft_settings)
    assert config.method is METHODS[method] and type(built).__name__ == METHODS[method].config_class
    assert method_of(built.to_dict()) is METHODS[method]
    assert resolve(config.to_yaml_dict(), {}).peft == config.peft  # run_config.yaml loads again


def test_the_peft_section_takes_the_methods_fields_and_the_lora_section_still_works():
    config = resolve({"data": "d", "output": "o", "peft": {"method": "prompt-tuning", "num_virtual_tokens": 12,
                                                           "prompt_tuning_init_text": "Reverse the words"}}, {})
    assert config.peft == {"method": "prompt-tuning", "num_virtual_tokens": 12, "prompt_tuning_init": "TEXT",
                           "prompt_tuning_init_text": "Reverse the words"}
    legacy = resolve({"data": "d", "output": "o", "lora": {"r": 16}}, {"lora.lora_alpha": "64"})
    assert legacy.method.name == "lora" and legacy.peft["r"] == 16 and legacy.peft["lora_alpha"] == 64
    dora = resolve({"data": "d", "output": "o", "lora": {"r": 16}}, {"peft": "dora"})
    assert dora.peft["use_dora"] is True and dora.peft["r"] == 16


def test_a_field_of_another_method_is_refused_with_the_methods_fields_and_a_did_you_mean():
    with pytest.raises(LoradockError) as e:
        resolve({"data": "d", "output": "o"}, {"peft": "ia3", "lora_r": "16", "peft.target_modules_x": "q_proj"})
    message = e.value.message
    assert "--peft.r: unknown option 'r'; it is a field of lora, rslora, dora, not of ia3" in message
    assert "unknown option 'target_modules_x'; did you mean 'target_modules'?" in message
    assert "ia3 (IA3Config) takes: target_modules, exclude_modules, feedforward_modules" in message
    with pytest.raises(LoradockError, match="--peft 'prompt_tuning' is not a method loradock trains; did you mean "
                                            "'prompt-tuning'"):
        resolve({"data": "d", "output": "o"}, {"peft": "prompt_tuning"})
    with pytest.raises(LoradockError, match="--peft: PromptTuningConfig refuses these settings: .*prompt_tuning_init_text"):
        resolve({"data": "d", "output": "o"}, {"peft": "prompt-tuning", "peft.prompt_tuning_init": "TEXT"})
    with pytest.raises(LoradockError, match="--peft.task_type is set by loradock"):
        resolve({"data": "d", "output": "o", "peft": {"method": "ia3", "task_type": "SEQ_CLS"}}, {})


def test_a_soft_prompt_must_leave_room_under_max_length():
    with pytest.raises(LoradockError, match="--peft.num_virtual_tokens 60 leaves 4 of --max-length 64 for the rows"):
        resolve({"data": "d", "output": "o"}, {"peft": "prompt-tuning", "num_virtual_tokens": "60", "max_length": "64"})
    with pytest.raises(LoradockError, match="--packing does not work with p-tuning"):
        resolve({"data": "d", "output": "o"}, {"peft": "p-tuning", "packing": True})
    assert resolve({"data": "d", "output": "o"}, {"peft": "dora", "lora_r": "12"}).peft["r"] == 12  # merged: any rank
