"""Canary rollouts, recorded in the registry: while a rollout of a tag runs, a share of the requests
for `REPO@TAG` is answered by a candidate commit instead of the commit the tag points at.

`loradock promote REPO@REV --tag prod --canary 10` writes the record, `loradock rollout status`
judges it on the evidence (`judge`) and ends it, and every serving replica reads it on each refresh.
The record of a tag is one JSON file, `rollouts/TAG.json`, on a branch of the adapter's own repo
(`BRANCH`), so its history is that branch's commits and it needs nothing the registry lacks.
Every write is a compare-and-swap on that branch: a commit whose parent must still be the head the
writer read, so two writers (the CLI, a replica rolling back) never overwrite each other unseen.

    from hub import client, rollouts
    registry = client.registry()
    head = rollouts.branch_head(registry, "alice/reverse")
    rollout = rollouts.read(registry, "alice/reverse", "prod", at=head)
    if rollout and rollout.running:
        rollouts.write(registry, rollout.ended("rolled_back", "error rate rose"), expected=head)
"""

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field

from hub.client import Registry
from hub.objects import SHA1_HEX
from loradock.errors import Busy, LoradockError, RegistryRefused

BRANCH = "loradock-rollouts"  # a branch of the adapter repo holding one file per tag
STATES = ("running", "completed", "rolled_back", "aborted")


