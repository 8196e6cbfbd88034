"""Moving names answered by commits (`serve.follow`): a generation request naming a registry adapter
by a tag or a branch reaches vLLM naming the commit that answers it (`org/name@<sha>`), and its
response names the model as the client did, with the commit in `X-Loradock-Commit`. A request
naming a commit gets the header too.

While a canary splits a tag, a sample of its chat requests (`--canary-pairs` percent) is asked
again of both commits in the background, and the two answers kept as a blind pair for the
comparison screen (`loradock.pairs`).

Also here: the registry's webhook deliveries (POST `serve.routes.WEBHOOK`, signed with the secret
`loradock serve` subscribed with; no API key, the signature is the credential), which make the
names of the repo they are about be resolved again at once; and unloading the commits no name
answers with any more, once the requests on them are done (through the pieces after this one, so
the unload drain holds them: a 409 from it means "still busy", and the unload is tried again).
"""

import asyncio
import json
import logging
import random
import re
import time
import uuid

from hub.adapter import COMMIT_HEADER, AdapterRef
from hub.signing import SeenDeliveries, verify_delivery
from loradock import pairs
from loradock.errors import Forbidden, LoradockError
from serve import follow, runtime
from serve.asgi import Body, JsonPiece, error_body, refusal, respond, rewritten, send_whole
from serve.config import ServeConfig
from serve.routes import CHAT, FOLLOWED, UNLOAD, WEBHOOK

RETRY_UNLOAD_S = 2.0
MAX_DELIVERY = 1 << 20  # bytes of a webhook delivery: the registry's payloads are a few hundred
logger = logging.getLogger("vllm.loradock")


