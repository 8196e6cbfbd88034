"""The serve/ command: `loradock serve`."""

from loradock.home import DEFAULT_BASE_MODEL


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the base model and hot-swapped LoRA adapters behind one OpenAI endpoint (vLLM)",
        description="Start vLLM's OpenAI-compatible server with LoRA: adapters named here are pulled (pinned to a "
                    "commit) and registered at start-up; any other registry adapter is loaded on its first request "
                    "(model=\"org/adapter\" or \"org/adapter@revision\"). Every adapter is checked before it goes live.",
    )
    p.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help=f"base model (default {DEFAULT_BASE_MODEL})")
    p.add_argument("--adapter", action="append", default=[], metavar="REPO_ID[@REVISION]",
                   help="an adapter to register at start-up (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-loras", type=int, default=4, help="adapters active in one batch (default 4)")
    p.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank served: 8, 16, 32, 64, ...")
    p.add_argument("--registry", help="registry URL (default: $HF_ENDPOINT, else http://127.0.0.1:8090)")
    p.add_argument("--token", help="registry token (default: HF_TOKEN, else `loradock hub login`'s)")
    p.add_argument("--api-key", help="require this key on every route but /health (also: LORADOCK_API_KEY)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--kv-cache-gib", type=int, help="KV cache size on a CPU, in whole GiB (default: 1/8 of the "
                                                     "machine's memory, between 1 and 8)")
    p.add_argument("--dtype", help="default: float32 on a CPU, auto on a GPU")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="vLLM's log level (the log goes to $LORADOCK_HOME/logs/serve-PORT.log)")
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    import os

    from hub.client import endpoint_url, token_for
    from loradock.errors import LoradockError
    from serve.launcher import ServeArgs, serve
    from sft.config import SERVABLE_RANKS, nearest_servable_rank

    if args.max_lora_rank not in SERVABLE_RANKS:
        raise LoradockError(f"--max-lora-rank {args.max_lora_rank} is not one vLLM accepts",
                            f"use --max-lora-rank {nearest_servable_rank(args.max_lora_rank)}")
    registry = endpoint_url(args.registry)
    return serve(ServeArgs(
        base_model=args.base_model, adapters=args.adapter, host=args.host, port=args.port, max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank, registry=registry, token=token_for(registry, args.token),
        api_key=args.api_key or os.environ.get("LORADOCK_API_KEY"), max_model_len=args.max_model_len,
        kv_cache_gib=args.kv_cache_gib or default_kv_cache_gib(), dtype=args.dtype, log_level=args.log_level))


def default_kv_cache_gib() -> int:
    """An eighth of the memory, 1 to 8 GiB: room for many sequences without starving the rest."""
    import os

    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return int(min(8, max(1, total_gib // 8)))
