"""How a serving process follows moving names (`serve.follow`), against the session's real registry:
a tag or branch resolved to its commit, a moved tag found on the next refresh (and the commit it left
handed back for unloading), the last commit kept while the registry cannot be reached, a canary's
sticky split, and a rollout rolled back from here when its candidate fails. The same on a running
vLLM, behind the balancer, is test_replicas.py's."""

import asyncio
import time

import pytest

from hub import rollouts
from hub.adapter import AdapterRef
from hub.client import Registry
from loradock.errors import Unreachable
from loradock.procs import free_port
from serve import follow
from tests.conftest import adapter_folder


@pytest.fixture
def repo(registry, tmp_path):
    """alice/followed-N with two commits on main, tag prod at the first: (repo id, first, second)."""
    door = Registry(registry.url, registry.write_token)
    repo_id = f"alice/followed-{time.monotonic_ns()}"
    first = door.push(adapter_folder(tmp_path / "one", weights=b"one" * 100), repo_id, tag="prod").commit
    second = door.push(adapter_folder(tmp_path / "two", weights=b"two" * 100), repo_id).commit
    return repo_id, first, second


def follower(registry, retired: list | None = None) -> follow.Follower:
    return follow.Follower(Registry(registry.url, registry.write_token), interval=3600,
                           on_retired=retired.extend if retired is not None else None)


def test_a_tag_and_a_branch_resolve_to_their_commits_and_a_commit_is_not_followed(registry, repo):
    repo_id, first, second = repo

    async def run():
        following = follower(registry)
        prod, main = await following.followed(f"{repo_id}@prod"), await following.followed(repo_id)
        assert (prod.commit, main.commit) == (first, second)
        assert await following.followed(f"{repo_id}@{first}") is None  # a commit never moves
        assert await following.followed(f"{repo_id}@nowhere") is None  # answered as before: a 404
        assert await following.followed("not-a-registry-name") is None
        assert set(following.names) == {f"{repo_id}@prod", repo_id}
        following._task.cancel()

    asyncio.run(run())


def test_a_moved_tag_is_followed_on_refresh_and_the_commit_it_left_is_retired(registry, repo):
    repo_id, first, second = repo
    door, retired = Registry(registry.url, registry.write_token), []

    async def run():
        following = follower(registry, retired)
        await following.followed(f"{repo_id}@prod")
        door.move_tag(repo_id, "prod", first, second, "moved")
        await following.refresh()
        assert following.names[f"{repo_id}@prod"].commit == second
        assert retired == [follow.pinned_name(repo_id, first)]
        following._task.cancel()

    asyncio.run(run())


def test_a_registry_that_cannot_be_reached_leaves_the_last_commit_serving(registry, repo):
    repo_id, first, _ = repo

    async def run():
        following = follow.Follower(Registry(f"http://127.0.0.1:{free_port()}", "token"), interval=3600)
        name = f"{repo_id}@prod"
        following.names[name] = follow.Followed(name, AdapterRef.of(name), first)
        await following.refresh()
        assert following.names[name].commit == first
        with pytest.raises(Unreachable):  # never resolved: the client gets the 503
            await following.followed(f"{repo_id}@other")

    asyncio.run(run())


def test_a_conversation_keeps_its_side_of_a_canary_and_the_share_holds():
    rollout = rollouts.Rollout("alice/x", "prod", "a" * 40, "b" * 40, share=10)
    followed = follow.Followed("alice/x@prod", AdapterRef.of("alice/x@prod"), "a" * 40, rollout)
    first_turn = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello 7"}]}
    later_turn = {"messages": [*first_turn["messages"], {"role": "assistant", "content": "hi"},
                               {"role": "user", "content": "and then?"}]}
    key = follow.conversation_key
    assert key(first_turn) == key(later_turn)
    assert key({**first_turn, "user": "u1"}) == key({**later_turn, "user": "u1"}) != key(first_turn)
    sides = [followed.commit_for(key({"messages": [{"role": "user", "content": f"conversation {i}"}]}))
             for i in range(4000)]
    assert set(sides) == {"a" * 40, "b" * 40}
    assert 0.08 < sides.count("b" * 40) / len(sides) < 0.12  # 10%: 400 expected, sd 19
    ended = followed.rollout.ended("completed", "done")
    assert follow.Followed("alice/x@prod", AdapterRef.of("alice/x@prod"), "a" * 40, ended).commit_for("x") == "a" * 40


def test_a_candidate_that_fails_here_is_rolled_back_for_every_replica(registry, repo):
    repo_id, first, second = repo
    door = Registry(registry.url, registry.write_token)
    rollouts.write(door, rollouts.Rollout(repo_id, "prod", first, second, share=50, started_at=time.time()),
                   rollouts.branch_head(door, repo_id))

    async def run():
        following, name = follower(registry), f"{repo_id}@prod"
        followed = await following.followed(name)
        assert followed.commits() == {first, second}
        for _ in range(60):
            following.count(first, 200)
            following.count(second, 400)  # past 20 of its requests, each failure has the rollout judged at once
        deadline = time.monotonic() + 30  # not the refresh interval (an hour here): the failures woke it
        while following.names[name].commits() != {first}:
            assert time.monotonic() < deadline, following.names[name]
            await asyncio.sleep(0.05)
        following._task.cancel()

    asyncio.run(run())
    record = rollouts.read(door, repo_id, "prod")
    assert record.state == "rolled_back" and record.figures
    assert door.tags(repo_id)["prod"] == first  # the tag never moved
    other = follower(registry)  # another replica reads the same record
    assert asyncio.run(other.followed(f"{repo_id}@prod")).commits() == {first}


def test_serve_subscribes_to_the_registry_with_a_secret_of_its_own_and_unsubscribes(registry):
    from serve.config import ServeConfig
    from serve.launcher import subscribed, unsubscribe

    config = ServeConfig(registry=registry.url, token=registry.write_token, host="0.0.0.0", port=8123,
                         hot_load_namespaces=["alice", "loradock"])
    door = Registry(registry.url, registry.write_token)
    with_secret, webhook = subscribed(config)
    hooks = {hook.id: hook for hook in door.api.list_webhooks()}
    assert hooks[webhook].url == "http://127.0.0.1:8123/loradock/webhook"  # every address: reached on loopback
    assert {w.name for w in hooks[webhook].watched} == {"alice", "loradock"}
    assert with_secret.webhook_secret and hooks[webhook].secret == with_secret.webhook_secret
    assert subscribed(ServeConfig(registry=registry.url, token=registry.write_token, hot_load_namespaces=["alice"],
                                  webhook_url="off")) == (ServeConfig(registry=registry.url, token=registry.write_token,
                                                                      hot_load_namespaces=["alice"], webhook_url="off"),
                                                          None)
    unsubscribe(with_secret, webhook)
    assert webhook not in {hook.id for hook in door.api.list_webhooks()}


@pytest.mark.parametrize("flags, problem", [
    ({"follow_refs": 0}, "--follow-refs 0 must be above 0 seconds"),
    ({"webhook_url": "ftp://host/x"}, "--webhook-url 'ftp://host/x' is not an http(s) URL"),
    ({"canary_pairs": 101}, "--canary-pairs 101 is not a percent"),
])
def test_serve_refuses_settings_that_cannot_follow(flags, problem):
    from serve.config import ServeConfig, validate

    assert any(problem in p for p in validate(ServeConfig(**flags)))
