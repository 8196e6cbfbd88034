"""ASGI middleware that `loradock serve` adds to vLLM's OpenAI server (vLLM's `--middleware`).
It runs before vLLM's own middleware, on every request:

- with an API key, every route but /health needs it (vLLM guards only /v1, /v2, /inference and
  /cohere, leaving /invocations, /adapters, /tokenize and others open);
- an adapter is checked (`hub.adapter.checks.check_folder`) before it goes live: on POST
  /v1/load_lora_adapter, and before the first request for a registry adapter (which vLLM's
  resolver then loads), so a refusal is a 400 naming the problem rather than a 500 from vLLM's
  worker; loradock's other errors get their status from one table (`STATUS`);
- a request to an adapter whose chat template differs from the base model's is rendered with the
  adapter's template (the one it was trained with); clients cannot send templates of their own: a
  request body holding a `chat_template` anywhere (`client_template`) is refused with a 400 on every
  route, whatever its path;
- an unload waits for the requests already using that adapter and holds new ones back until it is
  done (vLLM checks a request's model name, then looks the adapter up again later: an unload in
  between would turn an accepted request into a 404), for `--unload-drain-timeout` seconds at
  most: past that the unload answers 409, nothing is unloaded, and the held requests go on;
- a hot-load from a namespace this server does not serve is a 403 (`serve.runtime.allowed`);
- a request to a prompt-tuning or p-tuning adapter never reaches vLLM under the adapter's name: it
  is rendered and tokenized by vLLM's own /tokenize, embedded behind the adapter's soft prompt
  (`serve.soft_prompt`) and answered by vLLM's /v1/completions for the base model, in-process,
  then translated back into the endpoint the client called; loading and unloading such an adapter
  by path is done here too, since vLLM cannot load it as LoRA;
- GET /v1/models gains a `loradock` field per adapter (repo, revision, commit sha, method, rank,
  metric) and a card for each prompt-tuning adapter known.
"""

import asyncio
import contextlib
import hmac
import json

from hub.adapter import method_of
from hub.adapter.checks import check_folder
from loradock.errors import (AdapterRefused, Busy, Forbidden, InvalidRequest, LoradockError, NotFound, RegistryRefused,
                             Unreachable)
from serve import runtime, soft_prompt
from serve.inflight import InFlight

OPEN_ROUTES = {"/health"}
GENERATION = {"/v1/chat/completions", "/v1/completions"}
# The field vLLM renders a Jinja template from: at the top of a body, and inside chat_template_kwargs.
TEMPLATE_FIELD = "chat_template"

# loradock's errors as HTTP statuses, the one place they are decided (by type, most specific first).
STATUS = ((AdapterRefused, 400), (InvalidRequest, 400), (Forbidden, 403), (NotFound, 404), (Busy, 409),
          (Unreachable, 503), (RegistryRefused, 502), (LoradockError, 502))
KINDS = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
         409: "ConflictError", 502: "BadGatewayError", 503: "ServiceUnavailableError"}


def status_of(error: LoradockError) -> int:
    return next(status for kind, status in STATUS if isinstance(error, kind))


def refusal(error: LoradockError, param: str | None = None) -> tuple[int, bytes]:
    """The status and error body of one of loradock's errors: its problem, then its fix."""
    status = status_of(error)
    return status, error_body(status, f"{error.problem}; fix: {error.fix}" if error.fix else error.problem, param)


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": KINDS.get(status, "Error"), "param": param,
                                 "code": status}}).encode()


