"""What loradock keeps inside vLLM's API server process, shared by the resolver plugin and the
middleware: the serving configuration (`ServeConfig`, handed over by `loradock serve`), the
adapters known by name, and hot-loading an adapter from the registry with its compatibility check.

Hot-loading is bounded on every side a client controls, since any holder of the API key chooses
the names:
- only the namespaces in `ServeConfig.hot_load_namespaces` are asked for (`--adapter-namespace`);
- a name the registry does not have is remembered as unknown for `UNKNOWN_TTL_S` (at most
  `UNKNOWN_MAX` names), so asking again costs no round trip;
- one pull per name at a time, at most `PULLS` at once, and a name's lock lives only while someone
  waits for it;
- each known adapter leases its pulled copy (`hub.pulled.Lease`); after a pull, the copies no
  adapter leases are evicted, least recently used first, down to `--adapter-cache-mb`.
"""

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from hub import pulled
from hub.adapter import METHODS, PULL_MARKER, AdapterRef, chat_template, read_json
from hub.adapter.card import CardInfo
from hub.adapter.checks import ServedBase, check_folder
from loradock.errors import AdapterRefused, Forbidden, LoradockError, NotFound
from serve.config import ServeConfig

if TYPE_CHECKING:
    from hub.client import PullResult

UNKNOWN_TTL_S = 10.0  # short: an adapter pushed just after a miss is served soon after
UNKNOWN_MAX = 4096
PULLS = 4  # pulls at once: each takes a thread of the event loop's executor

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
    lease: "pulled.Lease | None" = None  # on its pulled copy, while it is known

    @property
    def soft_prompt(self) -> bool:
        """Served through vLLM's prompt-embeddings input (`serve.soft_prompt`), not a LoRA slot."""
        return self.served_by == "prompt-embeds"


_known: dict[str, Adapter] = {}
_by_path: set[str] = set()  # names loaded by path in this process (POST /v1/load_lora_adapter)
_unloaded: set[str] = set()  # names forgotten since: not listed again until a request asks for them
_unknown: "collections.OrderedDict[str, float]" = collections.OrderedDict()  # name -> when the registry said no
_locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # name -> (its lock, [callers holding or awaiting it])
_pull_slots: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}


def describe(name: str, folder: Path, pinned: "PullResult | None" = None,
             adapter_config: dict | None = None) -> Adapter:
    """The adapter `name` served from `folder`: `pinned`, the pull that just fetched it (else its
    pull marker says where it came from), and its adapter_config.json as the check read it."""
    folder = Path(folder)
    card = CardInfo.from_folder(folder, adapter_config)
    if pinned is not None:
        where = {"repo_id": pinned.repo_id, "revision": pinned.revision, "commit": pinned.commit}
    else:
        where = read_json(folder / PULL_MARKER)
        if AdapterRef.looks_like(name):  # one pulled folder serves every name of its commit
            ref = AdapterRef.of(name)
            where = {**where, "repo_id": ref.repo_id, "revision": ref.revision}
    metric = card.headline
    info = {"repo_id": where.get("repo_id"), "revision": where.get("revision"), "commit": where.get("commit"),
            "method": card.method, "rank": card.rank, "base_model": card.base_model,
            "metric": {"name": metric.name, "value": metric.value} if metric else None}
    served_by = METHODS[card.method].served_by if card.method in METHODS else "vllm-lora"
    return Adapter(name, folder, info, chat_template(folder), served_by)


def lease(folder: Path) -> "pulled.Lease | None":
    """A lease on `folder` when it is a pulled copy (it has a pull marker); None otherwise."""
    try:
        return pulled.Lease(folder)
    except OSError:
        return None


def remember(name: str, folder: Path, held: "pulled.Lease | None" = None, pinned: "PullResult | None" = None,
             adapter_config: dict | None = None) -> Adapter:
    adapter = describe(name, folder, pinned, adapter_config)
    adapter.lease = held or lease(folder)
    if (previous := _known.get(name)) and previous.lease:
        previous.lease.release()
    _known[name] = adapter
    _unloaded.discard(name)
    return adapter


def forget(name: str) -> None:
    adapter = _known.pop(name, None)
    if adapter and adapter.lease:
        adapter.lease.release()
    _unloaded.add(name)
    _by_path.discard(name)
    listed = config().loaded_by_path_file() if config() else None
    if listed and name in (by_path := listed.read()):
        del by_path[name]
        listed.write(by_path)


