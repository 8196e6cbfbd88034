"""Uploads, served by `loradock hub serve`: what `HfApi.create_commit` (and so `upload_folder`,
`loradock push`, `push_to_hub`) calls, in order: preupload (which files go through LFS), the LFS
batch API, the signed PUT of each object and its verify, then the NDJSON commit.

An LFS object is linked into a commit only by someone who may: who sent its bytes, or who can
read a repo holding it (`Registry.may_link`). The batch API answers "already stored" on the
same rule and asks everyone else to upload, so it tells nobody what others uploaded.
"""

import base64
import binascii
import hmac
import json
import time
from urllib.parse import unquote

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from hub import errors
from hub.accounts import Caller
from hub.routes.deps import BaseUrlDep, CallerDep, RegistryDep, writable_repo
from hub.schemas import LfsBatch, LfsObject, Preupload
from hub.storage import AddFile, DeletePath, Registry, Repo, check_path

LFS_THRESHOLD = 1 << 20  # files from 1 MiB, and binary files, go through Git LFS
UPLOAD_URL_TTL = 3600  # seconds an upload URL of the batch API stays valid
NO_PULL_REQUESTS = ("pull requests are not supported by this registry: nothing was committed; commit to a branch "
                    "instead (create_branch, then upload with revision=BRANCH), without create_pr")

router = APIRouter()


def refuse_pull_request(request: Request) -> None:
    """`create_pr=1` is refused before anything is uploaded or committed (never a commit to main)."""
    if request.query_params.get("create_pr") not in (None, "", "0", "false", "False"):
        raise errors.NotSupported(NO_PULL_REQUESTS)


@router.post("/api/{kind:kind}/{namespace}/{name}/preupload/{revision:path}")
def preupload(kind: str, namespace: str, name: str, revision: str, body: Preupload, request: Request,
              registry: RegistryDep, who: CallerDep):
    refuse_pull_request(request)
    repo = writable_repo(registry, kind, namespace, name, who)
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


@router.post("/{kind:kind}/{namespace}/{repo_git}/info/lfs/objects/batch")
def lfs_batch_typed(kind: str, namespace: str, repo_git: str, body: LfsBatch, registry: RegistryDep,
                    base: BaseUrlDep, who: CallerDep):
    return lfs_batch_of(registry, kind, namespace, repo_git, body, base, who)


@router.post("/{namespace}/{repo_git}/info/lfs/objects/batch")
def lfs_batch(namespace: str, repo_git: str, body: LfsBatch, registry: RegistryDep, base: BaseUrlDep, who: CallerDep):
    return lfs_batch_of(registry, "model", namespace, repo_git, body, base, who)


def lfs_batch_of(registry: Registry, kind: str, namespace: str, repo_git: str, body: LfsBatch, base: str,
                 who: Caller | None) -> JSONResponse:
    repo = writable_repo(registry, kind, namespace, repo_git.removesuffix(".git"), who)
    if body.operation != "upload":
        raise errors.BadRequest(f"LFS operation {body.operation!r} is not supported; downloads go through /resolve")
    expires = int(time.time()) + UPLOAD_URL_TTL
    objects = [lfs_object(registry, repo, obj, base, expires, who) for obj in body.objects]
    return JSONResponse({"transfer": "basic", "objects": objects}, media_type="application/vnd.git-lfs+json")


def lfs_object(registry: Registry, repo: Repo, obj: LfsObject, base: str, expires: int, who: Caller) -> dict:
    """The batch API's answer for one object: refused, nothing to send, or where to upload it."""
    registry.check_oid(obj.oid)  # first: a bad oid is a 400 for the whole batch
    if obj.size > registry.max_file_size:
        return {"oid": obj.oid, "size": obj.size, "error": {
            "code": 422, "message": f"{obj.size} bytes is over the file size limit of {registry.max_file_size}"}}
    if registry.may_link(who, obj.oid, obj.size):
        return {"oid": obj.oid, "size": obj.size}
    sig = registry.upload_signature(obj.oid, obj.size, expires, who.user)
    return {"oid": obj.oid, "size": obj.size, "actions": {
        "upload": {"href": f"{base}/lfs/upload/{obj.oid}?size={obj.size}&expires={expires}&user={who.user}&sig={sig}"},
        "verify": {"href": f"{base}/lfs/verify/{repo.url_path}/{obj.oid}"}}}


