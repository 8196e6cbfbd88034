"""`loradock lineage REPO@REV` and `loradock promote REPO@REV --tag TAG`: an adapter revision's chain
of parents back to its base model, and moving a tag to a revision only with the evidence that it
beats its parent.

Each revision speaks for itself through the run record (`RunRecord`, metrics.json) that `loradock train` wrote into it: its
objective, its parent (repo and commit), its data (a registry dataset's commit, and the sha256 of
the rows), its steps and its held-out figures. The votes come from the comparison screen's
database (`ui.votes`), rated per pair of commits by `ui.ratings`: the evidence joins the registry's
records and the votes this package collects, so both commands live here. The registry is read
through `hub.client.Registry`.

    loradock lineage alice/reverse@v2
    loradock promote alice/reverse@v2 --tag prod      # refused without evidence; --force overrides

A canary (`--canary PERCENT`) moves no tag: it records a rollout in the registry, which
`ui.rollouts` and `loradock rollout` carry on; `loradock lineage` shows the rollouts of each revision.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hub import client
from hub import rollouts as rollout_records
from hub.adapter import AdapterRef
from hub.adapter.records import RunRecord
from hub.client import Registry, Revision
from hub.objects import ref_name_problem
from loradock.config import REGISTRY_HELP, TOKEN_HELP, subcommand
from loradock.errors import LoradockError
from ui.cli import VOTES_HELP

MAX_DEPTH = 100  # a chain longer than this is a loop in the records, not a history
# How much higher an adapter's perplexity on the general sample (`sft.forgetting`) may be than the
# base's before promote refuses it: 0.25 is 25%.
MAX_FORGETTING = 0.25


@dataclass
class RevisionRecord:
    """A revision of an adapter and the record its training wrote into it."""
    revision: Revision
    run: RunRecord  # empty when it has none

    @property
    def repo_id(self) -> str:
        return self.revision.repo_id

    @property
    def commit(self) -> str:
        return self.revision.commit

    @property
    def tags(self) -> list[str]:
        return list(self.revision.tags)

    @property
    def name(self) -> str:
        return self.revision.name

    @property
    def parent(self) -> dict | None:
        parent = self.run.parent
        return parent if parent and parent.get("repo_id") and parent.get("commit") else None


def recorded(registry: Registry, repo_id: str, ref: str) -> RevisionRecord:
    """Raises: RepoNotFound, RevisionNotFound, Unreachable, RegistryRefused."""
    revision = registry.revision(repo_id, ref)
    return RevisionRecord(revision, registry.run_record(repo_id, revision.commit))


def chain(registry: Registry, spec: str) -> list[RevisionRecord]:
    """The revision `spec` names, then its parent, and so on back to the first one."""
    ref = AdapterRef.parse(spec)
    revisions = [recorded(registry, ref.repo_id, ref.revision)]
    while (parent := revisions[-1].parent) and len(revisions) < MAX_DEPTH:
        revisions.append(recorded(registry, parent["repo_id"], parent["commit"]))
    return revisions


def versus(votes_path: Path | None, child: RevisionRecord, parent: RevisionRecord) -> dict | None:
    """The child's win rate over its parent in the blind votes (with its 95% interval); None
    without such votes."""
    return win_rate(votes_path, child.commit, parent.commit)


def win_rate(votes_path: Path | None, commit: str, other: str) -> dict | None:
    """`commit`'s win rate over `other` in the blind votes, `{"votes", "win_rate", "low", "high"}`
    (the 95% interval); None without such votes."""
    from ui import ratings, votes

    if votes_path is None or not Path(votes_path).exists():
        return None
    for row in ratings.pairs(votes.outcomes(Path(votes_path))):
        sides = (row["revision_x"], row["revision_y"])
        if sides == (commit, other):
            return {"votes": row["votes"], "win_rate": row["win_rate"], "low": row["low"], "high": row["high"]}
        if sides == (other, commit):
            return {"votes": row["votes"], "win_rate": 1 - row["win_rate"], "low": 1 - row["high"],
                    "high": 1 - row["low"]}
    return None


def describe(revision: RevisionRecord, parent: RevisionRecord | None, votes_path: Path | None,
             rollouts: tuple[rollout_records.Rollout, ...] = ()) -> dict:
    """One line of the lineage, as data; `rollouts`: the recorded rollouts of its repo's tags."""
    run, headline = revision.run, revision.run.headline
    return {"repo_id": revision.repo_id, "commit": revision.commit, "tags": revision.tags,
            "objective": run.objective or ("sft" if run.recorded else None), "method": run.method,
            "data": run.data() if run.recorded else None, "dataset": run.dataset, "dataset_sha256": run.dataset_sha256,
            "steps": run.steps, "held_out": {headline[0]: headline[1]} if headline else None,
            "forgetting": run.forgetting,
            "parent": revision.parent, "base_model": run.base_model, "base_model_revision": run.base_model_revision,
            "votes_vs_parent": versus(votes_path, revision, parent) if parent else None,
            "rollouts": [{"tag": r.tag, "role": "candidate" if r.candidate == revision.commit else "stable",
                          "state": r.state, "share": r.share, "reason": r.reason, "figures": r.figures,
                          "stable": r.stable, "candidate": r.candidate, "updated_at": r.updated_at}
                         for r in rollouts
                         if revision.repo_id == r.repo_id and revision.commit in (r.stable, r.candidate)]}


