"""The serve/ command: `loradock serve [--config serve.yaml] [--FLAG VALUE ...]`."""

from serve.config import ServeConfig


def register(subparsers) -> None:
    from loradock.config import add_config_flags

    p = subparsers.add_parser(
        "serve", help="serve the base model and hot-swapped LoRA adapters behind one OpenAI endpoint (vLLM)",
        description="Start vLLM's OpenAI-compatible server with LoRA: adapters named here are pulled (pinned to a "
                    "commit) and registered at start-up; any other registry adapter is loaded on its first request "
                    "(model=\"org/adapter\" or \"org/adapter@revision\"). Every adapter is checked before it goes live. "
                    "A `vllm:` section in --config passes any vLLM engine argument through.",
    )
    add_config_flags(p, ServeConfig, example="serve/configs/serve.yaml")
    p.set_defaults(func=run_serve)


def resolve(args) -> ServeConfig:
    """The settings from `--config`, the flags and their defaults, checked (every problem at once)."""
    import dataclasses

    from loradock.config import from_command_line
    from serve.config import VLLM_SECTION, validate

    resolved = from_command_line(ServeConfig, args, sections=(VLLM_SECTION,), what="the serving configuration",
                                 validate=lambda r: validate(r.args))
    return dataclasses.replace(resolved.args, vllm=resolved.sections["vllm"])


def run_serve(args) -> int:
    from loradock.config import print_config
    from serve.launcher import serve

    config = resolve(args)
    if getattr(args, "print_config", False):
        return print_config(config, {"vllm": config.vllm})
    return serve(config)
