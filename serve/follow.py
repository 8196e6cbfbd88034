"""Names that move, served by commits that do not: inside vLLM's API server process, each request's
`model` naming a registry adapter by a tag or a branch (`org/name@prod`, `org/name`) is answered by
the commit that ref points at, and vLLM only ever holds commit-pinned adapters (`org/name@<sha>`).

A ref is resolved on its first request, then again every `--follow-refs` seconds, and at once when
the registry's webhook says the repo's refs moved (`serve.middleware.follow`). A registry that
cannot be reached leaves the last commit known serving. When a ref moves, the commit it left keeps
answering the requests already running on it, and is unloaded once no ref served here points at it.

A canary rollout of a tag (`hub.rollouts`, started by `loradock promote --canary`) splits that
tag's requests: `share` percent of conversations go to the candidate, sticky per conversation (the
request's `user`, else its system prompt and first user message), so one chat never flips between
versions. The requests and errors per commit are counted here; a rollout whose candidate's error
rate rises is rolled back from here (`hub.rollouts.judge`), and every replica following the same
record in the registry agrees.
"""

import asyncio
import collections
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache

from hub import rollouts
from hub.adapter import AdapterRef
from loradock.errors import Busy, LoradockError, NotFound
from serve import runtime

logger = logging.getLogger("vllm.loradock")
SHA = re.compile(r"[0-9a-f]{40}")
ROLLBACK_MIN_REQUESTS = 20  # a candidate's requests on this replica before its error rate is judged


def pinned_name(repo_id: str, commit: str) -> str:
    """The name vLLM holds a commit of an adapter under."""
    return f"{repo_id}@{commit}"


def is_pinned(name: str) -> bool:
    return bool(SHA.fullmatch(name.partition("@")[2]))


@dataclass
class Counts:
    requests: int = 0
    errors: int = 0  # answered with an error status (400 and up): a rollout's two sides get the same
    # share of the clients' own mistakes, so only the adapter's own failures tell them apart

    def as_dict(self) -> dict:
        return {"requests": self.requests, "errors": self.errors}


@dataclass
class Followed:
    """A moving name as clients send it, and what it resolves to now."""

    name: str
    ref: AdapterRef
    commit: str
    rollout: "rollouts.Rollout | None" = None
    rollout_head: str | None = None  # the rollouts branch's commit the record was read at
    resolved_at: float = field(default_factory=time.monotonic)

    def commits(self) -> set[str]:
        """The commits this name may answer with now."""
        if self.rollout is not None and self.rollout.running:
            return {self.rollout.stable, self.rollout.candidate}
        return {self.commit}

    def commit_for(self, conversation: str) -> str:
        """The commit that answers `conversation`: the candidate for `share` percent of them while
        a rollout runs (the same conversation always to the same side), else the ref's commit."""
        rollout = self.rollout
        if rollout is None or not rollout.running:
            return self.commit
        bucket = int.from_bytes(hashlib.sha256(f"{rollout.candidate}\0{conversation}".encode()).digest()[:4], "big")
        return rollout.candidate if bucket % 100 < rollout.share else rollout.stable

    def describe(self) -> dict:
        """What /v1/models says of the name."""
        info = {"repo_id": self.ref.repo_id, "revision": self.ref.revision, "follows": self.ref.revision,
                "commit": self.commit}
        if self.rollout is not None and self.rollout.running:
            info["rollout"] = {"stable": self.rollout.stable, "candidate": self.rollout.candidate,
                               "share": self.rollout.share}
        return info


def conversation_key(body: dict) -> str:
    """What keeps a conversation on one side of a rollout: the OpenAI `user` field when the client
    sends one, else the system prompt and the first user message (a chat's first turn stays the
    first turn as the chat grows), else the prompt of a completion."""
    if isinstance(body.get("user"), str) and body["user"]:
        return "user:" + body["user"]
    messages = body.get("messages")
    if isinstance(messages, list):
        opening = []
        for message in messages:
            if not isinstance(message, dict):
                continue
            opening.append([message.get("role"), message.get("content")])
            if message.get("role") == "user":
                break
        return "chat:" + json.dumps(opening, sort_keys=True, default=str)
    return "prompt:" + json.dumps(body.get("prompt"), default=str)[:4096]


