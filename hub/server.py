"""loradock hub serve [--host 127.0.0.1] [--port 8090] [--root DIR]

A registry that speaks the part of the Hugging Face Hub HTTP API that `huggingface_hub` uses for
model repos, so HfApi, hf_hub_download, snapshot_download and the `hf` CLI work against it with
HF_ENDPOINT pointing here (uploads with HF_HUB_DISABLE_XET=1: there is no Xet service).

The routes live in `hub.routes`, one router per area; they are thin: parse, call
`hub.storage.Registry`, shape the JSON (`hub.views`). This module puts them together and maps the
errors of `hub.errors` to the Hub's status codes, with `X-Error-Code` / `X-Error-Message` headers
and a `{"error": ...}` body; bad input is always a 4xx. Three ASGI layers sit in front of every
route: a body's pauses are bounded (`hub.slow_clients`), the path is decoded here (strict UTF-8,
`%2F` kept), and a request body is read and counted here, so no route sees more than `max_body` bytes.
"""

import contextlib
import logging
import re
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from hub import errors
from hub.delivery import Deliveries
from hub.routes import ROUTERS
from hub.routes.deps import error_response
from hub.slow_clients import BODY_IDLE_TIMEOUT, BoundBodyGaps
from hub.storage import Registry
from hub.webhooks import Webhooks

MAX_BODY = 64 << 20  # bytes of a request body, LFS uploads excepted
ERROR_CODES = {  # error -> (status, X-Error-Code)
    errors.RepoNotFound: (404, "RepoNotFound"), errors.RevisionNotFound: (404, "RevisionNotFound"),
    errors.EntryNotFound: (404, "EntryNotFound"), errors.WebhookNotFound: (404, None), errors.BadRequest: (400, None),
    errors.Unauthorized: (401, None), errors.Forbidden: (403, None), errors.Conflict: (409, None),
    errors.PreconditionFailed: (412, None), errors.TooLarge: (413, None), errors.NotSupported: (501, "NotSupported"),
    errors.InsufficientStorage: (507, "InsufficientStorage"),  # not a 500, which huggingface_hub resends 5 times
}


def create_app(registry: Registry, max_body: int = MAX_BODY, body_idle_timeout: float = BODY_IDLE_TIMEOUT) -> ASGIApp:
    """The registry's ASGI app over `registry`; request bodies over `max_body` bytes are refused
    (LFS uploads excepted: they stream to disk and are capped by the size announced for them), and
    so are bodies that pause for `body_idle_timeout` seconds (`hub.slow_clients`). Webhook deliveries
    (`hub.delivery`) run while the app does: from its startup to its shutdown."""
    app = FastAPI(title="loradock registry", docs_url=None, redoc_url=None, openapi_url=None, lifespan=delivering)
    app.state.registry = registry
    app.state.webhooks = Webhooks(registry)
    app.add_exception_handler(errors.HubError, hub_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_middleware(LimitBody, max_body=max_body)
    for router in ROUTERS:
        app.include_router(router)
    app.router.redirect_slashes = False
    return BoundBodyGaps(keep_encoded_slashes(app), body_idle_timeout)


@contextlib.asynccontextmanager
async def delivering(app: FastAPI):
    deliveries = Deliveries(app.state.webhooks)
    deliveries.start()
    try:
        yield
    finally:
        deliveries.stop()


async def hub_error(request: Request, exc: errors.HubError):
    status, code = ERROR_CODES.get(type(exc), (400, None))
    if isinstance(exc, errors.InsufficientStorage):  # the operator's to fix: said in the server's log too
        logging.getLogger(__name__).error("%s %s refused with 507: %s", request.method, request.url.path, exc.__cause__)
    headers = {"X-Repo-Commit": request.state.commit} if getattr(request.state, "commit", None) else {}
    response = error_response(status, exc.message, code)
    response.headers.update(headers)
    return response


async def invalid_body(request: Request, exc: RequestValidationError):
    problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in exc.errors())
    return error_response(400, f"invalid request: {problems}")


async def http_error(request: Request, exc: StarletteHTTPException):
    return error_response(exc.status_code, str(exc.detail))


class LimitBody:
    """Reads the request body before any route does, counting the bytes as they arrive, and answers
    413 as soon as they pass `max_body`, whatever Content-Length says (a chunked body has none);
    the route is then given the body read. So a route never reads past the cap and never has to be
    stopped mid-read. LFS uploads (`PUT /lfs/upload/...`) stream past it: their route writes to
    disk and stops at the size announced to the batch API."""

    def __init__(self, app: ASGIApp, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        lengths = [value for name, value in scope["headers"] if name == b"content-length"]
        if not all(re.fullmatch(rb"[0-9]+", value) for value in lengths):
            return await error_response(400, f"invalid Content-Length {b', '.join(lengths)!r}: it must be a whole "
                                             "number of bytes in ASCII digits")(scope, receive, send)
        if scope["method"] == "PUT" and scope["path"].startswith("/lfs/upload/"):
            return await self.app(scope, receive, send)
        if any(int(value) > self.max_body for value in lengths):
            return await self.too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client is gone: nobody to answer
            size += len(message.get("body", b""))
            if size > self.max_body:
                return await self.too_large(scope, receive, send)  # the server discards the rest
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> dict:
            return replay.pop() if replay else await receive()  # then the client's disconnect, if any

        await self.app(scope, replayed, send)

    async def too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(413, f"the request body is over this registry's limit of {self.max_body} bytes: commit "
                                  "fewer files at a time (files from 1 MiB go through LFS uploads, which have "
                                  "their own limit)")(scope, receive, send)


def keep_encoded_slashes(app: ASGIApp) -> ASGIApp:
    """Route on the raw path so that `feat%2Fx` stays one segment (the client quotes revisions that way);
    handlers unquote revision segments themselves. The path is decoded as strict UTF-8: a percent-escape
    that is not UTF-8 (`%ff`, overlong `%c0%af`) is a 400, not a replacement character in a repo name.
    So is a control character (`%00`, `%0a`): none is valid in a name, revision or file path, and
    Starlette's route patterns end in `$`, which matches before a final newline, so `main%0a` would
    otherwise be served as `main`."""
    async def wrapped(scope, receive, send):
        if scope["type"] == "http" and scope.get("raw_path"):
            raw = scope["raw_path"].split(b"?", 1)[0]
            try:
                path = unquote_to_bytes(raw.replace(b"%2F", b"%252F").replace(b"%2f", b"%252F")).decode("utf-8")
            except UnicodeDecodeError:
                return await error_response(400, f"the request path {shown(raw)!r} is not UTF-8 once "
                                                 "percent-decoded: quote names and file paths as UTF-8")(scope, receive, send)
            if any(c < " " or c == "\x7f" for c in path):  # `$` of the route patterns would drop a final \n
                return await error_response(400, f"the request path {shown(raw)!r} holds a control character: no "
                                                 "repo name, revision or file path may")(scope, receive, send)
            scope = dict(scope, path=path)
        await app(scope, receive, send)
    return wrapped


def shown(raw: bytes, limit: int = 200) -> bytes:
    """The start of a raw request path, for an error message."""
    return raw[:limit] + (b"..." if len(raw) > limit else b"")
