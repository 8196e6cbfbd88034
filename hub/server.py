"""loradock hub serve [--host 127.0.0.1] [--port 8090] [--root DIR]

A registry that speaks the part of the Hugging Face Hub HTTP API that `huggingface_hub` uses for
model repos, so HfApi, hf_hub_download, snapshot_download and the `hf` CLI work against it with
HF_ENDPOINT pointing here (uploads with HF_HUB_DISABLE_XET=1: there is no Xet service).

Routes are thin: parse, call `hub.storage.Registry`, shape the JSON (`hub.views`). Errors from
`hub.errors` become the Hub's status codes with `X-Error-Code` / `X-Error-Message` headers and a
`{"error": ...}` body; bad input is always a 4xx.
"""

import base64
import binascii
import json
import time
from urllib.parse import quote, unquote

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hub import errors, views
from hub.cards import front_matter, repo_tags
from hub.schemas import CreateRepo, DeleteRepo, LfsBatch, Preupload, TagBody
from hub.storage import AddFile, Caller, DeletePath, Registry, check_path

ERROR_CODES = {  # error -> (status, X-Error-Code)
    errors.RepoNotFound: (404, "RepoNotFound"), errors.RevisionNotFound: (404, "RevisionNotFound"),
    errors.EntryNotFound: (404, "EntryNotFound"), errors.BadRequest: (400, None), errors.Unauthorized: (401, None),
    errors.Forbidden: (403, None), errors.Conflict: (409, None), errors.PreconditionFailed: (412, None),
    errors.TooLarge: (413, None),
}
LFS_THRESHOLD = 1 << 20  # files from 1 MiB, and binary files, go through Git LFS
UPLOAD_URL_TTL = 3600
PAGE = 1000


class BlobResponse(FileResponse):
    """FileResponse reads 64 KiB at a time, each read a hop to a worker thread; blobs are large."""

    chunk_size = 4 << 20


def error_response(status: int, message: str, code: str | None = None, extra: dict | None = None) -> JSONResponse:
    headers = {"X-Error-Message": message.encode("ascii", "replace").decode()[:500]}
    if code:
        headers["X-Error-Code"] = code
    return JSONResponse({"error": message, **(extra or {})}, status_code=status, headers=headers)


def keep_encoded_slashes(app):
    """Route on the raw path so that `feat%2Fx` stays one segment (the client quotes revisions that way);
    handlers unquote revision segments themselves."""
    async def wrapped(scope, receive, send):
        if scope["type"] == "http" and scope.get("raw_path"):
            raw = scope["raw_path"].split(b"?", 1)[0].decode("latin-1")
            scope = dict(scope, path=unquote(raw.replace("%2F", "%252F").replace("%2f", "%252F")))
        await app(scope, receive, send)
    return wrapped


