"""What loradock keeps inside vLLM's API server process, shared by the resolver plugin and the
middleware: the serving configuration (`ServeConfig`, handed over by `loradock serve`), the
adapters known by name, and fetching an adapter from the registry with its compatibility check.
"""

import asyncio
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from hub.adapter import METHODS, PULL_MARKER, AdapterRef, chat_template, read_json
from hub.adapter.card import CardInfo
from hub.adapter.checks import ServedBase, check_folder
from loradock.errors import AdapterRefused, LoradockError, NotFound
from serve.config import ServeConfig

@lru_cache(maxsize=1)
def config() -> ServeConfig | None:
    """The configuration `loradock serve` passed; None when vLLM runs without loradock."""
    return ServeConfig.from_environment()


def served_base() -> ServedBase:
    cfg = config()
    return ServedBase(cfg.base_model, cfg.base_path, cfg.max_lora_rank)


@dataclass
class Adapter:
    name: str  # what clients send as `model`
    path: Path
    info: dict  # repo, revision, commit sha, method, rank, headline metric: shown in /v1/models
    chat_template: str | None
    served_by: str = "vllm-lora"  # a key of hub.adapter.SERVED_AS

    @property
    def soft_prompt(self) -> bool:
        """Served through vLLM's prompt-embeddings input (`serve.soft_prompt`), not a LoRA slot."""
        return self.served_by == "prompt-embeds"


_known: dict[str, Adapter] = {}
_unloaded: set[str] = set()  # names forgotten since: not listed again until a request asks for them
_locks: dict[str, asyncio.Lock] = {}


def describe(name: str, folder: Path) -> Adapter:
    folder = Path(folder)
    pulled = read_json(folder / PULL_MARKER)
    card = CardInfo.from_folder(folder)
    if AdapterRef.looks_like(name):  # one pulled folder serves every name of its commit
        ref = AdapterRef.of(name)
        pulled = {**pulled, "repo_id": ref.repo_id, "revision": ref.revision}
    metric = card.headline
    info = {"repo_id": pulled.get("repo_id"), "revision": pulled.get("revision"), "commit": pulled.get("commit"),
            "method": card.method, "rank": card.rank, "base_model": card.base_model,
            "metric": {"name": metric.name, "value": metric.value} if metric else None}
    served_by = METHODS[card.method].served_by if card.method in METHODS else "vllm-lora"
    return Adapter(name, folder, info, chat_template(folder), served_by)


def remember(name: str, folder: Path) -> Adapter:
    _known[name] = describe(name, folder)
    _unloaded.discard(name)
    return _known[name]


def forget(name: str) -> None:
    _known.pop(name, None)
    _unloaded.add(name)


def soft_prompted() -> list[Adapter]:
    """The prompt-tuning and p-tuning adapters known now (start-up ones included): vLLM does not
    list them, having never loaded them."""
    cfg = config()
    for name in cfg.startup_adapters if cfg else ():
        if name not in _unloaded:
            known(name)
    return [adapter for adapter in _known.values() if adapter.soft_prompt]


def known(name: str) -> Adapter | None:
    cfg = config()
    if name not in _known and cfg and name in cfg.startup_adapters:
        remember(name, Path(cfg.startup_adapters[name]))
    return _known.get(name)


async def fetch(name: str) -> Adapter:
    """The adapter `org/name[@revision]` from the registry, pinned to the commit its revision
    resolves to now, checked against this server; pulled once, then served from the local copy.

    Raises:
        NotFound: no such repo or revision, or not a registry name (the client gets a 404).
        AdapterRefused: it cannot be served here (400).
        Unreachable, RegistryRefused, LoradockError: the registry is down, said no, or sent a
            damaged file (the middleware maps each type to its status).
    """
    from hub.client import pull

    cfg = config()
    if cfg is None or not cfg.registry or not AdapterRef.looks_like(name):
        raise NotFound(f"{name} is not a registry adapter")
    try:
        AdapterRef.parse(name)
    except LoradockError as e:  # a malformed id or revision: the client's to change
        raise AdapterRefused(name, [e.problem]) from None
    async with _locks.setdefault(name, asyncio.Lock()):
        if name in _known:
            return _known[name]
        result = await asyncio.to_thread(pull, name, endpoint=cfg.registry, token=cfg.token)
        await asyncio.to_thread(check_folder, result.path, served_base())
        return remember(name, result.path)
