"""loradock hub serve [--host 127.0.0.1] [--port 8090] [--root DIR]

A registry that speaks the part of the Hugging Face Hub HTTP API that `huggingface_hub` uses for
model repos, so HfApi, hf_hub_download, snapshot_download and the `hf` CLI work against it with
HF_ENDPOINT pointing here (uploads with HF_HUB_DISABLE_XET=1: there is no Xet service).

The routes live in `hub.routes`, one router per area; they are thin: parse, call
`hub.storage.Registry`, shape the JSON (`hub.views`). This module puts them together and maps the
errors of `hub.errors` to the Hub's status codes, with `X-Error-Code` / `X-Error-Message` headers
and a `{"error": ...}` body; bad input is always a 4xx.
"""

from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from hub import errors
from hub.routes import ROUTERS
from hub.routes.deps import error_response
from hub.storage import Registry

ERROR_CODES = {  # error -> (status, X-Error-Code)
    errors.RepoNotFound: (404, "RepoNotFound"), errors.RevisionNotFound: (404, "RevisionNotFound"),
    errors.EntryNotFound: (404, "EntryNotFound"), errors.BadRequest: (400, None), errors.Unauthorized: (401, None),
    errors.Forbidden: (403, None), errors.Conflict: (409, None), errors.PreconditionFailed: (412, None),
    errors.TooLarge: (413, None), errors.NotSupported: (501, "NotSupported"),
}


def create_app(registry: Registry, max_body: int = 64 << 20) -> ASGIApp:
    """The registry's ASGI app over `registry`; request bodies over `max_body` bytes are refused
    (LFS uploads excepted: they stream to disk and are capped by the file size limit)."""
    app = FastAPI(title="loradock registry", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry = registry
    app.add_exception_handler(errors.HubError, hub_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.middleware("http")(limit_body(max_body))
    for router in ROUTERS:
        app.include_router(router)
    app.router.redirect_slashes = False
    return keep_encoded_slashes(app)


async def hub_error(request: Request, exc: errors.HubError):
    status, code = ERROR_CODES.get(type(exc), (400, None))
    headers = {"X-Repo-Commit": request.state.commit} if getattr(request.state, "commit", None) else {}
    response = error_response(status, exc.message, code)
    response.headers.update(headers)
    return response


async def invalid_body(request: Request, exc: RequestValidationError):
    problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in exc.errors())
    return error_response(400, f"invalid request: {problems}")


async def http_error(request: Request, exc: StarletteHTTPException):
    return error_response(exc.status_code, str(exc.detail))


def limit_body(max_body: int):
    """The middleware that refuses a body over `max_body` bytes before any route reads it."""
    async def limited(request: Request, call_next):
        length = request.headers.get("content-length", "0")
        if not length.isdigit():
            return error_response(400, f"invalid Content-Length {length!r}")
        if int(length) > max_body and not request.url.path.startswith("/lfs/upload/"):
            return error_response(413, f"request body of {length} bytes is over the {max_body} byte limit")
        return await call_next(request)
    return limited


def keep_encoded_slashes(app: ASGIApp) -> ASGIApp:
    """Route on the raw path so that `feat%2Fx` stays one segment (the client quotes revisions that way);
    handlers unquote revision segments themselves."""
    async def wrapped(scope, receive, send):
        if scope["type"] == "http" and scope.get("raw_path"):
            raw = scope["raw_path"].split(b"?", 1)[0].decode("latin-1")
            scope = dict(scope, path=unquote(raw.replace("%2F", "%252F").replace("%2f", "%252F")))
        await app(scope, receive, send)
    return wrapped