def create_app(registry: Registry, max_body: int = 64 << 20) -> FastAPI:
    app = FastAPI(title="loradock registry", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(errors.HubError)
    async def hub_error(request: Request, exc: errors.HubError):
        status, code = ERROR_CODES.get(type(exc), (400, None))
        headers = {"X-Repo-Commit": request.state.commit} if getattr(request.state, "commit", None) else {}
        response = error_response(status, exc.message, code)
        response.headers.update(headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in exc.errors())
        return error_response(400, f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length", "0")
        if not length.isdigit():
            return error_response(400, f"invalid Content-Length {length!r}")
        if int(length) > max_body and not request.url.path.startswith("/lfs/upload/"):
            return error_response(413, f"request body of {length} bytes is over the {max_body} byte limit")
        return await call_next(request)

    def caller(request: Request) -> Caller | None:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if auth and scheme.lower() != "bearer":
            raise errors.Unauthorized("Invalid credentials in Authorization header")
        return registry.authenticate(token.strip() or None)

    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    def repo_of(namespace: str, name: str, who: Caller | None):
        return registry.get_repo(who, f"{namespace}/{name}")

    def paginate(items: list, request: Request) -> JSONResponse:
        start, limit = request.query_params.get("cursor", "0"), request.query_params.get("limit", str(PAGE))
        if not (start.isdigit() and limit.isdigit()):
            raise errors.BadRequest(f"cursor and limit must be whole numbers, got {start!r} and {limit!r}")
        start, limit = int(start), min(max(int(limit), 1), PAGE)
        response = JSONResponse(items[start:start + limit])
        if start + limit < len(items):
            params = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor"] + [("cursor", str(start + limit))]
            query = "&".join(f"{quote(k)}={quote(v)}" for k, v in params)
            response.headers["Link"] = f'<{base(request)}{request.url.path}?{query}>; rel="next"'
        return response

    # --- identity and repos -----------------------------------------------------------------

    @app.get("/api/whoami-v2")
    def whoami(who: Caller | None = Depends(caller)):
        if who is None:
            raise errors.Unauthorized("no token: log in with `loradock hub login`")
        return {"type": "user", "name": who.user, "fullname": who.user, "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": who.user, "role": who.role}}}

    @app.post("/api/validate-yaml")
    def validate_yaml(body: dict):
        try:
            front_matter(str(body.get("content", "")))
        except ValueError as e:
            return JSONResponse({"errors": [{"message": str(e)}]}, status_code=400)
        return {}

    @app.post("/api/repos/create")
    def create_repo(body: CreateRepo, request: Request, who: Caller | None = Depends(caller)):
        namespace = body.organization or (who.user if who else "")
        url = f"{base(request)}/{namespace}/{body.name}"
        try:
            registry.create_repo(who, namespace, body.name, body.visibility == "private" or bool(body.private))
        except errors.Conflict as e:
            return error_response(409, e.message, extra={"url": url})  # the client reads `url` even on 409
        return {"url": url, "name": f"{namespace}/{body.name}"}

    @app.delete("/api/repos/delete")
    def delete_repo(body: DeleteRepo, who: Caller | None = Depends(caller)):
        registry.delete_repo(who, f"{body.organization or (who.user if who else '')}/{body.name}")
        return {}

    @app.get("/api/models")
    def list_models(request: Request, search: str = "", author: str = "", sort: str = "lastModified",
                    who: Caller | None = Depends(caller)):
        wanted = request.query_params.getlist("filter")
        items = []
        for repo in registry.list_repos(who):
            if (search and search.lower() not in repo.repo_id.lower()) or (author and repo.namespace != author):
                continue
            head = registry.resolve(repo, "main")
            card = registry.card(head)
            tags = repo_tags(card)
            if all(f in tags for f in wanted):
                items.append(views.model_info(repo, head, None, card, tags))
        key = {"createdAt": "createdAt", "lastModified": "lastModified"}.get(sort, "lastModified")
        items.sort(key=lambda m: m[key], reverse=True)
        return paginate(items, request)

    def info(namespace: str, name: str, revision: str, request: Request, who: Caller | None):
        repo = repo_of(namespace, name, who)
        commit = registry.resolve(repo, unquote(revision))
        card = registry.card(commit)
        blobs = request.query_params.get("blobs") == "true"
        return views.model_info(repo, commit, registry.tree(commit), card, repo_tags(card), blobs)

    @app.get("/api/models/{namespace}/{name}")
    def model_info(namespace: str, name: str, request: Request, who: Caller | None = Depends(caller)):
        return info(namespace, name, "main", request, who)

    @app.get("/api/models/{namespace}/{name}/revision/{revision:path}")
    def model_info_at(namespace: str, name: str, revision: str, request: Request, who: Caller | None = Depends(caller)):
        return info(namespace, name, revision, request, who)

    @app.get("/api/models/{namespace}/{name}/tree/{revision}")
    @app.get("/api/models/{namespace}/{name}/tree/{revision}/{folder:path}")
    def tree(namespace: str, name: str, revision: str, request: Request, folder: str = "",
             who: Caller | None = Depends(caller)):
        commit = registry.resolve(repo_of(namespace, name, who), unquote(revision))
        folder = unquote(folder).strip("/")
        entries = registry.tree(commit)
        if folder and not any(e.path.startswith(folder + "/") for e in entries):
            raise errors.EntryNotFound(f"{folder} does not exist at revision {commit.oid}")
        return paginate(views.tree_listing(entries, folder, request.query_params.get("recursive") == "true"), request)

    @app.get("/api/models/{namespace}/{name}/refs")
    def refs(namespace: str, name: str, who: Caller | None = Depends(caller)):
        return views.refs(registry.refs(repo_of(namespace, name, who)))

    @app.get("/api/models/{namespace}/{name}/commits/{revision:path}")
    def commits(namespace: str, name: str, revision: str, request: Request, who: Caller | None = Depends(caller)):
        commit = registry.resolve(repo_of(namespace, name, who), unquote(revision))
        return paginate([views.commit_info(c) for c in registry.history(commit)], request)

    @app.post("/api/models/{namespace}/{name}/tag/{revision:path}")
    def create_tag(namespace: str, name: str, revision: str, body: TagBody, who: Caller | None = Depends(caller)):
        registry.create_tag(who, repo_of(namespace, name, who), body.tag, unquote(revision))
        return {}

    @app.delete("/api/models/{namespace}/{name}/tag/{tag:path}")
    def delete_tag(namespace: str, name: str, tag: str, who: Caller | None = Depends(caller)):
        registry.delete_tag(who, repo_of(namespace, name, who), unquote(tag))
        return {}

    # --- uploads ----------------------------------------------------------------------------

    @app.post("/api/models/{namespace}/{name}/preupload/{revision:path}")
    def preupload(namespace: str, name: str, revision: str, body: Preupload, who: Caller | None = Depends(caller)):
        repo = repo_of(namespace, name, registry.require_write(who))
        commit = registry.resolve(repo, unquote(revision))
        current = {e.path: e for e in registry.tree(commit)}
        files = []
        for f in body.files:
            check_path(f.path)
            lfs = f.size >= LFS_THRESHOLD or b"\0" in f.sample_bytes()
            known = current.get(f.path)
            oid = (known.sha256 if lfs else known.git_oid) if known and known.lfs == lfs else None
            files.append({"path": f.path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return {"files": files}

    @app.post("/{namespace}/{repo_git}/info/lfs/objects/batch")
    def lfs_batch(namespace: str, repo_git: str, body: LfsBatch, request: Request, who: Caller | None = Depends(caller)):
        repo = repo_of(namespace, repo_git.removesuffix(".git"), registry.require_write(who))
        if body.operation != "upload":
            raise errors.BadRequest(f"LFS operation {body.operation!r} is not supported; downloads go through /resolve")
        expires = int(time.time()) + UPLOAD_URL_TTL
        objects = []
        for obj in body.objects:
            registry.blobs.path(obj.oid)  # validates the oid
            if obj.size > registry.blobs.max_file_size:
                objects.append({"oid": obj.oid, "size": obj.size, "error": {
                    "code": 422, "message": f"{obj.size} bytes is over the file size limit of {registry.blobs.max_file_size}"}})
            elif registry.blobs.has(obj.oid, obj.size):
                objects.append({"oid": obj.oid, "size": obj.size})
            else:
                sig = registry.upload_signature(obj.oid, obj.size, expires)
                objects.append({"oid": obj.oid, "size": obj.size, "actions": {
                    "upload": {"href": f"{base(request)}/lfs/upload/{obj.oid}?size={obj.size}&expires={expires}&sig={sig}"},
                    "verify": {"href": f"{base(request)}/lfs/verify/{repo.repo_id}/{obj.oid}"}}})
        return JSONResponse({"transfer": "basic", "objects": objects}, media_type="application/vnd.git-lfs+json")

    @app.put("/lfs/upload/{oid}")
    async def lfs_upload(oid: str, request: Request, size: int, expires: int, sig: str):
        if expires < time.time() or sig != registry.upload_signature(oid, size, expires):
            raise errors.Forbidden("this upload URL is invalid or has expired; ask the LFS batch API for a new one")
        upload = registry.blobs.begin_upload(oid, size)
        try:
            async for chunk in request.stream():
                upload.write(chunk)
            await run_in_threadpool(upload.finish)  # fsync: off the event loop
        except BaseException:
            upload.abort()
            raise
        return {}

    @app.post("/lfs/verify/{namespace}/{name}/{oid}")
    async def lfs_verify(namespace: str, name: str, oid: str, request: Request, who: Caller | None = Depends(caller)):
        repo_of(namespace, name, registry.require_write(who))
        body = await json_body(request)
        if not isinstance(body.get("size"), int) or not registry.blobs.has(oid, body["size"]):
            raise errors.BadRequest(f"LFS object {oid} of {body.get('size')} bytes was not uploaded")
        return {}

    @app.post("/api/models/{namespace}/{name}/commit/{revision:path}")
    async def commit(namespace: str, name: str, revision: str, request: Request, who: Caller | None = Depends(caller)):
        repo = repo_of(namespace, name, registry.require_write(who))
        header, operations = parse_commit(await request.body())
        done = registry.commit(who, repo, unquote(revision), operations, header.get("summary", ""),
                               header.get("description") or "", header.get("parentCommit"))
        return {"success": True, "commitOid": done.oid, "commitUrl": f"{base(request)}/{repo.repo_id}/commit/{done.oid}"}

    # --- downloads --------------------------------------------------------------------------

    @app.api_route("/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    def resolve(namespace: str, name: str, revision: str, path: str, request: Request,
                who: Caller | None = Depends(caller)):
        commit = registry.resolve(repo_of(namespace, name, who), unquote(revision))
        request.state.commit = commit.oid  # sent with a 404 too, as the Hub does
        entry = registry.file(commit, path)
        etag = entry.sha256 if entry.lfs else entry.git_oid
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{etag}"', "X-Linked-Size": str(entry.size)}
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
        return BlobResponse(registry.blobs.path(entry.sha256), headers=headers, media_type="application/octet-stream")

    app.router.redirect_slashes = False
    return keep_encoded_slashes(app)


async def json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"{}")
    except json.JSONDecodeError as e:
        raise errors.BadRequest(f"malformed JSON body: {e.msg}") from None
    if not isinstance(body, dict):
        raise errors.BadRequest("the JSON body must be an object")
    return body


def parse_commit(raw: bytes) -> tuple[dict, list]:
    """The commit API's NDJSON: a header line, then file / lfsFile / deletedFile / deletedFolder lines."""
    header, operations = None, []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = dict(value)
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise errors.BadRequest(f"line {number}: encoding {value.get('encoding')!r} is not base64")
                operations.append(AddFile(value["path"], data=base64.b64decode(value["content"], validate=True)))
            elif key == "lfsFile":
                operations.append(AddFile(value["path"], sha256=value["oid"], size=int(value["size"])))
            elif key in ("deletedFile", "deletedFolder"):
                operations.append(DeletePath(value["path"], folder=key == "deletedFolder"))
            else:
                raise errors.BadRequest(f"line {number}: unknown commit operation {key!r}")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, binascii.Error) as e:
            raise errors.BadRequest(f"malformed commit payload at line {number}: {e}") from None
    if header is None:
        raise errors.BadRequest("the commit payload has no header line")
    return header, operations
