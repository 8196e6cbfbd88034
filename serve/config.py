"""`loradock serve`'s settings: one dataclass for the flags, `--config serve.yaml` and the `vllm:`
section, which passes any of vLLM's engine arguments through (checked against vLLM's own
`EngineArgs` before anything starts):

    # loradock serve --config serve.yaml
    base_model: loradock/smollm2-135m-instruct-q4_1
    adapter: [alice/reverse@v1]
    max_loras: 8
    vllm:
      max_cpu_loras: 64          # any vllm.engine.arg_utils.EngineArgs field
      tensor_parallel_size: 2

The same dataclass, serialised once as JSON in one environment variable, is what loradock's
plugin and middleware read inside vLLM's processes (`ServeConfig.from_environment`).
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from hub.adapter import SERVABLE_RANKS, nearest_servable_rank
from loradock.config import REGISTRY_HELP, TOKEN_HELP, Section, check_fields
from loradock.home import default_base_model, home

ENVIRONMENT = "LORADOCK_SERVE"
LOG_LEVELS = ("debug", "info", "warning", "error")

# vLLM engine arguments that loradock sets from its own flags (or always): refused in `vllm:`.
MANAGED = {"model": "--base-model", "served_model_name": "--base-model", "host": "--host", "port": "--port",
           "max_loras": "--max-loras", "max_lora_rank": "--max-lora-rank", "max_model_len": "--max-model-len",
           "dtype": "--dtype", "enable_lora": None, "lora_modules": "--adapter"}


@dataclass
class ServeConfig:
    """What `loradock serve` runs: the base model, its adapters, the server and vLLM's engine."""

    base_model: str = field(default_factory=default_base_model, metadata={
        "help": "base model: an embedded one (loradock/smollm2-135m-instruct-q4_1, the default unless "
                "$LORADOCK_BASE_MODEL names another; loradock/tiny-chat), a local folder or a Hub id "
                "(Qwen/Qwen2.5-0.5B-Instruct)"})
    adapter: list[str] = field(default_factory=list, metadata={
        "help": "an adapter to pull, pin and register at start-up", "metavar": "REPO_ID[@REVISION]"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    max_loras: int = field(default=4, metadata={"help": "adapters active in one batch"})
    max_lora_rank: int = field(default=16, metadata={"help": "largest adapter rank served: 8, 16, 32, 64, ..."})
    registry: str | None = field(default=None, metadata={"help": REGISTRY_HELP})
    token: str | None = field(default=None, metadata={"help": TOKEN_HELP, "secret": True})
    api_key: str | None = field(default=None, metadata={
        "help": "require this key on every route but /health (none: $LORADOCK_API_KEY, else $VLLM_API_KEY, else no "
                "key)", "secret": True})
    adapter_namespace: list[str] = field(default_factory=list, metadata={
        "help": "a user or organisation whose registry adapters may be hot-loaded on a first request; repeat it "
                "for more (none: the namespaces of --adapter and the token's own user)", "metavar": "ORG"})
    adapter_cache_mb: float = field(default=10240, metadata={
        "help": "size cap of the pulled adapter copies in $LORADOCK_HOME/pulled: past it, the least recently used "
                "ones no loaded adapter uses are deleted (pulled again when asked for)"})
    unload_drain_timeout: float = field(default=5.0, metadata={
        "help": "seconds an unload waits for the requests using the adapter, holding new ones back; past it the "
                "unload answers 409, unloads nothing, and the held requests go on"})
    follow_refs: float = field(default=30.0, metadata={
        "help": "seconds between resolving again the tags and branches clients name (org/name@prod): a moved ref is "
                "answered by its new commit within this, and at once when the registry's webhook says so",
        "metavar": "SECONDS"})
    canary_pairs: float = field(default=5.0, metadata={
        "help": "percent of a canary's chat requests also asked of both commits in the background, the two answers "
                "kept as a blind pair for the comparison screen's Canary tab ($LORADOCK_HOME/serve/canary-pairs-PORT.jsonl)",
        "metavar": "PERCENT"})
    webhook_url: str | None = field(default=None, metadata={
        "help": "the URL the registry reaches this server's webhook at (none: http://HOST:PORT/loradock/webhook, "
                "127.0.0.1 for a server listening on every address; 'off': subscribe to none, follow by polling)",
        "metavar": "URL"})
    max_model_len: int | None = field(default=None, metadata={"help": "context length (none: the model's)"})
    kv_cache_gib: int | None = field(default=None, metadata={
        "help": "KV cache size on a CPU, in whole GiB (none: 1/8 of the machine's memory, between 1 and 8)"})
    dtype: str | None = field(default=None, metadata={"help": "weights' dtype (none: float32 on a CPU, auto on a GPU)"})
    restart_engine: int = field(default=0, metadata={
        "help": "times vLLM is started again when it stops on its own (its engine killed or crashed), with the "
                "--adapter ones and those loaded by path; 0: loradock serve stops too, saying why"})
    log_level: str = field(default="warning", metadata={
        "help": "vLLM's log level: debug, info, warning or error (the log goes to $LORADOCK_HOME/logs/serve-PORT.log)"})
    # Not flags: the `vllm:` section, and what `loradock serve` decides at start-up for vLLM's processes.
    vllm: dict = field(default_factory=dict, metadata={"flag": False})
    base_path: str | None = field(default=None, metadata={"flag": False})  # what vLLM loads for base_model
    startup_adapters: dict = field(default_factory=dict, metadata={"flag": False})  # served name -> pulled folder
    startup_refs: dict = field(default_factory=dict, metadata={"flag": False})  # --adapter -> its commit at start-up
    hot_load_namespaces: list = field(default_factory=list, metadata={"flag": False})  # --adapter-namespace, resolved
    webhook_secret: str | None = field(default=None, metadata={"flag": False})  # of the webhook subscribed with

    def loaded_by_path_file(self) -> "AdapterList":
        """Where vLLM's API server writes down the adapters loaded by path, for a restart."""
        return AdapterList(home() / "serve" / f"loaded-{self.port}.json")

    def to_environment(self) -> dict[str, str]:
        """The environment variable vLLM's processes read this from (secrets stay off command lines)."""
        return {ENVIRONMENT: json.dumps(dataclasses.asdict(self))}

    @classmethod
    def from_environment(cls) -> "ServeConfig | None":
        """The settings `loradock serve` handed to this process; None when vLLM runs without loradock."""
        raw = os.environ.get(ENVIRONMENT)
        return cls(**json.loads(raw)) if raw else None


@dataclass(frozen=True)
class AdapterList:
    """A JSON file of {served name: adapter folder}, replaced whole on each write."""

    path: Path

    def read(self) -> dict[str, str]:
        try:
            value = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(value, dict):
            return {}
        return {name: folder for name, folder in value.items() if isinstance(folder, str)}

    def write(self, adapters: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(adapters), encoding="utf-8")
        os.replace(staging, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def check_vllm_section(values: dict, problems: list[str]) -> dict:
    """The `vllm:` section checked against vLLM's `EngineArgs` (names and types), with loradock's
    own settings refused there and named by their flag.

    Returns plain data for vLLM's own `--config` file and for the environment of its processes:
    the checked value where it is plain data (a number from a command-line string, an enum's
    value), else the user's own (a nested config such as `structured_outputs_config`, which the
    check turns into vLLM's config object, is written back as the mapping the user gave)."""
    from vllm.engine.arg_utils import EngineArgs

    values = {key.replace("-", "_"): value for key, value in values.items()}
    for key in [k for k in values if k in MANAGED]:
        flag = MANAGED[key]
        problems.append(f"vllm.{key} is set by loradock serve" + (f"; use {flag}" if flag else "; remove it"))
        values.pop(key)
    checked = check_fields(EngineArgs, values, problems, lambda key: f"vllm.{key}")
    return {key: value if is_plain(value) else given_as_data(values[key]) for key, value in checked.items()}


def is_plain(value) -> bool:
    """Whether `value` is data YAML and JSON write as they are: scalars, and lists and mappings of them."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, list):  # not a tuple: YAML's safe writer has no form for one
        return all(is_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and is_plain(item) for key, item in value.items())
    return False


def given_as_data(value):
    """A setting as the user gave it, as data: a command-line string holding a mapping is parsed."""
    import yaml

    return yaml.safe_load(value) if isinstance(value, str) else value


VLLM_SECTION = Section("vllm", check_vllm_section)


def is_namespace(name: str) -> bool:
    """A user or organisation name as the Hub spells them (the part of a repo id before the slash)."""
    from hub.adapter import check_repo_id
    from loradock.errors import LoradockError

    try:
        check_repo_id(f"{name}/x")
    except LoradockError:
        return False
    return "/" not in name


def serving_key(config: ServeConfig) -> str | None:
    """The key every route but /health requires: --api-key, else $LORADOCK_API_KEY, else vLLM's own
    $VLLM_API_KEY (which vLLM would enforce by itself), else none."""
    return config.api_key or os.environ.get("LORADOCK_API_KEY") or os.environ.get("VLLM_API_KEY") or None


def validate(config: ServeConfig) -> list[str]:
    problems = []
    if config.max_lora_rank not in SERVABLE_RANKS:
        problems.append(f"--max-lora-rank {config.max_lora_rank} is not one vLLM accepts; "
                        f"use --max-lora-rank {nearest_servable_rank(config.max_lora_rank)}")
    if not 0 < config.port < 65536:
        problems.append(f"--port {config.port} is not a TCP port; pass --port from 1 to 65535")
    if config.max_loras < 1:
        problems.append(f"--max-loras {config.max_loras} must be at least 1")
    if config.kv_cache_gib is not None and config.kv_cache_gib < 1:
        problems.append(f"--kv-cache-gib {config.kv_cache_gib} must be at least 1")
    if config.adapter_cache_mb < 0:
        problems.append(f"--adapter-cache-mb {config.adapter_cache_mb} must be 0 or more")
    if config.restart_engine < 0:
        problems.append(f"--restart-engine {config.restart_engine} must be 0 or more")
    if not 0 <= config.canary_pairs <= 100:
        problems.append(f"--canary-pairs {config.canary_pairs:g} is not a percent; pass 0 to 100 (0: no pairs)")
    if config.follow_refs <= 0:
        problems.append(f"--follow-refs {config.follow_refs} must be above 0 seconds")
    if config.webhook_url not in (None, "off") and not config.webhook_url.startswith(("http://", "https://")):
        problems.append(f"--webhook-url {config.webhook_url!r} is not an http(s) URL; pass e.g. "
                        "--webhook-url http://10.0.0.5:8000/loradock/webhook, or --webhook-url off")
    if config.unload_drain_timeout <= 0:
        problems.append(f"--unload-drain-timeout {config.unload_drain_timeout} must be above 0 seconds")
    for namespace in config.adapter_namespace:
        if not is_namespace(namespace):
            problems.append(f"--adapter-namespace {namespace!r} is not a user or organisation name; pass e.g. "
                            "--adapter-namespace loradock")
    if config.log_level not in LOG_LEVELS:
        problems.append(f"--log-level {config.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    if config.registry and not config.registry.startswith(("http://", "https://")):
        problems.append(f"--registry {config.registry!r} is not an http(s) URL; pass e.g. --registry http://127.0.0.1:8090")
    return problems