class Follower:
    """The moving names this server has been asked for, resolved through `registry` (a
    `hub.client.Registry`, reached from worker threads) on their first request, then every
    `interval` seconds and whenever `moved` is called; `on_retired` is handed the pinned names no
    followed name answers with any more after a refresh."""

    def __init__(self, registry, interval: float, on_retired=None):
        self.registry = registry
        self.interval = interval
        self.on_retired = on_retired  # called with the pinned names no followed name answers with any more
        self.names: dict[str, Followed] = {}
        self.counts: dict[str, Counts] = collections.defaultdict(Counts)  # commit -> its outcomes here
        self._first: dict[str, asyncio.Lock] = {}
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._repos_to_refresh: set[str] = set()

    # --- a request's name ---

    async def followed(self, name: str) -> Followed | None:
        """The followed name `name`, resolved on its first request; None when it is not a moving
        registry name (a pinned commit, the base, a name loaded by path) or the registry does not
        know it (the request goes on as it is, and is answered as before: a 404).

        Raises:
            Unreachable, RegistryRefused: the registry could not resolve a name never resolved before.
        """
        if not AdapterRef.looks_like(name) or is_pinned(name):
            return None
        if (known := self.names.get(name)) is not None:
            self.start()
            return known
        try:
            ref = AdapterRef.parse(name)
        except LoradockError:
            return None
        if runtime.unknown_recently(name):  # the registry said no moments ago: not asked again
            return None
        lock = self._first.setdefault(name, asyncio.Lock())
        async with lock:
            try:
                if name not in self.names and not runtime.unknown_recently(name):
                    self.names[name] = await asyncio.to_thread(resolve, self.registry, name, ref, None)
            except NotFound:
                runtime.note_unknown(name)
            finally:
                self._first.pop(name, None)
        if name not in self.names:
            return None
        self.start()
        return self.names[name]

    # --- outcomes ---

    def count(self, commit: str, status: int) -> None:
        """One answer of `commit`; a running canary's candidate failing past the minimum of requests
        has its rollout judged at once, not at the next refresh."""
        counts = self.counts[commit]
        counts.requests += 1
        counts.errors += status >= 400
        if status >= 400 and counts.requests >= ROLLBACK_MIN_REQUESTS:
            for followed in self.names.values():
                if followed.rollout is not None and followed.rollout.running and followed.rollout.candidate == commit:
                    self.moved(followed.ref.repo_id)

    # --- following ---

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._follow())

    def moved(self, repo_id: str) -> None:
        """The registry said `repo_id`'s refs moved: refresh its names now."""
        if any(f.ref.repo_id == repo_id for f in self.names.values()):
            self._repos_to_refresh.add(repo_id)
            self._wake.set()

    async def _follow(self) -> None:
        while self.names:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
                only = set(self._repos_to_refresh)
            except TimeoutError:
                only = None
            self._wake.clear()
            self._repos_to_refresh -= only or set()
            try:
                await self.refresh(only)
            except Exception:  # noqa: BLE001 - a bug must not stop the following: said, and tried again next time
                logger.exception("loradock: following the registry's refs failed")

    async def refresh(self, repos: set[str] | None = None) -> None:
        """Resolve the followed names again (of `repos` only, when given); a name the registry
        cannot be asked about now keeps its last commit."""
        before = self.serving()
        for name, followed in list(self.names.items()):
            if repos is not None and followed.ref.repo_id not in repos:
                continue
            try:
                now = await asyncio.to_thread(resolve, self.registry, name, followed.ref, followed)
            except LoradockError as e:
                logger.warning("loradock: %s still answered by %s: the registry could not resolve it (%s)",
                               name, followed.commit[:12], e.problem)
                continue
            now = await steward(self.registry, self.counts, now)
            if now.commit != followed.commit or now.commits() != followed.commits():
                logger.info("loradock: %s now answered by %s", name, ", ".join(sorted(c[:12] for c in now.commits())))
            self.names[name] = now
        retired = before - self.serving()
        if retired and self.on_retired:
            self.on_retired(retired)

    def serving(self) -> set[str]:
        """The pinned names the followed names may answer with now."""
        return {pinned_name(f.ref.repo_id, c) for f in self.names.values() for c in f.commits()}


def resolve(registry, name: str, ref: AdapterRef, previous: Followed | None) -> Followed:
    """`name` resolved now (in a worker thread): its ref's commit, and the rollout of that ref
    when it is a tag with one. The record is read again only when the rollouts branch moved.

    Raises:
        NotFound: no such repo or ref. Unreachable, RegistryRefused: the registry's.
    """
    branches, tags = registry.refs(ref.repo_id)
    commit = tags.get(ref.revision) or branches.get(ref.revision)
    if commit is None:
        raise NotFound(f"{ref.repo_id} has no branch or tag {ref.revision!r}")
    head = branches.get(rollouts.BRANCH)
    rollout = None
    if ref.revision in tags and head is not None:
        if previous is not None and previous.rollout_head == head:
            rollout = previous.rollout
        else:
            rollout = rollouts.read(registry, ref.repo_id, ref.revision, at=head)
    if rollout is not None and rollout.running and rollout.stable != commit:
        rollout = None  # the tag moved under it: the tag is what serves
    return Followed(name, ref, commit, rollout, head)


async def steward(registry, counts: dict[str, Counts], followed: Followed) -> Followed:
    """Roll a running rollout back when its candidate's error rate here rose past its stable
    commit's (`hub.rollouts.judge`); the record in the registry is what every replica follows."""
    rollout = followed.rollout
    if rollout is None or not rollout.running:
        return followed
    errors = {"candidate": counts[rollout.candidate].as_dict(), "stable": counts[rollout.stable].as_dict()}
    state, reason, figures = rollouts.judge(rollout, None, errors, min_requests=ROLLBACK_MIN_REQUESTS)
    if state != "rolled_back":
        return followed
    ended = rollout.ended(state, reason, figures)
    try:
        await asyncio.to_thread(rollouts.write, registry, ended, followed.rollout_head)
    except Busy:
        return followed  # another replica (or `loradock rollout`) wrote it first: read next time
    except LoradockError as e:
        logger.warning("loradock: could not roll back %s: %s", followed.name, e.problem)
        return followed
    logger.warning("loradock: rolled back %s's rollout of %s: %s", followed.name, rollout.candidate[:12], reason)
    return Followed(followed.name, followed.ref, followed.commit, ended, None)


@lru_cache(maxsize=1)
def follower() -> Follower | None:
    """This server's follower, over the registry and interval `loradock serve` passed; None when vLLM
    runs without loradock or without a registry."""
    from hub.client import registry

    cfg = runtime.config()
    if cfg is None or not cfg.registry:
        return None
    following = Follower(registry(cfg.registry, cfg.token), cfg.follow_refs)
    for spec, commit in cfg.startup_refs.items():  # what they resolved to at start-up, until the first refresh
        if not is_pinned(spec):
            following.names[spec] = Followed(spec, AdapterRef.of(spec), commit)
    return following
