"""Canary rollouts against the session's registry: the record (`hub.rollouts`) and its
compare-and-swap, `loradock promote --canary` with each refusal, `loradock rollout status|abort|watch`
deciding on votes filled through `ui.votes`, the rollouts in `loradock lineage`, and `judge`'s rule."""

import json
import time
from pathlib import Path

import pytest

from hub import client, rollouts
from hub.rollouts import Rollout, judge
from loradock.errors import Busy, LoradockError
from tests.conftest import adapter_folder
from tests.test_revisions import HELD_OUT, tags, vote

SHA_A, SHA_B = "a" * 40, "b" * 40


def revision(run_cli, tmp_path: Path, repo: str, name: str, exact: float, parent: str | None = None,
             tag: str | None = None, base: str = "loradock/tiny-chat", config: dict | None = None) -> str:
    """Push an adapter (of `base`, its adapter_config.json updated with `config`) whose metrics.json
    says its parent's commit and its held-out exact match; returns its commit."""
    folder = adapter_folder(tmp_path / name, weights=name.encode() * 100, base=base)
    settings = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**settings, **(config or {})}))
    record = {"repo_id": repo, "revision": parent, "commit": parent, "base_model": base} if parent else None
    (folder / "metrics.json").write_text(json.dumps({
        "objective": "dpo" if parent else "sft", "parent": record, "steps": 10, "method": "lora",
        "eval_metrics": {"exact_match": exact}, "held_out_sha256": HELD_OUT}))
    pushed = run_cli("push", str(folder), repo, *(["--tag", tag] if tag else []))
    assert pushed.code == 0, pushed.text
    return pushed.out.split("commit ")[-1].strip()


def door(hub_env) -> client.Registry:
    return client.registry(hub_env.url, hub_env.write_token)


def commits(hub_env, repo: str) -> dict:
    return {name: tag["targetCommit"] for name, tag in tags(hub_env, repo).items()}


def test_a_record_round_trips_and_each_write_is_a_compare_and_swap(run_cli, hub_env, tmp_path):
    repo, registry = "alice/recorded", door(hub_env)
    v1 = revision(run_cli, tmp_path, repo, "v1", 0.5, tag="prod")
    assert rollouts.branch_head(registry, repo) is None and rollouts.read(registry, repo, "prod") is None
    now = time.time()
    running = Rollout(repo, "prod", v1, SHA_B, 10, started_at=now, updated_at=now, figures={"evidence": ["x"]})
    first = rollouts.write(registry, running, expected=None)
    assert rollouts.branch_head(registry, repo) == first
    assert rollouts.read(registry, repo, "prod") == running and rollouts.read(registry, repo, "staging") is None

    ended = running.ended("rolled_back", "worse", {"votes": {"votes": 30}})
    assert ended.state == "rolled_back" and not ended.running and running.running and ended.updated_at >= now
    for stale in (None, v1):  # no branch any more, and a head long gone: nothing is written
        with pytest.raises(Busy, match="changed while this one was being written"):
            rollouts.write(registry, ended, expected=stale)
    second = rollouts.write(registry, ended, expected=first)
    assert rollouts.read(registry, repo, "prod") == ended and rollouts.read(registry, repo, "prod", at=first) == running
    with pytest.raises(Busy):
        rollouts.write(registry, running, expected=first)
    assert rollouts.branch_head(registry, repo) == second
    assert commits(hub_env, repo) == {"prod": v1}  # a record moves no tag
    with pytest.raises(ValueError):
        running.ended("running", "")


@pytest.mark.parametrize("text, words", [
    ("not json", "not JSON"), ("[1]", "not a JSON object"),
    (json.dumps({"repo_id": "a/b", "tag": "prod", "stable": SHA_A, "share": 10}), "candidate is missing"),
    (json.dumps({"repo_id": "a/b", "tag": "prod", "stable": SHA_A, "candidate": "v2", "share": 0, "state": "done"}),
     "candidate 'v2' is not a 40-character commit sha; share 0 is not a whole percent from 1 to 99; state 'done'"),
    (json.dumps({"repo_id": "a/b", "tag": "prod", "stable": SHA_A, "candidate": SHA_B, "share": True}), "share True"),
])
def test_a_malformed_record_is_refused(text, words):
    with pytest.raises(LoradockError, match="rollout record") as refused:
        Rollout.from_json(text)
    assert words in refused.value.problem


