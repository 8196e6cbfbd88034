"""The files of a revision, served by `loradock hub serve`: downloads (`hf_hub_download`, with
Range and HEAD), the tree listing (`list_repo_tree`) and the info of given paths
(`get_paths_info`, what `CommitOperationCopy` and `datasets` ask), for model and dataset repos."""

from urllib.parse import parse_qs, unquote

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from hub import errors, views
from hub.accounts import Caller
from hub.routes.deps import CallerDep, RegistryDep, paginate, repo_of
from hub.storage import Registry

router = APIRouter()


class BlobResponse(FileResponse):
    """FileResponse reads 64 KiB at a time, each read a hop to a worker thread; blobs are large."""

    chunk_size = 4 << 20


def download(registry: Registry, kind: str, namespace: str, name: str, revision: str, path: str, request: Request,
             who: Caller | None) -> BlobResponse:
    commit = registry.resolve(repo_of(registry, kind, namespace, name, who), unquote(revision))
    request.state.commit = commit.oid  # sent with a 404 too, as the Hub does
    entry = registry.file(commit, path)
    etag = entry.sha256 if entry.lfs else entry.git_oid
    headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{etag}"', "X-Linked-Size": str(entry.size)}
    if entry.lfs:
        headers["X-Linked-Etag"] = f'"{entry.sha256}"'
    return BlobResponse(registry.blob_path(entry), headers=headers, media_type="application/octet-stream")


@router.api_route("/{kind:kind}/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
def resolve_typed(kind: str, namespace: str, name: str, revision: str, path: str, request: Request,
                  registry: RegistryDep, who: CallerDep):
    return download(registry, kind, namespace, name, revision, path, request, who)


@router.api_route("/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
def resolve(namespace: str, name: str, revision: str, path: str, request: Request, registry: RegistryDep,
            who: CallerDep):
    return download(registry, "model", namespace, name, revision, path, request, who)


@router.get("/api/{kind:kind}/{namespace}/{name}/tree/{revision}")
@router.get("/api/{kind:kind}/{namespace}/{name}/tree/{revision}/{folder:path}")
def tree(kind: str, namespace: str, name: str, revision: str, request: Request, registry: RegistryDep, who: CallerDep,
         folder: str = ""):
    commit = registry.resolve(repo_of(registry, kind, namespace, name, who), unquote(revision))
    folder = unquote(folder).strip("/")
    entries = registry.tree(commit)
    if folder and not any(e.path.startswith(folder + "/") for e in entries):
        raise errors.EntryNotFound(f"{folder} does not exist at revision {commit.oid}")
    return paginate(views.tree_listing(entries, folder, request.query_params.get("recursive") == "true"), request)


@router.post("/api/{kind:kind}/{namespace}/{name}/paths-info/{revision:path}")
async def paths_info(kind: str, namespace: str, name: str, revision: str, request: Request, registry: RegistryDep,
                     who: CallerDep):
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    paths = form.get("paths", [])
    if len(paths) > 10_000:
        raise errors.BadRequest(f"{len(paths)} paths in one paths-info request; ask for at most 10000 at a time")

    def answer() -> list[dict]:
        commit = registry.resolve(repo_of(registry, kind, namespace, name, who), unquote(revision))
        return views.paths_info(registry.tree(commit), paths)
    return await run_in_threadpool(answer)