@router.put("/lfs/upload/{oid}")
async def lfs_upload(oid: str, request: Request, registry: RegistryDep):
    params = request.query_params
    size, expires, user, sig = (params.get(k, "") for k in ("size", "expires", "user", "sig"))
    valid = size.isascii() and size.isdigit() and expires.isascii() and expires.isdigit() and int(expires) >= time.time()
    if not valid or not hmac.compare_digest(sig, registry.upload_signature(oid, int(size), int(expires), user)):
        raise errors.Forbidden("this upload URL is invalid or has expired; ask the LFS batch API for a new one")
    upload = registry.begin_upload(oid, int(size))
    try:
        async for chunk in request.stream():
            upload.write(chunk)
        await run_in_threadpool(upload.finish)  # fsync: off the event loop
    except BaseException:
        upload.abort()
        raise
    await run_in_threadpool(registry.record_upload, oid, user)
    return {}


@router.post("/lfs/verify/{kind:kind}/{namespace}/{name}/{oid}")
async def lfs_verify_typed(kind: str, namespace: str, name: str, oid: str, request: Request, registry: RegistryDep,
                           who: CallerDep):
    return await verify(registry, kind, namespace, name, oid, request, who)


@router.post("/lfs/verify/{namespace}/{name}/{oid}")
async def lfs_verify(namespace: str, name: str, oid: str, request: Request, registry: RegistryDep, who: CallerDep):
    return await verify(registry, "model", namespace, name, oid, request, who)


async def verify(registry: Registry, kind: str, namespace: str, name: str, oid: str, request: Request,
                 who: Caller | None) -> dict:
    body = await json_body(request)

    def check() -> dict:
        writable_repo(registry, kind, namespace, name, who)
        size = body.get("size")
        if type(size) is not int or not registry.may_link(who, oid, size):
            raise errors.BadRequest(f"LFS object {oid} of {size} bytes was not uploaded")
        return {}
    return await run_in_threadpool(check)


@router.post("/api/{kind:kind}/{namespace}/{name}/commit/{revision:path}")
async def commit(kind: str, namespace: str, name: str, revision: str, request: Request, registry: RegistryDep,
                 base: BaseUrlDep, who: CallerDep):
    refuse_pull_request(request)
    raw = await request.body()

    def apply():  # parsing, hashing, writing and fsyncing: in a worker thread, never on the event loop
        repo = writable_repo(registry, kind, namespace, name, who)
        header, operations = parse_commit(raw)
        done = registry.commit(who, repo, unquote(revision), operations, header.get("summary", ""),
                               header.get("description") or "", header.get("parentCommit"))
        return {"success": True, "commitOid": done.oid, "commitUrl": f"{base}/{repo.url_path}/commit/{done.oid}"}
    return await run_in_threadpool(apply)


async def json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise errors.BadRequest(f"malformed JSON body: {getattr(e, 'msg', e)}") from None
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
            key, value = commit_line(line, number)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError, ValueError,
                binascii.Error) as e:
            raise errors.BadRequest(f"malformed commit payload at line {number}: {e}") from None
        if key == "header":
            if header is not None:
                raise errors.BadRequest(f"line {number}: a second header line")
            header = value
        else:
            operations.append(value)
    if header is None:
        raise errors.BadRequest("the commit payload has no header line")
    return header, operations


def commit_line(line: bytes, number: int) -> tuple[str, dict | AddFile | DeletePath]:
    """One NDJSON line: ("header", its fields) or (its key, the operation it asks for), every field type-checked."""
    item = json.loads(line)
    if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
        raise errors.BadRequest(f"line {number}: each line is an object with a `key` and an object `value`")
    key, value = item.get("key"), item["value"]
    if key == "header":
        for field in ("summary", "description", "parentCommit"):
            if value.get(field) is not None and not isinstance(value[field], str):
                raise errors.BadRequest(f"line {number}: header field {field} must be a string")
        return key, dict(value)
    path = value.get("path")
    if not isinstance(path, str):
        raise errors.BadRequest(f"line {number}: `path` must be a string, got {type(path).__name__}")
    if key == "file":
        if value.get("encoding", "base64") != "base64":
            raise errors.BadRequest(f"line {number}: encoding {value.get('encoding')!r} is not base64")
        if not isinstance(value.get("content"), str):
            raise errors.BadRequest(f"line {number}: `content` must be a base64 string")
        return key, AddFile(path, data=base64.b64decode(value["content"], validate=True))
    if key == "lfsFile":
        oid, size = value.get("oid"), value.get("size")
        if not isinstance(oid, str) or (size is not None and (type(size) is not int or not 0 <= size <= 2**62)):
            raise errors.BadRequest(f"line {number}: an lfsFile needs a string `oid` and a whole `size` in bytes")
        return key, AddFile(path, sha256=oid, size=size)
    if key in ("deletedFile", "deletedFolder"):
        return key, DeletePath(path, folder=key == "deletedFolder")
    raise errors.BadRequest(f"line {number}: unknown commit operation {key!r}")