class FollowRefs(JsonPiece):
    routes = FOLLOWED

    def __init__(self, app, config: ServeConfig):
        super().__init__(app, config)
        self.follower = follow.follower()
        self.inside = InServer(app, config, self.follower)
        if self.follower is not None:
            self.follower.on_retired = self.inside.retire
        self.seen_deliveries = SeenDeliveries()

    async def __call__(self, scope, receive, send):
        if self.follower is None:
            return await self.app(scope, receive, send)
        self.inside.served_scope = scope
        if scope["path"] == WEBHOOK and scope["method"] == "POST":
            return await self.delivered(scope, receive, send)
        return await super().__call__(scope, receive, send)

    async def handle(self, scope, body: Body, receive, replayed, send):
        key = "lora_name" if scope["path"] == UNLOAD else "model"
        name = body.json.get(key) if isinstance(body.json, dict) else None
        if (not isinstance(name, str) or name == self.config.base_model or not AdapterRef.looks_like(name)
                or runtime.held_by_path(name)):
            return await self.app(scope, replayed, send)
        if scope["path"] == UNLOAD:
            return await self.unload_followed(scope, receive, body.json, name, replayed, send)
        if follow.is_pinned(name):
            return await self.app(scope, replayed, with_commit(send, name.partition("@")[2]))
        try:
            runtime.allowed(AdapterRef.of(name), self.config)
        except Forbidden:  # answered by the admission (403) before the registry is asked
            return await self.app(scope, replayed, send)
        try:
            followed = await self.follower.followed(name)
        except LoradockError as e:  # the registry is down or refused: said once, not asked again downstream
            return await respond(send, *refusal(e, "model"))
        if followed is None:  # not a name the registry has: answered as before (a 404)
            return await self.app(scope, replayed, send)
        commit = followed.commit_for(follow.conversation_key(body.json))
        rollout = followed.rollout if followed.rollout is not None and followed.rollout.running else None
        if rollout and scope["path"] == CHAT and random.random() * 100 < self.config.canary_pairs:
            self.inside.background(self.inside.sample_pair(body.json, followed.ref.repo_id, rollout))
        stable = rollout.stable if rollout else commit
        if commit != stable and await self.answer(scope, receive, body.json, name, followed, commit, send,
                                                  fall_back=True):
            return None
        return await self.answer(scope, receive, body.json, name, followed, stable, send)

    async def answer(self, scope, receive, body: dict, name: str, followed: "follow.Followed", commit: str, send,
                     fall_back: bool = False) -> bool:
        """Send the request on to `commit`; with `fall_back` (a canary's candidate answering), an
        error status is counted against the candidate and nothing is sent, so that the stable
        commit answers instead: False then."""
        pinned = follow.pinned_name(followed.ref.repo_id, commit)
        scope, replayed = rewritten(scope, receive, {**body, "model": pinned})
        answered = with_commit(send, commit, renamed=(pinned, name), count=self.follower.count,
                               swallow_errors=fall_back)
        await self.app(scope, replayed, answered)
        return not answered.failed

    async def unload_followed(self, scope, receive, body: dict, name: str, replayed, send):
        """An unload of a followed name unloads the commit it answers with now (the unload drain
        waits for the requests on it) and forgets the name: its next request resolves it again."""
        followed = self.follower.names.get(name)
        if followed is None:
            return await self.app(scope, replayed, send)
        pinned = follow.pinned_name(followed.ref.repo_id, followed.commit)
        scope, replayed = rewritten(scope, receive, {**body, "lora_name": pinned})
        status = {}

        async def forgetting(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif not message.get("more_body") and status.get("code") == 200:
                self.follower.names.pop(name, None)
            await send(message)

        return await self.app(scope, replayed, forgetting)

    # --- the registry's webhook ---

    async def delivered(self, scope, receive, send):
        """A delivery from the registry: checked (`hub.signing.verify_delivery`), then the names of
        its repo resolved again. The route is open (no API key), so its body is bounded too."""
        secret = self.config.webhook_secret
        if not secret:
            return await respond(send, 404, error_body(404, "this server subscribed to no webhook"))
        raw = await read_at_most(receive, MAX_DELIVERY)
        if raw is None:
            return await respond(send, 413, error_body(413, f"a webhook delivery is at most {MAX_DELIVERY} bytes"))
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            verify_delivery(secret, headers, raw, self.seen_deliveries)
            repo = json.loads(raw)["repo"]["name"]
        except Forbidden as e:
            logger.warning("loradock: a webhook delivery was refused: %s", e.problem)
            return await respond(send, 403, error_body(403, e.problem))
        except (ValueError, KeyError, TypeError):
            return await respond(send, 400, error_body(400, "a webhook delivery without repo.name"))
        self.follower.moved(repo)
        return await respond(send, 200, b'{"ok": true}')


class InServer:
    """Requests this server makes of itself, through the pieces after `FollowRefs` and vLLM, in the
    background: a canary's blind pairs, and the unloads of the commits no followed name answers with."""

    def __init__(self, app, config: ServeConfig, follower: "follow.Follower"):
        self.app, self.config, self.follower = app, config, follower
        self.served_scope: dict = {}  # a served request's scope, which these are built on: vLLM's app, its state
        self._tasks: set[asyncio.Task] = set()

    async def sample_pair(self, body: dict, repo_id: str, rollout) -> None:
        """Ask both commits of a running canary the same chat request (whole, not streamed) and
        append the two answers as a blind pair (`loradock.pairs`); a side that fails drops the pair."""
        asked = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "n")}
        answers = {}
        for side, commit in (("stable", rollout.stable), ("candidate", rollout.candidate)):
            status, raw = await self.call(CHAT, {**asked, "model": follow.pinned_name(repo_id, commit)})
            try:
                answers[side] = json.loads(raw)["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                return
            if status != 200 or not isinstance(answers[side], str):
                return
        system, prompt = opening(body.get("messages"))
        if prompt is None:
            return
        pair = pairs.CanaryPair(uuid.uuid4().hex, time.time(), repo_id, rollout.tag, rollout.stable, rollout.candidate,
                                system, prompt, answers["stable"], answers["candidate"])
        await asyncio.to_thread(pairs.append, pairs.path_for(self.config.port), pair)

    def background(self, work) -> None:
        """Run `work` on the event loop, kept until it is done (the loop holds tasks weakly)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def retire(self, names: set[str]) -> None:
        for name in names:
            self.background(self.unload_when_idle(name))

    async def unload_when_idle(self, name: str) -> None:
        """Unload `name` through the unload drain, again while it is busy; not once a followed
        name answers with it again."""
        while name not in self.follower.serving():
            status = await self.unload(name)
            if status != 409:
                if status == 200:
                    logger.info("loradock: unloaded %s: no name served here answers with it", name)
                return
            await asyncio.sleep(RETRY_UNLOAD_S)

    async def unload(self, name: str) -> int:
        return (await self.call(UNLOAD, {"lora_name": name}))[0]

    async def call(self, path: str, body: dict) -> tuple[int, bytes]:
        """POST `body` to `path` through the pieces after `FollowRefs` and vLLM, from inside the
        server: (the status, the whole response body)."""
        raw = json.dumps(body).encode()
        served = {k: v for k, v in self.served_scope.items()  # vLLM reads its app from it; the routing is redone
                  if not k.startswith("loradock.") and k not in ("endpoint", "route", "path_params")}
        scope = {**served, "type": "http", "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
                 "client": ("127.0.0.1", 0)}
        sent, status, chunks = False, {}, []

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            await asyncio.Event().wait()  # the client never goes away

        async def send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send)
        return status.get("code", 500), b"".join(chunks)


async def read_at_most(receive, limit: int) -> bytes | None:
    """The request's body, or None once it passes `limit` bytes (the rest is not read)."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        more = message.get("more_body", False)
    return b"".join(chunks)


def opening(messages) -> tuple[str, str | None]:
    """(the system prompt, '' when none; the last user message, None when there is no text one)."""
    if not isinstance(messages, list):
        return "", None
    system = next((m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "system"), "")
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    prompt = users[-1] if users and isinstance(users[-1], str) else None
    return system if isinstance(system, str) else "", prompt


def with_commit(send, commit: str, renamed: tuple[str, str] | None = None, count=None, swallow_errors: bool = False):
    """A `send` that adds `X-Loradock-Commit: commit` to the response, counts its status under the
    commit, and, with `renamed` (pinned, asked), names the model in the body as the client did.
    With `swallow_errors`, a response with an error status (400 and up) is not sent at all; its
    `failed` attribute says so."""
    start = {}
    chunks = []
    if renamed:  # `"model": "<pinned>"` as vLLM and the soft-prompt piece write it, spaced or not
        pinned_field = re.compile(rb'("model"\s*:\s*)' + re.escape(json.dumps(renamed[0]).encode()))
        asked = json.dumps(renamed[1]).encode().replace(b"\\", b"\\\\")

    def rename(chunk: bytes) -> bytes:
        return pinned_field.sub(rb"\g<1>" + asked, chunk) if renamed else chunk

    async def wrapped(message):
        if wrapped.failed:
            return None
        if message["type"] == "http.response.start":
            if count is not None:
                count(commit, message["status"])
            if swallow_errors and message["status"] >= 400:
                wrapped.failed = True
                return None
            headers = [*message.get("headers", []), (COMMIT_HEADER.lower().encode(), commit.encode())]
            start.update(message, headers=headers)
            if not renamed or streamed(headers):
                return await send(start)
            return None
        if message["type"] != "http.response.body":
            return await send(message)
        if not renamed:
            return await send(message)
        if streamed(start["headers"]):
            return await send({**message, "body": rename(message.get("body", b""))})
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            await send_whole(send, start, rename(b"".join(chunks)))
        return None

    wrapped.failed = False
    return wrapped


def streamed(headers) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)