async def respond(send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def client_template(body) -> str | None:
    """Where a request body sets a chat template: "chat_template", "chat_template_kwargs.chat_template",
    "metadata.x[0].chat_template"...; None when it sets none (a null one is unset to vLLM too).

    `loradock serve` starts vLLM with --trust-request-chat-template, the only way vLLM 0.32 lets a
    request be rendered with another template than the server's: the middleware sets each adapter's
    own on chat requests, so every client-sent one must stop here. vLLM reads the field on /v1/chat/
    completions, /invocations, /tokenize, /v1/responses, /v1/messages, the render and batch routes, and
    any route it adds later; a template renders in a sandbox, but a nested loop outlives the render
    timeout. So it is refused at any depth of any JSON body, not per route: a wrapper route or a new
    field nesting it deeper cannot carry one past.
    """
    stack = [("", body)]  # a loop, not recursion: a body may nest deeper than Python's stack
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            if value.get(TEMPLATE_FIELD) is not None:
                return f"{where}.{TEMPLATE_FIELD}" if where else TEMPLATE_FIELD
            stack += [(f"{where}.{key}" if where else str(key), item) for key, item in value.items()]
        elif isinstance(value, list):
            stack += [(f"{where}[{i}]", item) for i, item in enumerate(value)]
    return None


def has_body(scope) -> bool:
    """HTTP/1.1: a request has a body only with a Content-Length above 0 or a Transfer-Encoding."""
    headers = dict(scope["headers"])
    return b"transfer-encoding" in headers or headers.get(b"content-length", b"0").strip() not in (b"0", b"")


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


class LoradockMiddleware:
    def __init__(self, app):
        self.app = app
        cfg = runtime.config()
        self.in_flight = InFlight(cfg.unload_drain_timeout if cfg else 5.0)
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
        if has_body(scope):  # any other route, any method: only the template check
            raw = await read_body(receive)
            if (refused := template_refusal(raw)) is not None:
                return await respond(send, 400, refused)  # InvalidRequest's status
            return await self.app(scope, replay(raw, receive), send)
        return await self.app(scope, receive, send)

    @staticmethod
    def authorized(scope, key: str) -> bool:
        """`Authorization: Bearer KEY`, the scheme in any case (RFC 9110 section 11.1: `bearer` is as good)."""
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, credentials = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.lstrip(b" "), key.encode())

    async def with_body(self, scope, receive, send, path: str):
        raw = await read_body(receive)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            body = None  # vLLM answers malformed JSON itself (and template_refusal too deep a one)
        adapter = None
        if (refused := template_refusal(raw, body)) is not None:
            return await respond(send, 400, refused)
        if isinstance(body, dict):
            try:
                if path in GENERATION:
                    adapter = await self.adapter_for(body)
                    body = self.with_template(body, path, adapter)
                elif path == "/v1/load_lora_adapter" and body.get("lora_path"):
                    # Off the event loop: the first check of a weights file reads all of it.
                    config = await asyncio.to_thread(check_folder, body["lora_path"], runtime.served_base())
                    if method_of(config).served_by == "prompt-embeds":
                        return await self.load_soft_prompt(send, body)
                elif path == "/v1/unload_lora_adapter" and getattr(runtime.known(str(body.get("lora_name"))),
                                                                   "soft_prompt", False):
                    return await self.unload_soft_prompt(send, body["lora_name"])
            except LoradockError as e:
                return await respond(send, *refusal(e, "model"))
            raw = json.dumps(body).encode()
        async with contextlib.AsyncExitStack() as held:
            try:
                await held.enter_async_context(self.guard(path, body))
            except Busy as e:
                return await respond(send, *refusal(e, "lora_name"))
            if adapter is not None and adapter.soft_prompt:
                return await self.answer_with_soft_prompt(scope, receive, send, path, body, adapter)
            return await self.app(with_path(scope, path, raw), replay(raw, receive), self.track_adapters(send, path, body))

    def guard(self, path: str, body) -> contextlib.AbstractAsyncContextManager:
        name = body.get("lora_name" if path == "/v1/unload_lora_adapter" else "model") if isinstance(body, dict) else None
        if not isinstance(name, str) or name == runtime.config().base_model or path == "/v1/load_lora_adapter":
            return contextlib.nullcontext()
        return self.in_flight.unloading(name) if path == "/v1/unload_lora_adapter" else self.in_flight.using(name)

    async def adapter_for(self, body: dict) -> "runtime.Adapter | None":
        """The adapter a generation request names, fetched from the registry on its first request
        (before vLLM's resolver, so the check, the template and soft prompts apply); None for the
        base model or a name vLLM may still know."""
        name = body.get("model")
        if not isinstance(name, str) or name == runtime.config().base_model:
            return None
        adapter = runtime.known(name)
        if adapter is None:
            try:
                adapter = await runtime.fetch(name)
            except NotFound:
                return None  # vLLM answers 404 for the model
        return adapter

    def with_template(self, body: dict, path: str, adapter: "runtime.Adapter | None") -> dict:
        if (path == "/v1/chat/completions" and adapter and not adapter.soft_prompt and adapter.chat_template
                and adapter.chat_template != self.base_template()):
            body = {**body, "chat_template": adapter.chat_template}
        return body

    async def answer_with_soft_prompt(self, scope, receive, send, path: str, body: dict, adapter: "runtime.Adapter"):
        """Render and tokenize with vLLM's /tokenize, prepend the soft prompt to the tokens'
        embeddings, generate with vLLM's /v1/completions for the base, translate the answer back."""
        cfg = runtime.config()
        try:
            asked = soft_prompt.tokenize_body(body, path, cfg.base_model, adapter.chat_template)
            status, answer = await self.call(scope, receive, "/tokenize", asked)
            if status != 200:
                return await respond(send, status, answer)
            tokenized = json.loads(answer)
            n_virtual = (await asyncio.to_thread(soft_prompt.soft_prompt, adapter.path)).shape[0]
            soft_prompt.check_length(n_virtual, tokenized["count"], soft_prompt.requested_max_tokens(body, path),
                                     tokenized["max_model_len"])
            embeds = await asyncio.to_thread(soft_prompt.prompt_embeds, cfg.base_path, adapter.path,
                                             tokenized["tokens"])
        except LoradockError as e:
            return await respond(send, *refusal(e))
        raw = json.dumps(soft_prompt.completion_body(body, path, cfg.base_model, embeds)).encode()
        translation = soft_prompt.Translation(path, adapter.name,
                                              tokenized["tokens"] if body.get("return_token_ids") else None)
        return await self.app(with_path(scope, "/v1/completions", raw), replay(raw, receive),
                              translated(send, translation))

    async def call(self, scope, receive, path: str, body: dict) -> tuple[int, bytes]:
        """POST `body` to one of vLLM's own routes, in-process: (status, response body)."""
        raw, status, chunks = json.dumps(body).encode(), {}, []

        async def collect(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            else:
                chunks.append(message.get("body", b""))

        await self.app(with_path(scope, path, raw), replay(raw, receive), collect)
        return status["code"], b"".join(chunks)

    async def load_soft_prompt(self, send, body: dict):
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("lora_name is required: the name clients will send as `model`")
        await asyncio.to_thread(soft_prompt.soft_prompt, body["lora_path"])  # read once, now
        runtime.loaded_by_path(name, body["lora_path"])
        await respond(send, 200, f"Success: prompt-tuning adapter '{name}' added successfully.".encode(), b"text/plain")

    async def unload_soft_prompt(self, send, name: str):
        try:
            async with self.in_flight.unloading(name):
                runtime.forget(name)
        except Busy as e:
            return await respond(send, *refusal(e, "lora_name"))
        await respond(send, 200, f"Success: prompt-tuning adapter '{name}' removed successfully.".encode(), b"text/plain")

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
                    runtime.loaded_by_path(body["lora_name"], body["lora_path"])
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
                listing["data"] = listing.get("data", []) + soft_prompt_cards(listing.get("data", []))
                for card in listing["data"]:
                    if card.get("parent"):
                        adapter = runtime.known(card["id"]) or runtime.remember(card["id"], card["root"])
                        card["loradock"] = adapter.info
                body = json.dumps(listing).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
            await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        return wrapped


def template_refusal(raw: bytes, body=None) -> bytes | None:
    """The 400 body for a request that sets a chat template (`client_template`); None otherwise. A body
    that is not JSON passes: vLLM parses it with the same json module, and refuses it."""
    if body is None:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            return None
        except RecursionError:  # nested past what json parses: it cannot be checked, so it does not pass
            return error_body(400, "the request body nests JSON too deeply to be checked; flatten it")
    field = client_template(body)
    if field is None:
        return None
    refused = InvalidRequest(f"{field} cannot be set by the client: each model is served with the chat template it "
                             f"was trained with, which loradock serve chooses; remove {field} from the request")
    return error_body(status_of(refused), refused.problem, field)


def soft_prompt_cards(cards: list[dict]) -> list[dict]:
    """vLLM's card for each prompt-tuning adapter it does not list (the shape of its LoRA cards)."""
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelPermission

    listed, base = {card["id"] for card in cards}, runtime.config().base_model
    return [ModelCard(id=a.name, root=str(a.path), parent=base, permission=[ModelPermission()]).model_dump()
            for a in runtime.soft_prompted() if a.name not in listed]


def with_path(scope, path: str, raw: bytes) -> dict:
    """The request's scope for `path` with a body of `raw` (its content-length set again)."""
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
    query = scope.get("query_string", b"") if path == scope["path"] else b""
    return dict(scope, path=path, raw_path=path.encode(), query_string=query,
                headers=headers + [(b"content-length", str(len(raw)).encode())])


def translated(send, translation: "soft_prompt.Translation"):
    """A `send` that turns vLLM's answer for the base into the client's: a JSON body whole, a
    server-sent event stream event by event. Errors (any other status) pass through as they are."""
    state, pending = {}, bytearray()

    async def wrapped(message):
        if message["type"] == "http.response.start":
            state["ok"] = message["status"] == 200
            state["stream"] = dict(message.get("headers", [])).get(b"content-type", b"").startswith(b"text/event-stream")
            state["start"] = message
            if not state["ok"] or state["stream"]:
                await send(message)
            return
        if not state["ok"]:
            return await send(message)
        pending.extend(message.get("body", b""))
        more = message.get("more_body", False)
        if not state["stream"]:
            if not more:
                body = json.dumps(translation.body(json.loads(pending))).encode()
                headers = [(k, v) for k, v in state["start"].get("headers", []) if k != b"content-length"]
                await send({**state["start"], "headers": headers + [(b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
            return
        events, _, rest = bytes(pending).rpartition(b"\n\n")
        pending[:] = rest
        out = "".join(f"data: {data}\n\n" for event in events.split(b"\n\n") if event.strip()
                      for data in translation.event(event.decode().removeprefix("data:").strip()))
        await send({"type": "http.response.body", "body": out.encode(), "more_body": more})

    return wrapped
