"""ASGI middleware that `loradock serve` adds to vLLM's OpenAI server (vLLM's `--middleware`).
It runs before vLLM's own middleware, on every request:

- with an API key, every route but /health needs it (vLLM guards only /v1, /v2, /inference and
  /cohere, leaving /invocations, /adapters, /tokenize and others open);
- an adapter is checked (`hub.adapter.checks.check_folder`) before it goes live: on POST
  /v1/load_lora_adapter, and before the first request for a registry adapter (which vLLM's
  resolver then loads), so a refusal is a 400 naming the problem rather than a 500 from vLLM's
  worker; loradock's other errors get their status from one table (`STATUS`);
- a request to an adapter whose chat template differs from the base model's is rendered with the
  adapter's template (the one it was trained with); clients cannot send templates of their own;
- an unload waits for the requests already using that adapter and holds new ones back until it is
  done (vLLM checks a request's model name, then looks the adapter up again later: an unload in
  between would turn an accepted request into a 404);
- GET /v1/models gains a `loradock` field per adapter: repo, revision, commit sha, rank, metric.
"""

import asyncio
import collections
import contextlib
import hmac
import json

from hub.adapter.checks import check_folder
from loradock.errors import AdapterRefused, InvalidRequest, LoradockError, NotFound, RegistryRefused, Unreachable
from serve import runtime

OPEN_ROUTES = {"/health"}
GENERATION = {"/v1/chat/completions", "/v1/completions"}

# loradock's errors as HTTP statuses, the one place they are decided (by type, most specific first).
STATUS = ((AdapterRefused, 400), (InvalidRequest, 400), (NotFound, 404), (Unreachable, 503), (RegistryRefused, 502),
          (LoradockError, 502))
KINDS = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 502: "BadGatewayError",
         503: "ServiceUnavailableError"}


def status_of(error: LoradockError) -> int:
    return next(status for kind, status in STATUS if isinstance(error, kind))


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": KINDS.get(status, "Error"), "param": param,
                                 "code": status}}).encode()


async def respond(send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def replay(body: bytes, receive):
    """A `receive` that hands the (rewritten) body over once, then the real connection's events:
    vLLM listens on it for the client going away, and must not hear it early."""
    sent = False

    async def replayed():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


class InFlight:
    """Requests per adapter name, and the names being unloaded: a request waits while its adapter
    is being unloaded; an unload waits until no request uses the adapter."""

    def __init__(self):
        self._count = collections.Counter()
        self._unloading: set[str] = set()
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def using(self, name: str):
        async with self._changed:
            await self._changed.wait_for(lambda: name not in self._unloading)
            self._count[name] += 1
        try:
            yield
        finally:
            async with self._changed:
                self._count[name] -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def unloading(self, name: str):
        async with self._changed:
            await self._changed.wait_for(lambda: name not in self._unloading)
            self._unloading.add(name)
            await self._changed.wait_for(lambda: self._count[name] == 0)
        try:
            yield
        finally:
            async with self._changed:
                self._unloading.discard(name)
                self._changed.notify_all()


class LoradockMiddleware:
    def __init__(self, app):
        self.app = app
        self.in_flight = InFlight()
        self._base_template: str | None = None
        self._base_template_read = False

    async def __call__(self, scope, receive, send):
        cfg = runtime.config()
        if scope["type"] != "http" or cfg is None:
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if cfg.api_key and path not in OPEN_ROUTES and not self.authorized(scope, cfg.api_key):
            return await respond(send, 401, error_body(401, "missing or wrong API key: send Authorization: Bearer <key>"))
        if method == "POST" and path in GENERATION | {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}:
            return await self.with_body(scope, receive, send, path)
        if method == "GET" and path == "/v1/models":
            return await self.app(scope, receive, self.annotate_models(send))
        return await self.app(scope, receive, send)

    @staticmethod
    def authorized(scope, key: str) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        return hmac.compare_digest(header.encode(), f"Bearer {key}".encode())

    async def with_body(self, scope, receive, send, path: str):
        raw = await read_body(receive)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None  # vLLM answers malformed JSON itself
        if isinstance(body, dict):
            try:
                if path in GENERATION:
                    body = await self.prepare_generation(body, path)
                elif path == "/v1/load_lora_adapter" and body.get("lora_path"):
                    check_folder(body["lora_path"], runtime.served_base())
            except LoradockError as e:
                return await respond(send, status_of(e), error_body(status_of(e), e.problem, "model"))
            raw = json.dumps(body).encode()
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = dict(scope, headers=headers + [(b"content-length", str(len(raw)).encode())])
        async with self.guard(path, body):
            return await self.app(scope, replay(raw, receive), self.track_adapters(send, path, body))

    def guard(self, path: str, body) -> contextlib.AbstractAsyncContextManager:
        name = body.get("lora_name" if path == "/v1/unload_lora_adapter" else "model") if isinstance(body, dict) else None
        if not isinstance(name, str) or name == runtime.config().base_model or path == "/v1/load_lora_adapter":
            return contextlib.nullcontext()
        return self.in_flight.unloading(name) if path == "/v1/unload_lora_adapter" else self.in_flight.using(name)

    async def prepare_generation(self, body: dict, path: str) -> dict:
        if "chat_template" in body or "chat_template" in (body.get("chat_template_kwargs") or {}):
            raise InvalidRequest("chat_template cannot be set by the client: each model is served with the "
                                 "template it was trained with")
        name = body.get("model")
        if not isinstance(name, str) or name == runtime.config().base_model:
            return body
        adapter = runtime.known(name)
        if adapter is None:
            try:
                adapter = await runtime.fetch(name)  # before vLLM's resolver, so the check and template apply
            except NotFound:
                return body  # vLLM answers 404 for the model
        if path == "/v1/chat/completions" and adapter.chat_template and adapter.chat_template != self.base_template():
            body = {**body, "chat_template": adapter.chat_template}
        return body

    def base_template(self) -> str | None:
        if not self._base_template_read:
            from transformers import AutoTokenizer

            self._base_template = AutoTokenizer.from_pretrained(runtime.config().base_path).chat_template
            self._base_template_read = True
        return self._base_template

    @staticmethod
    def track_adapters(send, path: str, body):
        """Learn which adapter names a successful load or unload added or removed."""
        if path not in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter") or not isinstance(body, dict):
            return send
        status = {}

        async def wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body") and status.get("code") == 200:
                if path == "/v1/load_lora_adapter":
                    runtime.remember(body["lora_name"], body["lora_path"])
                else:
                    runtime.forget(body.get("lora_name", ""))
            await send(message)

        return wrapped

    @staticmethod
    def annotate_models(send):
        """Buffer vLLM's /v1/models answer and add our metadata to each adapter card."""
        start = {}
        chunks = []

        async def wrapped(message):
            if message["type"] == "http.response.start":
                start.update(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            if start["status"] == 200:
                listing = json.loads(body)
                for card in listing.get("data", []):
                    if card.get("parent"):
                        adapter = runtime.known(card["id"]) or runtime.remember(card["id"], card["root"])
                        card["loradock"] = adapter.info
                body = json.dumps(listing).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
            await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        return wrapped
