"""Uploads, served by `loradock hub serve`: what `HfApi.create_commit` (and so `upload_folder`,
`loradock push`) calls, in order: preupload (which files go through LFS), the LFS batch API,
the signed PUT of each object and its verify, then the NDJSON commit."""

import base64
import binascii
import json
import time
from urllib.parse import unquote

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from hub import errors
from hub.routes.deps import BaseUrlDep, CallerDep, RegistryDep, repo_of
from hub.schemas import LfsBatch, LfsObject, Preupload
from hub.storage import AddFile, DeletePath, Registry, Repo, check_path

LFS_THRESHOLD = 1 << 20  # files from 1 MiB, and binary files, go through Git LFS
UPLOAD_URL_TTL = 3600  # seconds an upload URL of the batch API stays valid

router = APIRouter()


@router.post("/api/models/{namespace}/{name}/preupload/{revision:path}")
def preupload(namespace: str, name: str, revision: str, body: Preupload, registry: RegistryDep, who: CallerDep):
    repo = repo_of(registry, namespace, name, registry.require_write(who))
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


@router.post("/{namespace}/{repo_git}/info/lfs/objects/batch")
def lfs_batch(namespace: str, repo_git: str, body: LfsBatch, registry: RegistryDep, base: BaseUrlDep,
              who: CallerDep):
    repo = repo_of(registry, namespace, repo_git.removesuffix(".git"), registry.require_write(who))
    if body.operation != "upload":
        raise errors.BadRequest(f"LFS operation {body.operation!r} is not supported; downloads go through /resolve")
    expires = int(time.time()) + UPLOAD_URL_TTL
    objects = [lfs_object(registry, repo, obj, base, expires) for obj in body.objects]
    return JSONResponse({"transfer": "basic", "objects": objects}, media_type="application/vnd.git-lfs+json")


def lfs_object(registry: Registry, repo: Repo, obj: LfsObject, base: str, expires: int) -> dict:
    """The batch API's answer for one object: refused, already stored, or where to upload it."""
    stored = registry.has_lfs_object(obj.oid, obj.size)  # first: it validates the oid
    if obj.size > registry.max_file_size:
        return {"oid": obj.oid, "size": obj.size, "error": {
            "code": 422, "message": f"{obj.size} bytes is over the file size limit of {registry.max_file_size}"}}
    if stored:
        return {"oid": obj.oid, "size": obj.size}
    sig = registry.upload_signature(obj.oid, obj.size, expires)
    return {"oid": obj.oid, "size": obj.size, "actions": {
        "upload": {"href": f"{base}/lfs/upload/{obj.oid}?size={obj.size}&expires={expires}&sig={sig}"},
        "verify": {"href": f"{base}/lfs/verify/{repo.repo_id}/{obj.oid}"}}}


@router.put("/lfs/upload/{oid}")
async def lfs_upload(oid: str, request: Request, size: int, expires: int, sig: str, registry: RegistryDep):
    if expires < time.time() or sig != registry.upload_signature(oid, size, expires):
        raise errors.Forbidden("this upload URL is invalid or has expired; ask the LFS batch API for a new one")
    upload = registry.begin_upload(oid, size)
    try:
        async for chunk in request.stream():
            upload.write(chunk)
        await run_in_threadpool(upload.finish)  # fsync: off the event loop
    except BaseException:
        upload.abort()
        raise
    return {}


@router.post("/lfs/verify/{namespace}/{name}/{oid}")
async def lfs_verify(namespace: str, name: str, oid: str, request: Request, registry: RegistryDep, who: CallerDep):
    repo_of(registry, namespace, name, registry.require_write(who))
    body = await json_body(request)
    if not isinstance(body.get("size"), int) or not registry.has_lfs_object(oid, body["size"]):
        raise errors.BadRequest(f"LFS object {oid} of {body.get('size')} bytes was not uploaded")
    return {}


@router.post("/api/models/{namespace}/{name}/commit/{revision:path}")
async def commit(namespace: str, name: str, revision: str, request: Request, registry: RegistryDep,
                 base: BaseUrlDep, who: CallerDep):
    repo = repo_of(registry, namespace, name, registry.require_write(who))
    header, operations = parse_commit(await request.body())
    done = registry.commit(who, repo, unquote(revision), operations, header.get("summary", ""),
                           header.get("description") or "", header.get("parentCommit"))
    return {"success": True, "commitOid": done.oid, "commitUrl": f"{base}/{repo.repo_id}/commit/{done.oid}"}


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
            key, value = commit_line(line, number)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, binascii.Error) as e:
            raise errors.BadRequest(f"malformed commit payload at line {number}: {e}") from None
        if key == "header":
            header = value
        else:
            operations.append(value)
    if header is None:
        raise errors.BadRequest("the commit payload has no header line")
    return header, operations


def commit_line(line: bytes, number: int) -> tuple[str, dict | AddFile | DeletePath]:
    """One NDJSON line: ("header", its fields) or (its key, the operation it asks for)."""
    item = json.loads(line)
    key, value = item["key"], item["value"]
    if key == "header":
        return key, dict(value)
    if key == "file":
        if value.get("encoding", "base64") != "base64":
            raise errors.BadRequest(f"line {number}: encoding {value.get('encoding')!r} is not base64")
        return key, AddFile(value["path"], data=base64.b64decode(value["content"], validate=True))
    if key == "lfsFile":
        return key, AddFile(value["path"], sha256=value["oid"], size=int(value["size"]))
    if key in ("deletedFile", "deletedFolder"):
        return key, DeletePath(value["path"], folder=key == "deletedFolder")
    raise errors.BadRequest(f"line {number}: unknown commit operation {key!r}")