def recorded_rollouts(registry: Registry, repo_ids: set[str]) -> tuple[rollout_records.Rollout, ...]:
    """The rollout record of each tag of these repos that has one."""
    found = []
    for repo_id in sorted(repo_ids):
        branches, tags = registry.refs(repo_id)
        head = branches.get(rollout_records.BRANCH)
        if head:
            found += [r for tag in sorted(tags) if (r := rollout_records.read(registry, repo_id, tag, head))]
    return tuple(found)


def lineage(spec: str, votes_path: Path | None, endpoint: str | None = None, token: str | None = None) -> list[dict]:
    door = client.registry(endpoint, token)
    revisions = chain(door, spec)
    rollouts = recorded_rollouts(door, {r.repo_id for r in revisions})
    return [describe(r, revisions[i + 1] if i + 1 < len(revisions) else None, votes_path, rollouts)
            for i, r in enumerate(revisions)]


def render_lineage(rows: list[dict]) -> str:
    lines = []
    for depth, row in enumerate(rows):
        tags = f" [{', '.join(row['tags'])}]" if row["tags"] else ""
        held = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in (row["held_out"] or {}).items()) or "no held-out score"
        if row.get("forgetting") is not None:
            held += f", general-ability perplexity {row['forgetting']:+.1%} against the base"
        votes = row["votes_vs_parent"]
        voted = (f"; votes vs parent {votes['win_rate']:.2f} [{votes['low']:.2f}, {votes['high']:.2f}] over "
                 f"{votes['votes']}" if votes else "")
        lines.append(f"{'  ' * depth}{'└─ ' if depth else ''}{row['repo_id']}@{row['commit']}{tags}")
        lines.append(f"{'  ' * depth}{'   ' if depth else ''}  {row['objective'] or 'unknown objective'}"
                     f"{' ' + row['method'] if row['method'] else ''}, {row['steps'] or '?'} steps on "
                     f"{row['data'] or 'unknown data'}; {held}{voted}")
        lines += [f"{'  ' * depth}{'   ' if depth else ''}  {rollout_line(r)}" for r in row.get("rollouts", ())]
    last = rows[-1]
    if last["parent"] is None and last["base_model"]:
        lines.append(f"{'  ' * len(rows)}└─ base {last['base_model']}"
                     + (f" (revision {last['base_model_revision']})" if last["base_model_revision"] else ""))
    return "\n".join(lines)


def rollout_line(r: dict) -> str:
    """One rollout a revision took part in, for the lineage's text (the votes of a running one; an
    ended one's reason names them)."""
    votes = r["figures"].get("votes")
    other, commit = ("stable", r["stable"]) if r["role"] == "candidate" else ("candidate", r["candidate"])
    return (f"rollout of {r['tag']}: {r['role']} ({r['share']}% to the candidate; the {other} is {commit[:12]}), "
            f"{r['state'].replace('_', ' ')}" + (f": {r['reason']}" if r["reason"] else "")
            + (f"; votes {votes['win_rate']:.2f} [{votes['low']:.2f}, {votes['high']:.2f}] over {votes['votes']}"
               if not r["reason"] and isinstance(votes, dict) and {"win_rate", "low", "high", "votes"} <= votes.keys()
               else ""))


# --- promote ------------------------------------------------------------------------------------

