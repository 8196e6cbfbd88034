"""What loradock keeps inside vLLM's API server process, shared by the resolver plugin and the
middleware: the serving configuration (handed over by `loradock serve` in the environment), the
adapters known by name, and fetching an adapter from the registry with its compatibility check.
"""

import asyncio
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from serve.compat import AdapterRefused, ServedBase, check_adapter

CONFIG_ENV, TOKEN_ENV, API_KEY_ENV = "LORADOCK_SERVE", "LORADOCK_REGISTRY_TOKEN", "LORADOCK_API_KEY"


@dataclass
class ServeConfig:
    base: ServedBase
    registry: str | None
    token: str | None = field(repr=False)
    api_key: str | None = field(repr=False)
    startup_adapters: dict[str, str]  # served name -> folder


@lru_cache(maxsize=1)
def config() -> ServeConfig | None:
    """The configuration `loradock serve` passed; None when vLLM runs without loradock."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        return None
    data = json.loads(raw)
    return ServeConfig(ServedBase(data["base_name"], data["base_path"], data["max_lora_rank"]), data.get("registry"),
                       os.environ.get(TOKEN_ENV) or None, os.environ.get(API_KEY_ENV) or None, data.get("adapters", {}))


class NotInRegistry(LookupError):
    pass


@dataclass
class Adapter:
    name: str  # what clients send as `model`
    path: Path
    info: dict  # repo, revision, commit sha, rank, headline metric: shown in /v1/models
    chat_template: str | None


_known: dict[str, Adapter] = {}
_locks: dict[str, asyncio.Lock] = {}


def describe(name: str, folder: Path) -> Adapter:
    from sft.model_card import chat_template, front_matter

    folder = Path(folder)
    try:
        pulled = json.loads((folder / ".loradock-pull.json").read_text())
    except (OSError, ValueError):
        pulled = {}
    card = front_matter(folder)
    metric = next((r for m in card.get("model-index", []) for r in m["results"][0]["metrics"]), None)
    if looks_like_registry_name(name):  # one pulled folder serves every name of its commit
        repo_id, _, revision = name.partition("@")
        pulled = {**pulled, "repo_id": repo_id, "revision": revision or "main"}
    info = {"repo_id": pulled.get("repo_id"), "revision": pulled.get("revision"), "commit": pulled.get("commit"),
            "rank": card["loradock"]["lora"]["r"], "base_model": card["base_model"],
            "metric": {"name": metric["name"], "value": metric["value"]} if metric else None}
    return Adapter(name, folder, info, chat_template(folder))


def remember(name: str, folder: Path) -> Adapter:
    _known[name] = describe(name, folder)
    return _known[name]


def forget(name: str) -> None:
    _known.pop(name, None)


def known(name: str) -> Adapter | None:
    cfg = config()
    if name not in _known and cfg and name in cfg.startup_adapters:
        remember(name, Path(cfg.startup_adapters[name]))
    return _known.get(name)


def looks_like_registry_name(name: str) -> bool:
    repo_id = name.partition("@")[0]
    return repo_id.count("/") == 1 and all(repo_id.split("/"))


async def fetch(name: str) -> Adapter:
    """The adapter `org/name[@revision]` from the registry, pinned to the commit its revision
    resolves to now, checked against this server; pulled once, then served from the local copy.

    Raises:
        NotInRegistry: no such repo or revision (the client gets a 404).
        AdapterRefused: it cannot be served here, or the registry failed (the client gets a 400).
    """
    from hub.client import pull
    from loradock.errors import LoradockError

    cfg = config()
    if cfg is None or not cfg.registry or not looks_like_registry_name(name):
        raise NotInRegistry(name)
    async with _locks.setdefault(name, asyncio.Lock()):
        if name in _known:
            return _known[name]
        try:
            result = await asyncio.to_thread(pull, name, endpoint=cfg.registry, token=cfg.token)
        except LoradockError as e:
            if "not found" in e.problem or "has no revision" in e.problem:
                raise NotInRegistry(name) from None
            raise AdapterRefused(f"{name}: {e.problem}") from None
        await asyncio.to_thread(check_adapter, result.path, cfg.base)
        return remember(name, result.path)