def test_promote_canary_refuses_with_the_fix_and_writes_nothing(run_cli, hub_env, tmp_path):
    repo, database, registry = "alice/canaried", tmp_path / "votes.sqlite", door(hub_env)
    v1 = revision(run_cli, tmp_path, repo, "v1", 0.5)
    better = revision(run_cli, tmp_path, repo, "better", 0.6, parent=v1)
    worse = revision(run_cli, tmp_path, repo, "worse", 0.4, parent=v1)
    other_base = revision(run_cli, tmp_path, repo, "other-base", 0.7, base="loradock/other-chat")
    ia3 = revision(run_cli, tmp_path, repo, "ia3", 0.7, parent=v1, config={
        "peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": []})

    def canary(spec: str, *flags: str):
        return run_cli("promote", spec, "--tag", "prod", "--votes", str(database), *flags)

    nowhere = canary(f"{repo}@{better}", "--canary", "10")
    assert nowhere.code == 2 and "has no tag prod" in nowhere.err and "promote without --canary first" in nowhere.err
    assert run_cli("promote", f"{repo}@{v1}", "--tag", "prod", "--force").code == 0
    for flags, spec, words in [
            (["--canary", "0"], better, "--canary 0: the share of prod's requests"),
            (["--canary", "100"], better, "a percent from 1 to 99"),
            (["--canary", "10"], v1, "prod points at"),
            (["--canary", "10"], other_base, "base_model_name_or_path 'loradock/other-chat' but prod's current commit"),
            (["--canary", "10", "--force"], ia3, "peft_type 'IA3' but prod's current commit"),
            (["--canary", "10"], worse, "held-out exact_match 0.400 is below its parent's 0.500")]:
        refused = canary(f"{repo}@{spec}", *flags)
        assert refused.code == 2 and words in refused.err and "nothing was written" in refused.err, (flags, refused.err)
        assert commits(hub_env, repo) == {"prod": v1} and rollouts.branch_head(registry, repo) is None
    assert "'loradock/tiny-chat'" in canary(f"{repo}@{other_base}", "--canary", "10").err  # both bases are named

    started = canary(f"{repo}@{better}", "--canary", "10")
    assert started.code == 0, started.text
    assert f"10% of its requests to {better}, the rest to {v1}; prod was not moved" in started.out
    head = rollouts.branch_head(registry, repo)
    record = rollouts.read(registry, repo, "prod")
    assert (record.stable, record.candidate, record.share, record.state) == (v1, better, 10, "running")

    again = canary(f"{repo}@{better}", "--canary", "20")
    assert again.code == 2 and f"loradock rollout abort {repo} --tag prod" in again.err
    outright = canary(f"{repo}@{better}", "--force")
    assert outright.code == 2 and "a canary rollout of prod" in outright.err
    assert f"loradock rollout abort {repo} --tag prod" in outright.err
    assert f"loradock rollout status {repo} --tag prod --advance" in outright.err
    assert commits(hub_env, repo) == {"prod": v1} and rollouts.branch_head(registry, repo) == head


def test_status_completes_a_rollout_on_the_votes_and_lineage_shows_it(run_cli, hub_env, tmp_path):
    repo, database, registry = "alice/completed", tmp_path / "votes.sqlite", door(hub_env)
    v1 = revision(run_cli, tmp_path, repo, "v1", 0.5, tag="prod")
    v2 = revision(run_cli, tmp_path, repo, "v2", 0.6, parent=v1)
    assert run_cli("promote", f"{repo}@{v2}", "--tag", "prod", "--canary", "25").code == 0

    def status(*flags: str):
        return run_cli("rollout", "status", repo, "--tag", "prod", "--votes", str(database), *flags)

    waiting = status()
    assert waiting.code == 0, waiting.text
    assert "decision: keep running: waiting: 0 of 20 votes" in waiting.out and "votes: none between" in waiting.out
    vote(database, v2, v1, repo, 24)
    vote(database, v1, v2, repo, 6, start=24)
    done = json.loads(status("--format", "json").out)
    assert done["decision"] == "completed" and done["votes"]["votes"] == 30 and done["rollout"]["state"] == "completed"
    assert "no worse within 0.05" in done["reason"]
    assert commits(hub_env, repo) == {"prod": v2}
    message = tags(hub_env, repo)["prod"]["message"]
    assert "after a canary at 25%" in message and "win rate over the stable commit 0.80" in message
    record = rollouts.read(registry, repo, "prod")
    assert record.state == "completed" and record.figures["votes"]["votes"] == 30
    assert "ended: completed" in status().out and commits(hub_env, repo) == {"prod": v2}

    text = run_cli("lineage", f"{repo}@{v2}", "--votes", str(database))
    assert text.code == 0, text.text
    assert "rollout of prod: candidate (25% to the candidate" in text.out and "completed: win rate" in text.out
    rows = json.loads(run_cli("lineage", f"{repo}@{v2}", "--format", "json").out)
    assert [[(r["tag"], r["role"], r["state"], r["share"]) for r in row["rollouts"]] for row in rows] == [
        [("prod", "candidate", "completed", 25)], [("prod", "stable", "completed", 25)]]
    assert rows[0]["rollouts"][0]["figures"]["votes"]["votes"] == 30