def evidence(registry: Registry, child: RevisionRecord, tag: str, current: str | None,
             votes_path: Path | None, max_forgetting: float = MAX_FORGETTING) -> tuple[list[str], list[str]]:
    """(what speaks for the child, what stands against it or is missing) before `tag` may point at
    it: the forgetting guard's figure, where recorded, within `max_forgetting`; its parent's held-out
    score and votes; and the held-out score of the revision `tag` points at now, when that is
    another one scored on the same data."""
    found, problems = [], []
    forgetting = child.run.forgetting
    if forgetting is not None and forgetting > max_forgetting:
        problems.append(f"its general-ability perplexity is {forgetting:+.1%} against the base's, past "
                        f"--max-forgetting {max_forgetting:g}: it has forgotten more of what the base could do")
    elif forgetting is not None:
        found.append(f"general-ability perplexity {forgetting:+.1%} against the base (--max-forgetting {max_forgetting:g})")
    if current and current not in (child.commit, (child.parent or {}).get("commit")):
        holder = recorded(registry, child.repo_id, current)
        both = child.run.figure_against(holder.run)
        if both and holder.run.held_out == child.run.held_out and both[1] < both[2]:
            problems.append(f"held-out {both[0]} {both[1]:.3f} is below that of {holder.name} ({both[2]:.3f}), "
                            f"which {tag} points at now")
    if not child.parent:
        return found, [*problems, f"{child.name} records no parent revision to compare it with (it was not trained "
                                  "with --init-adapter)"]
    parent = recorded(registry, child.parent["repo_id"], child.parent["commit"])
    both = child.run.figure_against(parent.run)
    if both is None:
        missing = " and ".join(r.name for r in (child, parent) if r.run.headline is None)
        problems.append(f"no held-out score of {missing} to compare (train with --eval-data)" if missing else
                        f"{child.name} and its parent share no held-out figure (scored by {', '.join(child.run.eval_metrics)}"
                        f" and {', '.join(parent.run.eval_metrics)}): name a common --grader")
    elif child.run.held_out != parent.run.held_out:
        problems.append(f"{child.name} and its parent were scored on different held-out data (sha256 "
                        f"{(child.run.held_out or '?')[:12]} and {(parent.run.held_out or '?')[:12]})")
    elif graded_apart(child.run, parent.run, both[0]):
        problems.append(f"{child.name} and its parent were scored by different {both[0]} graders "
                        f"({child.run.grader(both[0])} and {parent.run.grader(both[0])})")
    elif both[1] < both[2]:
        problems.append(f"held-out {both[0]} {both[1]:.3f} is below its parent's {both[2]:.3f}")
    else:
        found.append(f"held-out {both[0]} {both[1]:.3f}, parent {both[2]:.3f}")
    votes = versus(votes_path, child, parent)
    if votes is None:
        found.append("no votes between the two")
    elif votes["low"] <= 0.5:
        problems.append(f"its win rate over its parent in the votes is {votes['win_rate']:.2f}, 95% interval "
                        f"[{votes['low']:.2f}, {votes['high']:.2f}] over {votes['votes']} votes: not above 50% at the "
                        "interval's lower bound")
    else:
        found.append(f"win rate over its parent {votes['win_rate']:.2f} [{votes['low']:.2f}, {votes['high']:.2f}] "
                     f"over {votes['votes']} votes")
    return found, problems


def graded_apart(one: RunRecord, other: RunRecord, name: str) -> bool:
    """Whether two figures of the same name were made by graders that differ (a changed schema file or
    Python module); runs that recorded no grader settings made theirs with the built-in ones."""
    def settings(run: RunRecord) -> dict:
        return {k: v for k, v in (run.grader(name) or {"grader": name}).items() if k != "name"}

    return settings(one) != settings(other)


def promote(spec: str, tag: str, force: bool, votes_path: Path | None, endpoint: str | None = None,
            token: str | None = None, max_forgetting: float = MAX_FORGETTING) -> str:
    """Point `tag` at the revision `spec` names when the evidence allows it (or `force`); the tag's
    message, which says what the evidence was, or that it was forced past.

    Raises:
        LoradockError: a canary rollout of `tag` is running, or the evidence is missing or against
            it and not `force`; no tag moved.
    """
    ref = AdapterRef.parse(spec)
    check_tag(tag)
    door = client.registry(endpoint, token)
    child = recorded(door, ref.repo_id, ref.revision)
    current = door.tags(ref.repo_id).get(tag)
    running = rollout_records.read(door, ref.repo_id, tag)
    if running and running.running:
        raise LoradockError(f"not moving {tag} to {child.name}: a canary rollout of {tag} to {running.candidate} is "
                            f"running ({running.share}% of its requests)",
                            f"end it first: `loradock rollout abort {ref.repo_id} --tag {tag}`, or complete it with "
                            f"`loradock rollout status {ref.repo_id} --tag {tag} --advance`; no tag was moved")
    found, problems = evidence(door, child, tag, current, votes_path, max_forgetting)
    if problems and not force:
        raise LoradockError(f"not moving {tag} to {child.name}: " + "; ".join(problems),
                            f"train a revision that beats its parent, or pass --force to move {tag} anyway; "
                            f"no tag was moved", "\n".join(f"evidence for it: {line}" for line in found))
    message = " ".join([f"loradock promote: {tag} -> {child.commit}.",
                        *([f"Forced with --force past: {'; '.join(problems)}."] if problems else []),
                        *([f"Evidence: {'; '.join(found)}."] if found else [])])
    if current == child.commit:
        return message.replace("->", "already at", 1)
    door.move_tag(ref.repo_id, tag, current, child.commit, message.strip())
    return message.strip()


