"""`loradock promote REPO@REV --tag TAG --canary PERCENT` and `loradock rollout status|abort|watch`:
a canary rollout of a tag, from the commit it points at (the stable one) to a candidate revision,
decided on the evidence.

    loradock promote alice/reverse@v3 --tag prod --canary 10   # 10% of prod's requests to v3; prod stays
    loradock rollout status alice/reverse --tag prod            # the evidence; completes or rolls back
    loradock rollout watch alice/reverse --tag prod --every 60  # the same, each minute, until it ends
    loradock rollout abort alice/reverse --tag prod

The record lives in the registry (`hub.rollouts`), where the serving replicas read it and split
the tag's traffic. The evidence is the blind votes between the candidate and the stable commit
(`ui.votes`, rated per pair by `ui.ratings`) and the error counts the record carries (written by
the replicas); `hub.rollouts.judge` holds the rule. Completing moves the tag to the candidate;
rolling back and aborting leave it where it was.
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from hub import client
from hub import rollouts as records
from hub.adapter import CONFIG, AdapterRef, check_repo_id, read_json
from hub.client import Registry
from hub.rollouts import Rollout
from loradock.config import REGISTRY_HELP, TOKEN_HELP, subcommand
from loradock.errors import Busy, LoradockError
from ui.cli import VOTES_HELP
from ui.revisions import MAX_FORGETTING, check_tag, evidence, recorded, votes_of, win_rate


# --- starting one ---------------------------------------------------------------------------------

def canary(spec: str, tag: str, share: int, force: bool, votes_path: Path | None, endpoint: str | None = None,
           token: str | None = None, max_forgetting: float = MAX_FORGETTING) -> str:
    """Record a running rollout of `tag` to the revision `spec` names, answering `share` percent of
    the tag's requests; no tag moves. Returns what was done, in words.

    Raises:
        LoradockError: the share is not 1..99; the tag points nowhere; a rollout of it is running;
            the candidate is for another base model or PEFT method; or the evidence is missing or
            against it and not `force`. Nothing is written then.
        Busy: another rollout record of the repo was written meanwhile.
    """
    if not 1 <= share <= 99:
        raise LoradockError(f"--canary {share}: the share of {tag}'s requests for the candidate is a percent from 1 "
                            "to 99", "pass e.g. --canary 10, or promote without --canary to move the tag outright; "
                            "nothing was written")
    ref = AdapterRef.parse(spec)
    check_tag(tag)
    door = client.registry(endpoint, token)
    child = recorded(door, ref.repo_id, ref.revision)
    current = door.tags(ref.repo_id).get(tag)
    if current is None:
        raise LoradockError(f"{ref.repo_id} has no tag {tag}: a canary splits the requests of a tag between the "
                            "commit it points at and the candidate, so it needs a current commit",
                            f"promote without --canary first (`loradock promote {spec} --tag {tag}`); nothing was "
                            "written")
    head = records.branch_head(door, ref.repo_id)
    running = records.read(door, ref.repo_id, tag, head) if head else None
    if running and running.running:
        raise LoradockError(f"a rollout of {tag} to {running.candidate} is running already ({running.share}%)",
                            f"end it first with `loradock rollout abort {ref.repo_id} --tag {tag}`; nothing was "
                            "written")
    if current == child.commit:
        raise LoradockError(f"{tag} points at {child.name} already: nothing to roll out",
                            "name another revision; nothing was written")
    kind_problems = same_kind_problems(door, ref.repo_id, current, child.commit, tag)
    if kind_problems:
        raise LoradockError(f"not starting a canary of {tag} to {child.name}: " + "; ".join(kind_problems),
                            "roll out a revision of the same base model and PEFT method (or promote it to another "
                            "tag); nothing was written")
    found, problems = evidence(door, child, tag, current, votes_path, max_forgetting)
    if problems and not force:
        raise LoradockError(f"not starting a canary of {tag} to {child.name}: " + "; ".join(problems),
                            "train a revision that beats its parent, or pass --force to start it anyway; nothing was "
                            "written", "\n".join(f"evidence for it: {line}" for line in found))
    now = time.time()
    figures = {"evidence": found, **({"forced_past": problems} if problems else {})}
    records.write(door, Rollout(ref.repo_id, tag, current, child.commit, share, started_at=now, updated_at=now,
                                figures=figures), head)
    return (f"loradock promote: canary of {tag}: {share}% of its requests to {child.commit}, the rest to {current}; "
            f"{tag} was not moved. " + (f"Forced with --force past: {'; '.join(problems)}. " if problems else "")
            + (f"Evidence: {'; '.join(found)}. " if found else "")
            + f"Follow it with `loradock rollout status {ref.repo_id} --tag {tag}`.")


def same_kind_problems(registry: Registry, repo_id: str, current: str, candidate: str, tag: str) -> list[str]:
    """What differs between the adapter_config.json of the two commits that one base model serving
    both cannot bridge: the base model, the PEFT method."""
    def config(commit: str) -> dict:
        folder = registry.files(repo_id, commit, (CONFIG,))
        return read_json(folder / CONFIG) if folder else {}

    now, new = config(current), config(candidate)
    return [f"the candidate's {CONFIG} has {key} {new.get(key)!r} but {tag}'s current commit {current[:12]} has "
            f"{now.get(key)!r}" for key in ("base_model_name_or_path", "peft_type") if now.get(key) != new.get(key)]


# --- judging one ------------------------------------------------------------------------------------

def latest(registry: Registry, repo_id: str, tag: str) -> tuple[str, Rollout]:
    """(the rollout branch's head, the record of `tag` there).

    Raises:
        LoradockError: there is no such record.
    """
    check_repo_id(repo_id)
    check_tag(tag)
    head = records.branch_head(registry, repo_id)
    rollout = records.read(registry, repo_id, tag, head) if head else None
    if rollout is None:
        raise LoradockError(f"{repo_id} has no rollout of tag {tag}",
                            f"start one with `loradock promote {repo_id}@REVISION --tag {tag} --canary PERCENT`")
    return head, rollout


def reported_errors(rollout: Rollout) -> dict | None:
    """The error counts the serving replicas wrote into the record, when they did."""
    errors = rollout.figures.get("errors")
    sides = ("candidate", "stable")
    return errors if isinstance(errors, dict) and all(isinstance(errors.get(s), dict) for s in sides) else None


def status(repo_id: str, tag: str, votes_path: Path | None, advance: bool = False, endpoint: str | None = None,
           token: str | None = None) -> dict:
    """One step of a rollout: its record, its evidence, `hub.rollouts.judge`'s decision, and the
    decision applied (`advance`: complete it whatever the evidence).

    Raises:
        LoradockError: no such rollout, or the tag was moved off the stable commit by hand.
        Busy: the record changed while this step wrote it (the tag is where it was).
    """
    door = client.registry(endpoint, token)
    head, rollout = latest(door, repo_id, tag)
    votes, errors = win_rate(votes_path, rollout.candidate, rollout.stable), reported_errors(rollout)
    state, reason, figures = records.judge(rollout, votes, errors)
    if rollout.running and advance:
        state, reason = "completed", f"forced with --advance ({reason})"
    if rollout.running and state == "completed":
        rollout = complete(door, rollout, head, reason, figures)
    elif rollout.running and state:
        rollout = rollout.ended(state, reason, figures)
        records.write(door, rollout, head)
    elif not rollout.running:
        reason = f"ended: {rollout.state}" + (f": {rollout.reason}" if rollout.reason else "")
    return {"rollout": asdict(rollout), "votes": votes, "errors": errors, "decision": state, "reason": reason}


def complete(registry: Registry, rollout: Rollout, head: str, reason: str, figures: dict) -> Rollout:
    """Move the tag from the stable commit to the candidate, then record the rollout completed; put
    the tag back when the record changed meanwhile (another writer ended it)."""
    repo_id, tag = rollout.repo_id, rollout.tag
    current = registry.tags(repo_id).get(tag)
    if current not in (rollout.stable, rollout.candidate):
        raise LoradockError(f"{tag} points at {current or 'nothing'} now, not at {rollout.stable}, where the rollout "
                            f"began: not moving it", f"see who moved it, then end the rollout with `loradock rollout "
                            f"abort {repo_id} --tag {tag}`")
    if current == rollout.stable:
        registry.move_tag(repo_id, tag, current, rollout.candidate,
                          f"loradock rollout: {tag} -> {rollout.candidate} after a canary at {rollout.share}%: "
                          f"{reason}.")
    ended = rollout.ended("completed", reason, figures)
    try:
        records.write(registry, ended, head)
    except Busy:
        if current == rollout.stable:
            registry.move_tag(repo_id, tag, rollout.candidate, rollout.stable,
                              "restored: the rollout's record changed while it was being completed")
        raise
    return ended


def abort(repo_id: str, tag: str, endpoint: str | None = None, token: str | None = None) -> Rollout:
    """Record the running rollout of `tag` aborted; the tag stays where it is.

    Raises:
        LoradockError: no such rollout, or it ended already.
    """
    door = client.registry(endpoint, token)
    head, rollout = latest(door, repo_id, tag)
    if not rollout.running:
        raise LoradockError(f"the rollout of {tag} to {rollout.candidate} is {rollout.state.replace('_', ' ')} already",
                            "nothing to abort; start another with `loradock promote ... --canary`")
    rollout = rollout.ended("aborted", "aborted with `loradock rollout abort`")
    records.write(door, rollout, head)
    return rollout


def render(step: dict) -> str:
    r, votes, errors = step["rollout"], step["votes"], step["errors"]
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(r["started_at"]))
    lines = [f"{r['repo_id']} tag {r['tag']}: {r['state'].replace('_', ' ')} (since {since}), {r['share']}% of its "
             f"requests to the candidate {r['candidate']}, the rest to the stable {r['stable']}",
             "  votes: " + (f"candidate's win rate {votes['win_rate']:.2f}, 95% interval [{votes['low']:.2f}, "
                            f"{votes['high']:.2f}] over {votes['votes']} votes" if votes else "none between the two"),
             "  errors: " + (", ".join(f"{side} {errors[side].get('errors', 0)} of {errors[side].get('requests', 0)}"
                                       for side in ("candidate", "stable")) if errors else "none reported")]
    applied = {"completed": f"; {r['tag']} now points at the candidate", "rolled_back": f"; {r['tag']} stays"}
    if step["decision"] or r["state"] == "running":
        lines.append(f"  decision: {(step['decision'] or 'keep running').replace('_', ' ')}: {step['reason']}"
                     + applied.get(step["decision"], ""))
    else:
        lines.append(f"  {step['reason']}")
    return "\n".join(lines)


def watch(args, every: float) -> None:
    """`status` each `every` seconds, each step printed, until the rollout ends."""
    while True:
        try:
            step = status(args.repo, args.tag, votes_of(args), False, args.registry, args.token)
        except Busy as e:  # a replica wrote the record meanwhile: read it again next time
            print(e.message, flush=True)
        else:
            print(json.dumps(step) if args.format == "json" else render(step), flush=True)
            if step["rollout"]["state"] != "running":
                return
        time.sleep(every)


# --- the commands ---------------------------------------------------------------------------------

REPO = {"help": "the adapter's repo", "positional": True, "metavar": "REPO", "required": True}
TAG = {"help": "the tag being rolled out, e.g. prod", "required": True, "metavar": "TAG"}


@dataclass
class RolloutStatusArgs:
    """Print a tag's rollout and its evidence (the votes between candidate and stable commit, the
    errors the replicas reported), and apply the decision: complete it (the tag moves to the
    candidate) once at least 20 votes put the candidate's win rate no lower than 0.45 at its 95%
    interval's lower bound; roll it back (the tag stays) once they put it below 0.5 at the upper
    bound, or once the candidate's error rate over 50 requests or more is over 5 points above the stable's."""

    repo: str | None = field(default=None, metadata=REPO)
    tag: str | None = field(default=None, metadata=TAG)
    advance: bool = field(default=False, metadata={"switch": True, "help": "complete it whatever the evidence"})
    format: Literal["text", "json"] = field(default="text", metadata={"help": "text or json"})
    votes: str | None = field(default=None, metadata={"help": VOTES_HELP, "metavar": "PATH"})
    registry: str | None = field(default=None, metadata={"help": REGISTRY_HELP, "metavar": "URL"})
    token: str | None = field(default=None, metadata={"help": TOKEN_HELP, "secret": True})


@dataclass
class RolloutWatchArgs:
    """`loradock rollout status` again and again, each step printed, until the rollout ends."""

    repo: str | None = field(default=None, metadata=REPO)
    tag: str | None = field(default=None, metadata=TAG)
    every: float = field(default=60.0, metadata={"help": "seconds between steps", "metavar": "SECONDS"})
    format: Literal["text", "json"] = field(default="text", metadata={"help": "text or json (one object a line)"})
    votes: str | None = field(default=None, metadata={"help": VOTES_HELP, "metavar": "PATH"})
    registry: str | None = field(default=None, metadata={"help": REGISTRY_HELP, "metavar": "URL"})
    token: str | None = field(default=None, metadata={"help": TOKEN_HELP, "secret": True})


@dataclass
class RolloutAbortArgs:
    """End a tag's running rollout, recorded as aborted: the replicas answer all its requests with the
    commit the tag points at, which does not move."""

    repo: str | None = field(default=None, metadata=REPO)
    tag: str | None = field(default=None, metadata=TAG)
    registry: str | None = field(default=None, metadata={"help": REGISTRY_HELP, "metavar": "URL"})
    token: str | None = field(default=None, metadata={"help": TOKEN_HELP, "secret": True})


def register(subparsers) -> None:
    group = subparsers.add_parser("rollout", help="a canary rollout of a tag: its evidence, its end")
    sub = group.add_subparsers(dest="rollout_command", metavar="SUBCOMMAND", required=True)
    subcommand(sub, "status", RolloutStatusArgs, run_status, "rollout-status.yaml",
               help="a rollout's evidence; complete or roll it back when the evidence decides")
    subcommand(sub, "watch", RolloutWatchArgs, run_watch, "rollout-watch.yaml",
               help="rollout status every few seconds until it ends")
    subcommand(sub, "abort", RolloutAbortArgs, run_abort, "rollout-abort.yaml",
               help="end a running rollout; the tag stays")


def run_status(args) -> int:
    step = status(args.repo, args.tag, votes_of(args), args.advance, args.registry, args.token)
    print(json.dumps(step, indent=2) if args.format == "json" else render(step))
    return 0


def run_watch(args) -> int:
    if args.every < 0:
        raise LoradockError(f"--every {args.every:g}: a wait cannot be negative", "pass --every 60 (seconds)")
    watch(args, args.every)
    return 0


def run_abort(args) -> int:
    rollout = abort(args.repo, args.tag, args.registry, args.token)
    print(f"aborted the rollout of {rollout.tag} to {rollout.candidate}; {rollout.tag} stays at {rollout.stable}")
    return 0