def test_status_rolls_back_and_abort_and_watch_end_a_rollout(run_cli, hub_env, tmp_path):
    repo, database, registry = "alice/rolledback", tmp_path / "votes.sqlite", door(hub_env)
    v1 = revision(run_cli, tmp_path, repo, "v1", 0.5, tag="prod")
    v2 = revision(run_cli, tmp_path, repo, "v2", 0.6, parent=v1)
    v3 = revision(run_cli, tmp_path, repo, "v3", 0.7, parent=v1)

    def rollout(*words: str):
        return run_cli("rollout", *words, repo, "--tag", "prod")

    missing = rollout("status")
    assert missing.code == 2 and "has no rollout of tag prod" in missing.err and "--canary PERCENT" in missing.err
    assert run_cli("promote", f"{repo}@{v2}", "--tag", "prod", "--canary", "10").code == 0
    vote(database, v1, v2, repo, 25)  # the voters prefer what prod serves
    back = rollout("status", "--votes", str(database))
    assert back.code == 0, back.text
    assert "decision: rolled back: win rate over the stable commit 0.00" in back.out and "prod stays" in back.out
    assert commits(hub_env, repo) == {"prod": v1} and rollouts.read(registry, repo, "prod").state == "rolled_back"
    assert rollout("abort").code == 2  # it ended already

    assert run_cli("promote", f"{repo}@{v3}", "--tag", "prod", "--canary", "50").code == 0  # a new one may start
    aborted = rollout("abort")
    assert aborted.code == 0 and f"prod stays at {v1}" in aborted.out
    assert commits(hub_env, repo) == {"prod": v1} and rollouts.read(registry, repo, "prod").state == "aborted"

    assert run_cli("promote", f"{repo}@{v3}", "--tag", "prod", "--canary", "50").code == 0
    vote(database, v3, v1, repo, 25, start=25)
    watched = rollout("watch", "--every", "0", "--votes", str(database), "--format", "json")
    steps = [json.loads(line) for line in watched.out.splitlines()]
    assert watched.code == 0 and [s["decision"] for s in steps] == ["completed"], watched.text
    assert commits(hub_env, repo) == {"prod": v3}

    assert run_cli("promote", f"{repo}@{v2}", "--tag", "prod", "--canary", "5", "--force").code == 0
    forced = rollout("status", "--advance", "--votes", str(database))
    assert forced.code == 0 and "forced with --advance (waiting: " in forced.out
    assert commits(hub_env, repo) == {"prod": v2}


# --- the rule ---------------------------------------------------------------------------------------

RUNNING = Rollout("a/b", "prod", SHA_A, SHA_B, 10)


def votes(n: int, low: float, high: float) -> dict:
    return {"votes": n, "win_rate": (low + high) / 2, "low": low, "high": high}


def errors(requests: int, failed: int, stable_requests: int = 100, stable_failed: int = 0) -> dict:
    return {"candidate": {"requests": requests, "errors": failed},
            "stable": {"requests": stable_requests, "errors": stable_failed}}


@pytest.mark.parametrize("votes_, errors_, state, words", [
    (None, None, None, "waiting: 0 of 20 votes"),
    (votes(19, 0.6, 0.9), None, None, "19 of 20 votes"),  # too few votes decide nothing, either way
    (votes(19, 0.0, 0.1), None, None, "19 of 20 votes"),
    (votes(20, 0.45, 0.7), None, "completed", "no worse within 0.05"),  # low at 0.5 - margin exactly
    (votes(20, 0.449, 0.7), None, None, "undecided"),
    (votes(20, 0.2, 0.499), None, "rolled_back", "worse"),
    (votes(20, 0.2, 0.5), None, None, "undecided"),  # high at 0.5 exactly: not worse
    (None, errors(50, 6, 100, 7), None, "candidate error rate 12.0% over 50 requests, stable 7.0%"),  # +5 points
    (None, errors(50, 7, 100, 7), "rolled_back", "a rise above 5.0%"),
    (None, errors(49, 49), None, "(deciding from 50)"),
    (None, errors(50, 3, 0, 0), "rolled_back", "stable 0.0%"),  # no stable requests: 0%
    (votes(40, 0.6, 0.9), errors(100, 20, 100, 1), "rolled_back", "error rate"),  # errors first
    (votes(40, 0.6, 0.9), errors(100, 2, 100, 1), "completed", "candidate error rate 2.0%"),
])
def test_judge(votes_, errors_, state, words):
    decided, reason, figures = judge(RUNNING, votes_, errors_)
    assert decided == state and words in reason, reason
    assert figures == {k: v for k, v in (("votes", votes_), ("errors", errors_)) if v}


def test_judge_leaves_an_ended_rollout_alone():
    ended = RUNNING.ended("aborted", "by hand")
    assert judge(ended, votes(40, 0.6, 0.9), None)[:2] == (None, "the rollout is aborted already")