def check_tag(tag: str) -> None:
    """The registry's own rule for a tag name, checked before anything is read.

    Raises:
        LoradockError: naming --tag.
    """
    problem = ref_name_problem(tag, "tag")
    if problem:
        raise LoradockError(f"--tag {tag!r}: {problem}", "pass a tag name such as prod; no tag was moved")


# --- the commands -------------------------------------------------------------------------------

@dataclass
class LineageArgs:
    """Print each revision back to the base: commit, tags, objective, steps, data (dataset commit and
    sha256), held-out score and vote win rate over its parent where known."""

    spec: str | None = field(default=None, metadata={"help": "the revision to start from", "positional": True,
                                                     "metavar": "REPO@REVISION", "required": True})
    format: Literal["text", "json"] = field(default="text", metadata={"help": "text or json"})
    registry: str | None = field(default=None, metadata={"help": REGISTRY_HELP, "metavar": "URL"})
    token: str | None = field(default=None, metadata={"help": TOKEN_HELP, "secret": True})
    votes: str | None = field(default=None, metadata={"help": VOTES_HELP, "metavar": "PATH"})


@dataclass
class PromoteArgs:
    """Point --tag at REPO@REVISION only when its held-out score is not below its parent's (the first
    figure both were scored on, the same held-out data and grader), its general-ability perplexity is
    within --max-forgetting of the base's where recorded, and, if votes compare the two, its win rate
    over the parent is above 50% at the 95% interval's lower bound. The tag's message records the
    evidence. With --canary, on the same
    evidence, move no tag: start a rollout of part of the tag's traffic (`loradock rollout`)."""

    spec: str | None = field(default=None, metadata={"help": "the revision to promote", "positional": True,
                                                     "metavar": "REPO@REVISION", "required": True})
    tag: str | None = field(default=None, metadata={"help": "the tag to move, e.g. prod", "required": True,
                                                    "metavar": "TAG"})
    force: bool = field(default=False, metadata={
        "switch": True, "help": "move it without the evidence (the tag's message says so)"})
    canary: int | None = field(default=None, metadata={
        "help": "move no tag: start a canary rollout that answers this percent (1-99) of the tag's requests with "
                "the revision; `loradock rollout status` completes or rolls it back on the evidence",
        "metavar": "PERCENT"})
    max_forgetting: float = field(default=MAX_FORGETTING, metadata={
        "help": "refuse a revision whose recorded perplexity on the general sample is more than this much above the "
                "base's (0.25: 25%; the forgetting guard `loradock train` and `eval` measure)", "metavar": "FRACTION"})
    registry: str | None = field(default=None, metadata={"help": REGISTRY_HELP, "metavar": "URL"})
    token: str | None = field(default=None, metadata={"help": TOKEN_HELP, "secret": True})
    votes: str | None = field(default=None, metadata={"help": VOTES_HELP, "metavar": "PATH"})


def register(subparsers) -> None:
    subcommand(subparsers, "lineage", LineageArgs, run_lineage, "lineage.yaml",
               help="an adapter revision's chain of parents back to its base model")
    subcommand(subparsers, "promote", PromoteArgs, run_promote, "promote.yaml",
               help="move a tag to a revision that beats its parent")


def votes_of(args) -> Path:
    """The screen's votes database, found as `loradock ui` and `loradock votes` find it; one that
    does not exist means no votes."""
    import os

    from ui import VOTES_ENV, votes

    return Path(args.votes or os.environ.get(VOTES_ENV) or votes.default_path())


def run_lineage(args) -> int:
    rows = lineage(args.spec, votes_of(args), args.registry, args.token)
    print(json.dumps(rows, indent=2) if args.format == "json" else render_lineage(rows))
    return 0


def run_promote(args) -> int:
    if args.canary is not None:
        from ui.rollouts import canary  # ui.rollouts builds on this module

        print(canary(args.spec, args.tag, args.canary, args.force, votes_of(args), args.registry, args.token,
                     args.max_forgetting))
        return 0
    print(promote(args.spec, args.tag, args.force, votes_of(args), args.registry, args.token, args.max_forgetting))
    return 0
