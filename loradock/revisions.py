"""`loradock lineage REPO@REV` and `loradock promote REPO@REV --tag TAG`: an adapter revision's chain
of parents back to its base model, and moving a tag to a revision only with the evidence that it
beats its parent.

Each revision speaks for itself through the `metrics.json` that `loradock train` wrote into it: its
objective, its parent (repo and commit), its data (a registry dataset's commit, and the sha256 of
the rows), its steps and its held-out figures. The votes come from the comparison screen's
database (`ui.votes`), rated per pair of commits by `ui.ratings`.

    loradock lineage alice/reverse@v2
    loradock promote alice/reverse@v2 --tag prod      # refused without evidence; --force overrides
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from loradock.errors import LoradockError

HEADLINE = ("exact_match", "rouge_l")  # the held-out figures compared, in order
MAX_DEPTH = 100  # a chain longer than this is a loop in the records, not a history


@dataclass
class Revision:
    repo_id: str
    commit: str
    metrics: dict  # its metrics.json ({} when it has none)
    tags: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.repo_id}@{self.commit}"

    @property
    def parent(self) -> dict | None:
        parent = self.metrics.get("parent")
        return parent if isinstance(parent, dict) and parent.get("repo_id") and parent.get("commit") else None

    @property
    def held_out(self) -> dict:
        return self.metrics.get("eval_metrics") or {}

    @property
    def held_out_sha256(self) -> str | None:
        """What its held-out figures were scored on (the prompts and references; for a run that
        did not record those, its held-out file)."""
        return self.metrics.get("held_out_sha256") or (self.metrics.get("eval_data") or {}).get("sha256")

    @property
    def headline(self) -> tuple[str, float] | None:
        return next(((k, self.held_out[k]) for k in HEADLINE if self.held_out.get(k) is not None), None)

    def data(self) -> str:
        dataset = self.metrics.get("dataset") or {}
        sha = (self.metrics.get("dataset_sha256") or "")[:12]
        where = f"datasets/{dataset['repo_id']}@{dataset['commit'][:12]}/{dataset['file']}" if dataset.get("repo_id") \
            else Path((self.metrics.get("train_data") or {}).get("path") or "?").name
        return f"{where} (sha256 {sha or '?'})"


class Registry:
    """The revisions of one registry, read through huggingface_hub."""

    def __init__(self, endpoint: str | None = None, token: str | None = None):
        from hub.client import endpoint_url, hub_api, token_for

        self.endpoint = endpoint_url(endpoint)
        self.token = token_for(self.endpoint, token)
        self.api = hub_api(self.endpoint, self.token)

    def revision(self, repo_id: str, revision: str) -> Revision:
        """Raises: NotFound (no such repo or revision), Unreachable, RegistryRefused."""
        from hub.adapter import METRICS
        from hub.adapter.records import read_metrics
        from hub.client import download_files, hub_errors

        with hub_errors(self.endpoint, repo_id, revision):
            commit = self.api.model_info(repo_id, revision=revision).sha
            refs = self.api.list_repo_refs(repo_id)
        folder = download_files(repo_id, commit, (METRICS,), self.endpoint, self.token)
        metrics = read_metrics(folder) if folder else {}
        return Revision(repo_id, commit, metrics, sorted(t.name for t in refs.tags if t.target_commit == commit))

    def chain(self, spec: str) -> list[Revision]:
        """The revision `spec` names, then its parent, and so on back to the first one."""
        from hub.adapter import AdapterRef

        ref = AdapterRef.parse(spec)
        chain = [self.revision(ref.repo_id, ref.revision)]
        while (parent := chain[-1].parent) and len(chain) < MAX_DEPTH:
            chain.append(self.revision(parent["repo_id"], parent["commit"]))
        return chain

    def tag_target(self, repo_id: str, tag: str) -> str | None:
        from hub.client import hub_errors

        with hub_errors(self.endpoint, repo_id):
            return next((t.target_commit for t in self.api.list_repo_refs(repo_id).tags if t.name == tag), None)

    def move_tag(self, repo_id: str, tag: str, current: str | None, commit: str, message: str) -> None:
        """Point `tag` (at `current` now, or nowhere) at `commit`. A Hub tag cannot be moved in
        place: it is deleted and made again, and put back where it was if making it again fails."""
        from hub.client import hub_errors

        with hub_errors(self.endpoint, repo_id, tag):
            if current:
                self.api.delete_tag(repo_id, tag=tag)
            try:
                self.api.create_tag(repo_id, tag=tag, revision=commit, tag_message=message)
            except BaseException:
                if current:
                    self.api.create_tag(repo_id, tag=tag, revision=current, tag_message="restored: a move failed")
                raise


def versus(votes_path: Path | None, child: Revision, parent: Revision) -> dict | None:
    """The child's win rate over its parent in the blind votes (with its 95% interval); None
    without such votes."""
    from ui import ratings, votes

    if votes_path is None or not Path(votes_path).exists():
        return None
    for row in ratings.pairs(votes.outcomes(Path(votes_path))):
        sides = (row["revision_x"], row["revision_y"])
        if sides == (child.commit, parent.commit):
            return {"votes": row["votes"], "win_rate": row["win_rate"], "low": row["low"], "high": row["high"]}
        if sides == (parent.commit, child.commit):
            return {"votes": row["votes"], "win_rate": 1 - row["win_rate"], "low": 1 - row["high"],
                    "high": 1 - row["low"]}
    return None


def describe(revision: Revision, parent: Revision | None, votes_path: Path | None) -> dict:
    """One line of the lineage, as data."""
    m = revision.metrics
    headline = revision.headline
    return {"repo_id": revision.repo_id, "commit": revision.commit, "tags": revision.tags,
            "objective": m.get("objective") or ("sft" if m else None), "method": m.get("method"),
            "data": revision.data() if m else None, "dataset": m.get("dataset"), "dataset_sha256": m.get("dataset_sha256"),
            "steps": m.get("steps"), "held_out": {headline[0]: headline[1]} if headline else None,
            "parent": revision.parent, "base_model": m.get("base_model"),
            "base_model_revision": m.get("base_model_revision"),
            "votes_vs_parent": versus(votes_path, revision, parent) if parent else None}


def lineage(spec: str, votes_path: Path | None, endpoint: str | None = None, token: str | None = None) -> list[dict]:
    chain = Registry(endpoint, token).chain(spec)
    return [describe(r, chain[i + 1] if i + 1 < len(chain) else None, votes_path) for i, r in enumerate(chain)]


def render_lineage(rows: list[dict]) -> str:
    lines = []
    for depth, row in enumerate(rows):
        tags = f" [{', '.join(row['tags'])}]" if row["tags"] else ""
        held = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in (row["held_out"] or {}).items()) or "no held-out score"
        votes = row["votes_vs_parent"]
        voted = (f"; votes vs parent {votes['win_rate']:.2f} [{votes['low']:.2f}, {votes['high']:.2f}] over "
                 f"{votes['votes']}" if votes else "")
        lines.append(f"{'  ' * depth}{'└─ ' if depth else ''}{row['repo_id']}@{row['commit']}{tags}")
        lines.append(f"{'  ' * depth}{'   ' if depth else ''}  {row['objective'] or 'unknown objective'}"
                     f"{' ' + row['method'] if row['method'] else ''}, {row['steps'] or '?'} steps on "
                     f"{row['data'] or 'unknown data'}; {held}{voted}")
    last = rows[-1]
    if last["parent"] is None and last["base_model"]:
        lines.append(f"{'  ' * len(rows)}└─ base {last['base_model']}"
                     + (f" (revision {last['base_model_revision']})" if last["base_model_revision"] else ""))
    return "\n".join(lines)


# --- promote ------------------------------------------------------------------------------------

def evidence(registry: Registry, child: Revision, tag: str, current: str | None,
             votes_path: Path | None) -> tuple[list[str], list[str]]:
    """(what speaks for the child, what stands against it or is missing) before `tag` may point at
    it: its parent's held-out score and votes, and the held-out score of the revision `tag` points
    at now, when that is another one scored on the same data."""
    found, problems = [], []
    if current and current not in (child.commit, (child.parent or {}).get("commit")):
        holder = registry.revision(child.repo_id, current)
        if holder.headline and child.headline and holder.held_out_sha256 == child.held_out_sha256 \
                and holder.headline[0] == child.headline[0] and child.headline[1] < holder.headline[1]:
            problems.append(f"held-out {child.headline[0]} {child.headline[1]:.3f} is below that of {holder.name} "
                            f"({holder.headline[1]:.3f}), which {tag} points at now")
    if not child.parent:
        return found, [f"{child.name} records no parent revision to compare it with (it was not trained with "
                       "--init-adapter)"]
    parent = registry.revision(child.parent["repo_id"], child.parent["commit"])
    mine, theirs = child.headline, parent.headline
    if mine is None or theirs is None or mine[0] != theirs[0]:
        missing = " and ".join(r.name for r, h in ((child, mine), (parent, theirs)) if h is None) or "either"
        problems.append(f"no held-out score of {missing} to compare (train with --eval-data)")
    elif child.held_out_sha256 != parent.held_out_sha256:
        problems.append(f"{child.name} and its parent were scored on different held-out data (sha256 "
                        f"{(child.held_out_sha256 or '?')[:12]} and {(parent.held_out_sha256 or '?')[:12]})")
    elif mine[1] < theirs[1]:
        problems.append(f"held-out {mine[0]} {mine[1]:.3f} is below its parent's {theirs[1]:.3f}")
    else:
        found.append(f"held-out {mine[0]} {mine[1]:.3f}, parent {theirs[1]:.3f}")
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


def promote(spec: str, tag: str, force: bool, votes_path: Path | None, endpoint: str | None = None,
            token: str | None = None) -> str:
    """Point `tag` at the revision `spec` names when the evidence allows it (or `force`); the tag's
    message, which says what the evidence was, or that it was forced past.

    Raises:
        LoradockError: the evidence is missing or against it and not `force`; no tag moved.
    """
    from hub.adapter import AdapterRef
    from hub.errors import BadRequest
    from hub.storage import check_ref_name

    ref = AdapterRef.parse(spec)
    try:
        check_ref_name(tag, "tag")  # the registry's own rule, checked before anything is read
    except BadRequest as e:
        raise LoradockError(f"--tag {tag!r}: {e}", "pass a tag name such as prod; no tag was moved") from None
    registry = Registry(endpoint, token)
    child = registry.revision(ref.repo_id, ref.revision)
    current = registry.tag_target(ref.repo_id, tag)
    found, problems = evidence(registry, child, tag, current, votes_path)
    if problems and not force:
        raise LoradockError(f"not moving {tag} to {child.name}: " + "; ".join(problems),
                            f"train a revision that beats its parent, or pass --force to move {tag} anyway; "
                            f"no tag was moved", "\n".join(f"evidence for it: {line}" for line in found))
    message = f"loradock promote: {tag} -> {child.commit}. " + (
        f"Forced with --force past: {'; '.join(problems)}." if problems else "") + (
        f" Evidence: {'; '.join(found)}." if found else "")
    if current == child.commit:
        return message.replace("->", "already at", 1)
    registry.move_tag(ref.repo_id, tag, current, child.commit, message.strip())
    return message.strip()


# --- the commands -------------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser("lineage", help="an adapter revision's chain of parents back to its base model",
                              description="Print each revision back to the base: commit, tags, objective, steps, "
                                          "data (dataset commit and sha256), held-out score and vote win rate over "
                                          "its parent where known.")
    p.add_argument("spec", metavar="REPO@REVISION")
    add_registry_flags(p)
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=run_lineage)

    p = subparsers.add_parser("promote", help="move a tag to a revision that beats its parent",
                              description="Point --tag at REPO@REVISION only when its held-out score is not below its "
                                          "parent's (same held-out data) and, if votes compare the two, its win rate "
                                          "over the parent is above 50% at the 95% interval's lower bound. The "
                                          "tag's message records the evidence.")
    p.add_argument("spec", metavar="REPO@REVISION")
    p.add_argument("--tag", required=True, help="the tag to move, e.g. prod")
    p.add_argument("--force", action="store_true", help="move it without the evidence (the tag's message says so)")
    add_registry_flags(p)
    p.set_defaults(func=run_promote)


def add_registry_flags(p) -> None:
    from ui.cli import add_votes_flag

    p.add_argument("--registry", help="registry URL (none: $HF_ENDPOINT, else http://127.0.0.1:8090)")
    p.add_argument("--token", help="registry token (none: $HF_TOKEN, else `loradock hub login`'s)")
    add_votes_flag(p)


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
    print(promote(args.spec, args.tag, args.force, votes_of(args), args.registry, args.token))
    return 0