@dataclass(frozen=True)
class Rollout:
    """The rollout of a tag's traffic from the commit it points at (`stable`) to a `candidate`."""
    repo_id: str
    tag: str
    stable: str  # commit sha the tag pointed at when the rollout began
    candidate: str  # commit sha being rolled out
    share: int  # percent of the tag's requests answered by the candidate, 1..99
    state: str = "running"
    started_at: float = 0.0  # unix seconds
    updated_at: float = 0.0
    reason: str = ""  # why it ended (or "")
    figures: dict = field(default_factory=dict)  # the evidence at its last step (votes, errors)

    @property
    def running(self) -> bool:
        return self.state == "running"

    def ended(self, state: str, reason: str, figures: dict | None = None) -> "Rollout":
        """A copy in an end state (completed, rolled_back or aborted), stamped now."""
        if state not in STATES[1:]:
            raise ValueError(f"{state!r} is not an end state ({', '.join(STATES[1:])})")
        return dataclasses.replace(self, state=state, reason=reason, updated_at=time.time(),
                                   figures=self.figures if figures is None else figures)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Rollout":
        """Raises: LoradockError: not JSON, or a field missing or of the wrong type (all named)."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise LoradockError(f"a rollout record is not JSON ({e})", REWRITE_FIX) from None
        problems = record_problems(data)
        if problems:
            raise LoradockError("a rollout record is malformed: " + "; ".join(problems), REWRITE_FIX)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})  # keys a later version adds are left out


REWRITE_FIX = (f"fix or delete the file on the {BRANCH} branch of the adapter's repo (its history holds the last good "
               "one)")


def record_problems(data) -> list[str]:
    """Why `data` (a parsed record) is not a `Rollout`: one phrase per field, none when it is one."""
    if not isinstance(data, dict):
        return ["it is not a JSON object"]

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    checks = {"repo_id": (lambda v: isinstance(v, str) and v, "a repo id"),
              "tag": (lambda v: isinstance(v, str) and v, "a tag name"),
              "stable": (lambda v: isinstance(v, str) and SHA1_HEX.match(v), "a 40-character commit sha"),
              "candidate": (lambda v: isinstance(v, str) and SHA1_HEX.match(v), "a 40-character commit sha"),
              "share": (lambda v: type(v) is int and 1 <= v <= 99, "a whole percent from 1 to 99"),
              "state": (lambda v: v in STATES, "one of " + ", ".join(STATES)),
              "started_at": (number, "a number of seconds"), "updated_at": (number, "a number of seconds"),
              "reason": (lambda v: isinstance(v, str), "text"), "figures": (lambda v: isinstance(v, dict), "a mapping")}
    required = ("repo_id", "tag", "stable", "candidate", "share")
    return [f"{name} is missing" if name not in data else f"{name} {data[name]!r} is not {kind}"
            for name, (test, kind) in checks.items()
            if (name in data and not test(data[name])) or (name not in data and name in required)]


def record_path(tag: str) -> str:
    """Where the record of `tag` lives on `BRANCH` (in a folder of its own: the branch starts from the
    repo's first commit, whose files a tag's name must not collide with)."""
    return f"rollouts/{tag}.json"


def branch_head(registry: Registry, repo_id: str) -> str | None:
    """The commit `BRANCH` points at; None when the repo has no rollout yet."""
    return registry.refs(repo_id)[0].get(BRANCH)


def read(registry: Registry, repo_id: str, tag: str, at: str | None = None) -> Rollout | None:
    """The record of `tag` at `at` (a commit of `BRANCH`; None: its head now).

    Returns:
        None when the repo has no `BRANCH` or the branch no record of `tag`.

    Raises:
        LoradockError: the record is malformed, or is another repo's or tag's.
    """
    at = at or branch_head(registry, repo_id)
    text = registry.read_file(repo_id, at, record_path(tag)) if at else None
    if text is None:
        return None
    rollout = Rollout.from_json(text)
    if (rollout.repo_id, rollout.tag) != (repo_id, tag):
        raise LoradockError(f"the rollout record {record_path(tag)} of {repo_id}@{BRANCH} is about "
                            f"{rollout.repo_id} tag {rollout.tag}, not {repo_id} tag {tag}", REWRITE_FIX)
    return rollout


def write(registry: Registry, rollout: Rollout, expected: str | None) -> str:
    """Commit the record on `BRANCH`, only if the branch is still at `expected` (None: there is no
    branch yet; it is created from the repo's first commit).

    Returns:
        the new commit of `BRANCH`.

    Raises:
        Busy: `BRANCH` moved since `expected` (another writer got there first); nothing was written:
            read again, decide again.
        LoradockError: the rollout is not a valid record (nothing was written), or the registry's
            typed errors.
    """
    problems = record_problems(dataclasses.asdict(rollout))
    if problems:
        raise LoradockError("not writing a malformed rollout record: " + "; ".join(problems),
                            "this is a bug in the caller; nothing was written")
    where = f"{rollout.repo_id}@{BRANCH}"
    try:
        if expected is None:
            expected = registry.first_commit(rollout.repo_id)
            registry.create_branch(rollout.repo_id, BRANCH, expected)
        return registry.commit_file(rollout.repo_id, BRANCH, record_path(rollout.tag), rollout.to_json().encode(),
                                    f"rollout of {rollout.tag}: {rollout.state}, {rollout.share}% to "
                                    f"{rollout.candidate[:12]}", parent_commit=expected)
    except RegistryRefused as e:
        if e.status not in (409, 412):  # 409: the branch was created meanwhile; 412: it moved on
            raise
        raise Busy(f"the rollout records of {where} changed while this one was being written; nothing was written",
                   f"read the record of {rollout.tag} again (`loradock rollout status {rollout.repo_id} --tag "
                   f"{rollout.tag}`) and decide again") from None


# --- deciding on the evidence ----------------------------------------------------------------------

def judge(rollout: Rollout, votes: dict | None, errors: dict | None, min_votes: int = 20, margin: float = 0.05,
          max_error_rise: float = 0.05, min_requests: int = 50) -> tuple[str | None, str, dict]:
    """Whether a running rollout should end, on its evidence. The rule, in order:

    1. Roll back when the candidate has answered at least `min_requests` requests and its error
       rate (errors / requests) exceeds the stable commit's by more than `max_error_rise` (0.05:
       five percentage points; a stable commit with no requests counts as 0%).
    2. With at least `min_votes` votes between the two (fewer decide nothing, either way):
       roll back when the 95% interval of the candidate's win rate over the stable commit lies
       wholly below 50% (`high` < 0.5: worse); complete when its lower bound is at least
       0.5 - `margin` (no worse than the stable commit, within the margin).
    3. Otherwise keep running.

    Args:
        rollout: the record (an ended one is left as it is).
        votes: the candidate's win rate over the stable commit, `{"votes", "win_rate", "low", "high"}`;
            None without votes.
        errors: `{"candidate": {"requests", "errors"}, "stable": {"requests", "errors"}}`; None without.

    Returns:
        (the new state, "completed" or "rolled_back", or None to keep running; why, in words; the
        figures the decision was made on, for the record).
    """
    figures = {k: v for k, v in (("votes", votes), ("errors", errors)) if v}
    if not rollout.running:
        return None, f"the rollout is {rollout.state} already", figures
    reasons = []
    mine, theirs = (errors or {}).get("candidate") or {}, (errors or {}).get("stable") or {}
    requests = mine.get("requests") or 0
    if requests:
        rate, stable_rate = (mine.get("errors") or 0) / requests, error_rate(theirs)
        said = f"candidate error rate {rate:.1%} over {requests} requests, stable {stable_rate:.1%}"
        if requests >= min_requests and rate - stable_rate > max_error_rise + 1e-12:  # rounding is no rise
            return "rolled_back", f"{said}: a rise above {max_error_rise:.1%}", figures
        reasons.append(said + ("" if requests >= min_requests else f" (deciding from {min_requests})"))
    if votes and votes.get("votes", 0) >= min_votes:
        said = (f"win rate over the stable commit {votes['win_rate']:.2f}, 95% interval [{votes['low']:.2f}, "
                f"{votes['high']:.2f}] over {votes['votes']} votes")
        if votes["high"] < 0.5:
            return "rolled_back", f"{said}: worse", figures
        if votes["low"] >= 0.5 - margin - 1e-12:
            return "completed", "; ".join([*reasons, f"{said}: no worse within {margin:.2f}"]), figures
        reasons.append(said + ": undecided")
    else:
        reasons.append(f"{(votes or {}).get('votes', 0)} of {min_votes} votes")
    return None, "waiting: " + "; ".join(reasons), figures


def error_rate(side: dict) -> float:
    requests = side.get("requests") or 0
    return (side.get("errors") or 0) / requests if requests else 0.0