def held_by_path(name: str) -> bool:
    """Whether `name` is served from a folder given by path (loaded so, or an `--adapter` folder),
    not from the registry: such a name is never resolved through the registry, whatever it looks like."""
    if name in _by_path:
        return True
    cfg = config()
    folder = cfg.startup_adapters.get(name) if cfg else None  # a start-up one: restarted with those loaded by path
    return folder is not None and not (Path(folder) / PULL_MARKER).exists()


def loaded_by_path(name: str, folder: str) -> Adapter:
    """An adapter loaded by path (POST /v1/load_lora_adapter): known, and written down so that a
    restart of vLLM (`loradock serve --restart-engine`) loads it again."""
    adapter = remember(name, Path(folder))
    _by_path.add(name)
    listed = config().loaded_by_path_file()
    listed.write({**listed.read(), name: str(folder)})
    return adapter


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


def allowed(ref: AdapterRef, cfg: ServeConfig) -> None:
    """Raises Forbidden unless `ref`'s namespace is one this server hot-loads from."""
    namespace = ref.repo_id.split("/")[0]
    if namespace not in cfg.hot_load_namespaces:
        served = ", ".join(cfg.hot_load_namespaces) or "none"
        raise Forbidden(f"{ref.repo_id} is not in a namespace this server hot-loads adapters from ({served})",
                        f"restart loradock serve with --adapter-namespace {namespace}, or name it with --adapter")


def unknown_recently(name: str) -> bool:
    """Whether the registry said it has no `name` less than UNKNOWN_TTL_S ago."""
    asked = _unknown.get(name)
    if asked is not None and time.monotonic() - asked < UNKNOWN_TTL_S:
        return True
    _unknown.pop(name, None)
    return False


def note_unknown(name: str) -> None:
    _unknown[name] = time.monotonic()
    _unknown.move_to_end(name)
    while len(_unknown) > UNKNOWN_MAX:
        _unknown.popitem(last=False)


@contextlib.asynccontextmanager
async def one_at_a_time(name: str):
    """A lock per name, dropped once nobody holds or awaits it (so unknown names leave none behind),
    inside one of PULLS slots for this event loop."""
    lock, callers = _locks.setdefault(name, (asyncio.Lock(), [0]))
    callers[0] += 1
    try:
        async with lock:
            async with _pull_slots.setdefault(asyncio.get_running_loop(), asyncio.Semaphore(PULLS)):
                yield
    finally:
        callers[0] -= 1
        if not callers[0]:
            del _locks[name]


def pull_and_lease(ref: AdapterRef, cfg: ServeConfig) -> tuple["PullResult", "pulled.Lease", dict]:
    """Pull `ref` (or find its copy), lease the copy, check it, then evict unleased copies over the
    cap: (the pull, the lease, its adapter_config.json); runs in a worker thread."""
    result, held = pulled.pull_leased(ref, endpoint=cfg.registry, token=cfg.token)
    try:
        adapter_config = check_folder(result.path, served_base())
    except BaseException:
        held.release()
        raise
    pulled.evict(int(cfg.adapter_cache_mb * 2**20))
    return result, held, adapter_config


async def fetch(name: str) -> Adapter:
    """The adapter `org/name[@revision]` from the registry, pinned to the commit its revision
    resolves to now, checked against this server; pulled once, then served from the local copy.

    Raises:
        NotFound: no such repo or revision, or not a registry name (the client gets a 404).
        Forbidden: its namespace is not one this server hot-loads from (403).
        AdapterRefused: it cannot be served here (400).
        Unreachable, RegistryRefused, LoradockError: the registry is down, said no, or sent a
            damaged file (the middleware maps each type to its status).
    """
    cfg = config()
    if cfg is None or not cfg.registry or not AdapterRef.looks_like(name):
        raise NotFound(f"{name} is not a registry adapter")
    try:
        ref = AdapterRef.parse(name)
    except LoradockError as e:  # a malformed id or revision: the client's to change
        raise AdapterRefused(name, [e.problem]) from None
    if (adapter := known(name)) is not None:
        return adapter
    allowed(ref, cfg)
    missing = NotFound(f"the registry has no {name} (asked less than {UNKNOWN_TTL_S:.0f} s ago)",
                       "push it, or check the name with `loradock list`")
    if unknown_recently(name):  # answered at once, not queued behind the pulls in progress
        raise missing
    async with one_at_a_time(name):
        if name in _known:
            return _known[name]
        if unknown_recently(name):  # a pull of the same name, finished while this one waited
            raise missing
        try:
            pinned, held, adapter_config = await asyncio.to_thread(pull_and_lease, ref, cfg)
        except NotFound:
            note_unknown(name)
            raise
        return remember(name, pinned.path, held, pinned, adapter_config)
