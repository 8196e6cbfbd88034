"""Hot-loading adapters from the registry inside the server process (`serve.runtime`), against the
session's real registry: only allowed namespaces are asked for, unknown names are remembered for a
short while, per-name locks do not pile up, and pulled copies are evicted least recently used
first, never while an adapter (of this process or another) leases them."""

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hub import pulled
from hub.client import Registry
from loradock.errors import Forbidden, NotFound
from serve import runtime
from serve.config import ENVIRONMENT, ServeConfig

BASE = "loradock/tiny-chat"


def lora(base_model_dir: Path, folder: Path, seed: int) -> Path:
    """A small LoRA adapter with random non-zero weights on q_proj, v_proj of the tiny base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": BASE}))
    return folder


@pytest.fixture(scope="module")
def hot_adapters(registry, base_model_dir, tmp_path_factory) -> dict[str, int]:
    """{repo id: size of its pulled copy in bytes} for three adapters in alice's namespace."""
    tmp = tmp_path_factory.mktemp("hot")
    sizes = {}
    for seed, name in enumerate(("hot-a", "hot-b", "hot-c")):
        folder = lora(base_model_dir, tmp / name, seed)
        Registry(registry.url, registry.write_token).push(str(folder), f"alice/{name}")
        sizes[f"alice/{name}"] = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return sizes


