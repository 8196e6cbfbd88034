"""The serve/ commands: `loradock serve [--config serve.yaml] [--FLAG VALUE ...]`, and
`loradock balance --replica HOST:PORT ...` (nginx in front of several of them)."""

from serve.balancer import BalancerConfig
from serve.config import ServeConfig


def register(subparsers) -> None:
    from loradock.config import add_config_flags

    p = subparsers.add_parser(
        "serve", help="serve the base model and hot-swapped LoRA adapters behind one OpenAI endpoint (vLLM)",
        description="Start vLLM's OpenAI-compatible server with LoRA: adapters named here are pulled (pinned to a "
                    "commit) and registered at start-up; any other registry adapter is loaded on its first request "
                    "(model=\"org/adapter\" or \"org/adapter@revision\"). Every adapter is checked before it goes live. "
                    "A `vllm:` section in --config, or `--vllm.KEY VALUE` on the command line, passes any vLLM engine "
                    "argument through.",
    )
    add_config_flags(p, ServeConfig, example="serve/configs/serve.yaml")
    p.set_defaults(func=run_serve, takes_overrides=True)

    p = subparsers.add_parser(
        "balance", help="run nginx as a load balancer in front of several `loradock serve` replicas",
        description="Render serve/configs/nginx.conf for these replicas, check it with `nginx -t` and run nginx in "
                    "the foreground (Debian's nginx: apt-get install nginx). The replicas share one registry and "
                    "hot-load any adapter by name@revision on its first request, pinned to the same commit, so the "
                    "balancer keeps no adapter state: round robin by default; --affinity hashes on the "
                    "X-Loradock-Model header loradock's clients set. A request a replica cannot answer (refused, "
                    "timed out, 502/503/504) is retried on the next one.",
    )
    add_config_flags(p, BalancerConfig, example="what --print-config printed")
    p.set_defaults(func=run_balance)


def resolve(args) -> ServeConfig:
    """The settings from `--config`, the flags and their defaults, checked (every problem at once)."""
    import dataclasses

    from loradock.config import from_command_line, section_overrides
    from serve.config import VLLM_SECTION, validate

    overrides = section_overrides(getattr(args, "overrides", []), "serve", "--vllm.KEY VALUE")
    resolved = from_command_line(ServeConfig, args, overrides, sections=(VLLM_SECTION,),
                                 what="the serving configuration", validate=lambda r: validate(r.args))
    return dataclasses.replace(resolved.args, vllm=resolved.sections["vllm"])


def run_serve(args) -> int:
    from loradock.config import print_config
    from serve.launcher import serve

    config = resolve(args)
    if getattr(args, "print_config", False):
        return print_config(config, {"vllm": config.vllm})
    return serve(config)


def run_balance(args) -> int:
    from loradock.config import from_command_line, print_config
    from serve.balancer import balance, validate

    config = from_command_line(BalancerConfig, args, what="the balancer configuration",
                               validate=lambda r: validate(r.args)).args
    if getattr(args, "print_config", False):
        return print_config(config)
    return balance(config)
