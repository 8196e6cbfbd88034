"""loradock COMMAND ...

The one console script. Each package registers its own subcommands from its thin `cli` module;
this file only builds the top-level parser, dispatches, and turns a `LoradockError` into a
two-line message and exit status 2 instead of a stack trace.
"""

import argparse
import os
import sys

from loradock.errors import LoradockError

from hub import cli as hub_cli
from serve import cli as serve_cli
from sft import cli as sft_cli
from ui import cli as ui_cli
from ui import revisions, rollouts

# Each module exposes `register(subparsers)`, adding parsers whose `func(args) -> int` runs the command.
COMMAND_MODULES = (sft_cli, hub_cli, serve_cli, ui_cli, revisions, rollouts)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loradock",
        description="Many small task-tuned models out of one base model: train LoRA adapters, "
                    "publish them to a Hub registry, serve them hot-swapped behind one OpenAI endpoint.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = make_parser()
    # `loradock train` takes free-form `--lora.KEY VALUE` / `--training.KEY VALUE` overrides;
    # every other command rejects what it does not know.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return args.func(args) or 0
    except LoradockError as e:
        print(e.message, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