@pytest.fixture
def server(registry, base_model_dir, tmp_path, monkeypatch):
    """This process set up as `loradock serve` sets up vLLM's API server: hot-loading from alice's
    namespace, pulled copies in a fresh $LORADOCK_HOME; counts the pulls it makes (each a registry
    round trip)."""
    from hub import client

    def configure(**changes) -> ServeConfig:
        config = ServeConfig(**{"base_model": BASE, "base_path": str(base_model_dir), "registry": registry.url,
                                "token": registry.write_token, "hot_load_namespaces": ["alice"], **changes})
        monkeypatch.setenv(ENVIRONMENT, json.dumps(dataclasses.asdict(config)))
        runtime.config.cache_clear()
        return config

    pulls = []
    real_pull = client.Registry.pull

    def counted_pull(self, spec, *args, **kwargs):
        pulls.append(str(spec))  # the name as a client sent it (a parsed AdapterRef reaches the pull)
        return real_pull(self, spec, *args, **kwargs)

    monkeypatch.setenv("LORADOCK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(client.Registry, "pull", counted_pull)
    configure()
    yield configure, pulls
    for name in list(runtime._known):
        runtime.forget(name)
    runtime._unknown.clear()
    runtime.config.cache_clear()


def fetch_all(names: list[str]) -> list:
    async def scenario():
        return await asyncio.gather(*(runtime.fetch(name) for name in names), return_exceptions=True)

    return asyncio.run(scenario())


def test_only_allowed_namespaces_are_asked_for(server, hot_adapters):
    configure, pulls = server
    for name in (BASE, "eve/anything@v1", "bad/nan"):
        with pytest.raises(Forbidden) as refused:
            asyncio.run(runtime.fetch(name))
        namespace = name.split("/")[0]
        assert "not in a namespace this server hot-loads adapters from (alice)" in refused.value.problem
        assert f"--adapter-namespace {namespace}" in refused.value.fix
    assert pulls == []  # refused before any registry round trip
    adapter = asyncio.run(runtime.fetch("alice/hot-a"))
    assert adapter.info["repo_id"] == "alice/hot-a" and len(adapter.info["commit"]) == 40
    configure(hot_load_namespaces=[])
    with pytest.raises(Forbidden, match=r"hot-loads adapters from \(none\)"):
        asyncio.run(runtime.fetch("alice/hot-b"))


def test_a_first_request_reads_the_adapters_config_once(server, hot_adapters, registry):
    """From the request's name to a known adapter, adapter_config.json is read once (by the check;
    the card takes what it read), and the commit shown is the one the pull resolved."""
    from hub.client import Registry

    reads, watching = [], [True]

    def audit(event, args):  # an audit hook cannot be removed: it stops counting instead
        if watching[0] and event == "open" and str(args[0]).endswith("adapter_config.json") and args[1] in ("r", "rb"):
            reads.append(args[0])

    sys.addaudithook(audit)
    try:
        adapter = asyncio.run(runtime.fetch("alice/hot-c@main"))
    finally:
        watching[0] = False
    assert len(reads) == 1, reads
    assert adapter.info["commit"] == Registry(registry.url, registry.write_token).revision("alice/hot-c", "main").commit


def test_unknown_names_cost_one_round_trip_per_ttl_and_leave_no_lock(server, hot_adapters, monkeypatch):
    _, pulls = server
    names = [f"alice/nothing-{i}" for i in range(200)]
    results = fetch_all(names + names)  # each asked twice at once
    assert all(isinstance(r, NotFound) for r in results)
    assert sorted(pulls) == sorted(names)  # the second ask of each waited for the first and took its answer
    assert runtime._locks == {}
    assert all(isinstance(r, NotFound) for r in fetch_all(names))
    assert len(pulls) == 200  # remembered as unknown: no round trip
    monkeypatch.setattr(runtime, "UNKNOWN_TTL_S", 0.2)
    time.sleep(0.3)
    assert all(isinstance(r, NotFound) for r in fetch_all(names[:10]))
    assert len(pulls) == 210  # past the TTL, the registry is asked again
    monkeypatch.setattr(runtime, "UNKNOWN_MAX", 50)
    fetch_all([f"alice/more-{i}" for i in range(60)])
    assert len(runtime._unknown) == 50  # bounded: the oldest misses are forgotten first


def test_a_name_pushed_after_a_miss_is_served_once_the_ttl_has_passed(server, hot_adapters, monkeypatch):
    _, pulls = server
    monkeypatch.setattr(runtime, "UNKNOWN_TTL_S", 0.5)
    with pytest.raises(NotFound):
        asyncio.run(runtime.fetch("alice/hot-a@no-such-tag"))
    with pytest.raises(NotFound, match="asked less than"):
        asyncio.run(runtime.fetch("alice/hot-a@no-such-tag"))
    time.sleep(0.6)
    with pytest.raises(NotFound):
        asyncio.run(runtime.fetch("alice/hot-a@no-such-tag"))
    assert pulls == ["alice/hot-a@no-such-tag"] * 2


def test_unleased_copies_are_evicted_least_recently_used_first(server, hot_adapters):
    configure, _ = server
    a, b, c = sorted(hot_adapters)
    biggest = max(hot_adapters.values())
    configure(adapter_cache_mb=2.5 * biggest / 2**20)  # room for two copies
    first = asyncio.run(runtime.fetch(a))
    second = asyncio.run(runtime.fetch(b))
    assert len(pulled.copies()) == 2
    runtime.forget(a)  # unloaded: its copy is no longer in use
    third = asyncio.run(runtime.fetch(c))
    assert sorted(pulled.copies()) == sorted([second.path, third.path])
    assert not first.path.exists()
    runtime.forget(b)
    runtime.forget(c)
    again = asyncio.run(runtime.fetch(a))  # pulled again; b, released before c, is the least recently used
    assert again.path.is_dir() and not second.path.exists() and third.path.exists()


def test_leased_copies_stay_over_the_cap_even_when_another_process_holds_them(server, hot_adapters):
    configure, _ = server
    a, b, c = sorted(hot_adapters)
    configure(adapter_cache_mb=0)
    first, second = asyncio.run(runtime.fetch(a)), asyncio.run(runtime.fetch(b))
    assert first.path.exists() and second.path.exists()  # both leased: over the cap, kept
    runtime.forget(a)
    runtime.forget(b)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; from hub.pulled import Lease;"
                               f" lease = Lease(Path({str(first.path)!r})); print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        third = asyncio.run(runtime.fetch(c))
        assert first.path.exists()  # another process (a replica) serves it
        assert not second.path.exists() and third.path.exists()
    finally:
        holder.communicate("")
    runtime.forget(c)
    assert sorted(pulled.evict(0)) == sorted([first.path, third.path])  # nobody holds them any more
    assert pulled.copies() == []
