"""What every route of the registry (run by `loradock hub serve`) shares: the `Registry` kept on
`app.state`, the caller an Authorization header stands for, the base URL, and pagination."""

from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from starlette.convertors import Convertor, register_url_convertor

from hub import errors
from hub.accounts import Caller
from hub.storage import Registry, Repo

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


class RepoKind(Convertor):
    """The repo type segment of a Hub URL (`/api/datasets/...`, `/datasets/...`) as the type:
    `models` -> `model`. Spaces match, to be refused by name rather than fall through as a 404."""

    regex = "models|datasets|spaces"

    def convert(self, value: str) -> str:
        return value.removesuffix("s")

    def to_string(self, value: str) -> str:
        return value + "s"


register_url_convertor("kind", RepoKind())


def repo_of(registry: Registry, kind: str, namespace: str, name: str, who: Caller | None) -> Repo:
    """The repo of a route's path, as `who` may see it (`Registry.get_repo`)."""
    return registry.get_repo(who, kind, f"{namespace}/{name}")


def writable_repo(registry: Registry, kind: str, namespace: str, name: str, who: Caller | None) -> Repo:
    """The repo of a route's path, if `who` may change it: 401 without a token, 404 for a private
    repo they do not see, 403 for one they see but may not write."""
    repo = repo_of(registry, kind, namespace, name, registry.require_write(who))
    registry.require_writer(who, repo)
    return repo


def page_bounds(request: Request) -> tuple[int, int]:
    """(offset, size) of the page `?cursor=` (an offset) and `?limit=` ask for; size at most PAGE."""
    start, limit = request.query_params.get("cursor", "0"), request.query_params.get("limit", str(PAGE))
    if not (start.isascii() and start.isdigit() and limit.isascii() and limit.isdigit() and len(start) < 16):
        raise errors.BadRequest(f"cursor and limit must be whole numbers, got {start!r} and {limit!r}")
    return int(start), min(max(int(limit), 1), PAGE)


def paginate(items: list, request: Request) -> JSONResponse:
    """One page of `items` (`page_bounds`), with an absolute `Link` to the next page that keeps
    every other query parameter."""
    start, limit = page_bounds(request)
    return page(items[start:start + limit + 1], request)


def page(items: list, request: Request) -> JSONResponse:
    """The page of `page_bounds(request)` from `items`, the rows from its offset on (one more than
    it holds, when there is a next page: how a query with a LIMIT tells)."""
    start, limit = page_bounds(request)
    response = JSONResponse(items[:limit])
    if len(items) > limit:
        params = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor"] + [("cursor", str(start + limit))]
        query = "&".join(f"{quote(k)}={quote(v)}" for k, v in params)
        response.headers["Link"] = f'<{base_url(request)}{request.url.path}?{query}>; rel="next"'
    return response


def error_response(status: int, message: str, code: str | None = None, extra: dict | None = None) -> JSONResponse:
    """The Hub's error shape: `{"error": message}` with `X-Error-Message` (and `X-Error-Code`).

    Messages repeat request text (names, revisions, paths), and a header may hold neither control
    characters (the HTTP server refuses to send it, and the connection drops) nor non-Latin-1
    text: the header has the message as printable ASCII, backslash-escaped (`\\n`, `\\x00`,
    `\\xe9`), its first 500 characters; the body has it whole (a lone surrogate, which UTF-8
    cannot carry, escaped the same way)."""
    header = message[:500].encode("unicode_escape").decode("ascii")
    if len(message) > 500 or len(header) > 500:
        header = header[:497] + "..."
    headers = {"X-Error-Message": header.strip()}
    if code:
        headers["X-Error-Code"] = code
    body = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": body, **(extra or {})}, status_code=status, headers=headers)
