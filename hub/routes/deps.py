"""What every route of the registry (run by `loradock hub serve`) shares: the `Registry` kept on
`app.state`, the caller an Authorization header stands for, the base URL, and pagination."""

from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from hub import errors
from hub.storage import Caller, Registry, Repo

PAGE = 1000  # the most items one page of a listing holds


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


RegistryDep = Annotated[Registry, Depends(get_registry)]


def caller(request: Request, registry: RegistryDep) -> Caller | None:
    """Who the bearer token stands for; None without one.

    Raises:
        Unauthorized: another scheme than Bearer, or a token the registry does not know.
    """
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if auth and scheme.lower() != "bearer":
        raise errors.Unauthorized("Invalid credentials in Authorization header")
    return registry.authenticate(token.strip() or None)


CallerDep = Annotated[Caller | None, Depends(caller)]


def base_url(request: Request) -> str:
    """The registry's own URL, for the links its answers hold."""
    return str(request.base_url).rstrip("/")


BaseUrlDep = Annotated[str, Depends(base_url)]


def repo_of(registry: Registry, namespace: str, name: str, who: Caller | None) -> Repo:
    return registry.get_repo(who, f"{namespace}/{name}")


def paginate(items: list, request: Request) -> JSONResponse:
    """One page of `items` from `?cursor=` (an offset) and `?limit=`, with an absolute `Link` to
    the next page that keeps every other query parameter."""
    start, limit = request.query_params.get("cursor", "0"), request.query_params.get("limit", str(PAGE))
    if not (start.isdigit() and limit.isdigit()):
        raise errors.BadRequest(f"cursor and limit must be whole numbers, got {start!r} and {limit!r}")
    start, limit = int(start), min(max(int(limit), 1), PAGE)
    response = JSONResponse(items[start:start + limit])
    if start + limit < len(items):
        params = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor"] + [("cursor", str(start + limit))]
        query = "&".join(f"{quote(k)}={quote(v)}" for k, v in params)
        response.headers["Link"] = f'<{base_url(request)}{request.url.path}?{query}>; rel="next"'
    return response


def error_response(status: int, message: str, code: str | None = None, extra: dict | None = None) -> JSONResponse:
    """The Hub's error shape: `{"error": message}` with `X-Error-Message` (and `X-Error-Code`)."""
    headers = {"X-Error-Message": message.encode("ascii", "replace").decode()[:500]}
    if code:
        headers["X-Error-Code"] = code
    return JSONResponse({"error": message, **(extra or {})}, status_code=status, headers=headers)
