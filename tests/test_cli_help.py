"""`--help` of every subcommand, through the real entry point."""

import pytest

from loradock.cli import main

COMMANDS = [[], ["train"], ["eval"], ["data"], ["data", "check"], ["base"], ["base", "build"], ["push"], ["pull"],
            ["list"], ["hub"], ["hub", "serve"], ["hub", "token"], ["hub", "token", "create"], ["hub", "login"],
            ["hub", "logout"], ["serve"], ["balance"], ["ui"], ["votes"], ["votes", "report"],
            ["votes", "export"], ["methods"], ["methods", "compare"], ["merge"], ["lineage"], ["promote"],
            ["rollout"], ["rollout", "status"], ["rollout", "watch"], ["rollout", "abort"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "loradock")
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: loradock")
    assert " ".join(["loradock", *command]) in out.splitlines()[0]


def test_train_help_lists_every_documented_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ["--config", "--base-model", "--data", "--eval-data", "--eval-split", "--output", "--lora-r",
                 "--lora-alpha", "--lora-dropout", "--target-modules", "--epochs", "--max-steps", "--lr",
                 "--batch-size", "--max-length", "--packing", "--seed", "--resume", "--columns",
                 "--max-bad-fraction"]:
        assert flag in out, flag


def test_unknown_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--data", "x.jsonl", "--bogus", "1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
