"""What loradock's middleware pieces (`serve.middleware`) share as plain ASGI: loradock's errors as
HTTP statuses and OpenAI-shaped bodies (the one table that decides them), reading a request body and
handing it on, and rewriting a request or a response around a new body.

Pure ASGI (no Starlette request objects): a piece that read the body must hand the same events on
to vLLM, which listens on `receive` for the client going away after the body.
"""

import json
from dataclasses import dataclass

from loradock.errors import (AdapterRefused, Busy, Forbidden, InvalidRequest, LoradockError, NotFound, RegistryRefused,
                             Unreachable)

# loradock's errors as HTTP statuses, the one place they are decided (by type, most specific first).
STATUS = ((AdapterRefused, 400), (InvalidRequest, 400), (Forbidden, 403), (NotFound, 404), (Busy, 409),
          (Unreachable, 503), (RegistryRefused, 502), (LoradockError, 502))
KINDS = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
         409: "ConflictError", 502: "BadGatewayError", 503: "ServiceUnavailableError"}
BODY = "loradock.body"  # the scope key under which the last body read is kept, parsed (`read_json`)


def status_of(error: LoradockError) -> int:
    return next(status for kind, status in STATUS if isinstance(error, kind))


def refusal(error: LoradockError, param: str | None = None) -> tuple[int, bytes]:
    """The status and error body of one of loradock's errors: its problem, then its fix."""
    status = status_of(error)
    return status, error_body(status, f"{error.problem}; fix: {error.fix}" if error.fix else error.problem, param)


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return json.dumps({"error": {"message": message, "type": KINDS.get(status, "Error"), "param": param,
                                 "code": status}}).encode()


async def respond(send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def with_length(headers, length: int) -> list:
    """`headers` with content-length set to `length` (the body they describe was rewritten)."""
    return [(k, v) for k, v in headers if k != b"content-length"] + [(b"content-length", str(length).encode())]


async def send_whole(send, start: dict, body: bytes) -> None:
    """Send a response whose body was rewritten: `start` (an http.response.start) with its length set again."""
    await send({**start, "headers": with_length(start.get("headers", []), len(body))})
    await send({"type": "http.response.body", "body": body})


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


@dataclass(frozen=True)
class Body:
    """A request body and its JSON: `json` is None when it is not JSON (vLLM answers that itself, with
    the same json module) and `too_deep` when it nests past what the json module parses."""

    raw: bytes
    json: object = None
    too_deep: bool = False

    @classmethod
    def parse(cls, raw: bytes) -> "Body":
        try:
            return cls(raw, json.loads(raw) if raw else None)
        except ValueError:
            return cls(raw)
        except RecursionError:
            return cls(raw, too_deep=True)


async def read_json(scope, receive) -> tuple[Body, object]:
    """The request's body, parsed, and the `receive` that hands it on (`receive` itself then has no
    body left: it is the one to build on when another body is sent instead). Parsed once per request: the
    parse is kept in the scope, which every piece after this one sees, and reused while the body
    it was made from is the body read."""
    raw = await read_body(receive)
    body = scope.get(BODY)
    if body is None or body.raw != raw:
        body = scope[BODY] = Body.parse(raw)
    return body, replay(raw, receive)


def with_path(scope, path: str, raw: bytes) -> dict:
    """The request's scope for `path` with a body of `raw` (its content-length set again)."""
    query = scope.get("query_string", b"") if path == scope["path"] else b""
    return dict(scope, path=path, raw_path=path.encode(), query_string=query,
                headers=with_length(scope["headers"], len(raw)))


def rewritten(scope, receive, body: dict) -> tuple[dict, object]:
    """The scope and `receive` of the same request with `body` as its JSON body; `receive` is the
    request's own, its body already read (not a replay of the old body, which would hand it over next)."""
    raw = json.dumps(body).encode()
    scope = with_path(scope, scope["path"], raw)
    scope[BODY] = Body(raw, body)
    return scope, replay(raw, receive)


class JsonPiece:
    """A middleware piece that acts on the requests of `routes` (a `serve.routes.Routes`) only, by
    their JSON body: every other request goes straight on to `app`. `handle` gets the body parsed,
    `replayed` (the `receive` that hands that body on) and `receive` (the request's own, its body
    read: the one to build on when another body is sent instead)."""

    routes = None

    def __init__(self, app, config):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope not in self.routes:
            return await self.app(scope, receive, send)
        body, replayed = await read_json(scope, receive)
        return await self.handle(scope, body, receive, replayed, send)

    async def handle(self, scope, body: Body, receive, replayed, send):
        raise NotImplementedError
